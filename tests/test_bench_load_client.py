"""The load generator's asyncio client against a scripted HTTP server on a real loopback socket."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from distrack.bench.client import ApiError, AsyncSchedulerClient, TransportError
from distrack.bench.load import run_load, schedule_sender


class ScriptedServer:
    """Accepts connections and answers each request with the next scripted answer: bytes to send,
    or None to close the connection without answering. Records every request it read."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buf = b""
                while self.answers:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\r\n\r\n" not in buf:
                        break
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + rest[:length])
                    buf = rest[length:]
                    answer = self.answers.pop(0)
                    if answer is None:
                        break
                    conn.sendall(answer)

    def close(self) -> None:
        self._listener.close()


def answer(status: int, doc: dict, *, close: bool = False) -> bytes:
    body = json.dumps(doc).encode()
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode() + body


@pytest.fixture()
def scripted() -> Iterator[type[ScriptedServer]]:
    made: list[ScriptedServer] = []

    def make(answers):
        made.append(ScriptedServer(answers))
        return made[-1]

    yield make
    for server in made:
        server.close()


def posts(url: str, bodies: list[bytes], **kwargs) -> list:
    """POSTs each body to /schedule in turn on one client; each answer or the exception it raised."""

    async def go():
        client = AsyncSchedulerClient(url, **kwargs)
        outcomes = []
        for body in bodies:
            try:
                outcomes.append(await client.post("/schedule", body))
            except (ApiError, TransportError) as exc:
                outcomes.append(exc)
        await client.close()
        return outcomes

    return asyncio.run(go())


def test_requests_share_one_connection_and_carry_the_token(scripted):
    server = scripted([answer(200, {"task_id": "a"}), answer(200, {"task_id": "b"})])
    url = f"http://127.0.0.1:{server.port}/prefix"
    assert posts(url, [b'{"n": 1}', b'{"n": 2}'], token="s3cret") == [{"task_id": "a"}, {"task_id": "b"}]
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /prefix/schedule HTTP/1.1"
    assert "Authorization: Bearer s3cret" in lines and "Content-Length: 8" in lines
    assert body == b'{"n": 1}'


def test_an_error_status_is_an_api_error_with_the_servers_words(scripted):
    server = scripted([answer(400, {"title": "Invalid input", "description": "command is empty"})])
    [outcome] = posts(f"http://127.0.0.1:{server.port}", [b"{}"])
    assert isinstance(outcome, ApiError) and outcome.status == 400
    assert str(outcome) == "HTTP 400: Invalid input: command is empty"


def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_fresh_one(scripted):
    server = scripted([answer(200, {"task_id": "a"}), None, answer(200, {"task_id": "b"})])
    assert posts(f"http://127.0.0.1:{server.port}", [b"{}", b"{}"]) == [{"task_id": "a"}, {"task_id": "b"}]
    assert server.connections == 2


def test_a_fresh_connection_closed_without_an_answer_is_not_retried(scripted):
    server = scripted([None, answer(200, {"task_id": "never"})])
    [outcome] = posts(f"http://127.0.0.1:{server.port}", [b"{}"])
    assert isinstance(outcome, TransportError)
    assert server.connections == 1


def test_connection_close_is_honoured(scripted):
    server = scripted([answer(200, {"task_id": "a"}, close=True), answer(200, {"task_id": "b"})])
    assert posts(f"http://127.0.0.1:{server.port}", [b"{}", b"{}"]) == [{"task_id": "a"}, {"task_id": "b"}]
    assert server.connections == 2


def test_a_refused_connection_is_a_transport_error():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    [outcome] = posts(f"http://127.0.0.1:{port}", [b"{}"])
    assert isinstance(outcome, TransportError)


def test_no_answer_within_the_timeout_is_a_transport_error():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        [outcome] = posts(f"http://127.0.0.1:{silent.getsockname()[1]}", [b"{}"], timeout_s=0.3)
    assert isinstance(outcome, TransportError) and "0.3 s" in str(outcome)


def test_a_chunked_answer_is_refused_not_misread(scripted):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    server = scripted([chunked])
    [outcome] = posts(f"http://127.0.0.1:{server.port}", [b"{}"])
    assert isinstance(outcome, TransportError) and "chunked" in str(outcome)


def test_run_load_over_real_sockets_collects_every_task_id(scripted):
    server = scripted([answer(200, {"task_id": f"t{i}"}) for i in range(30)])
    result = run_load(f"http://127.0.0.1:{server.port}", schedule_sender(b"{}"), concurrency=1, count=30)
    assert result.task_ids == [f"t{i}" for i in range(30)] and result.errors == 0
