"""The scheduler's gunicorn worker class (a thread per connection), served over real sockets.

gunicorn runs tests/httpworker_app.py with `-k distrack.scheduler.httpworker.ConnectionThreadWorker`
in its own process: keep-alive, pipelining, one send per response, errors, the connection limit,
the keep-alive timeout and a graceful shutdown are all checked from the client's side of a socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, pid_alive, wait_for

WORKER_CLASS = "distrack.scheduler.httpworker.ConnectionThreadWorker"
TESTS = Path(__file__).resolve().parent


class Gunicorn:
    def __init__(self, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "gunicorn.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", WORKER_CLASS, "-b", f"127.0.0.1:{self.port}", "-w", "1",
             "--graceful-timeout", "5", "--no-control-socket", *extra, "httpworker_app:app"],
            cwd=TESTS, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        wait_for(self._answers, timeout=20, what="gunicorn to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"gunicorn exited: {self.log_path.read_text()}")
        with contextlib.suppress(OSError), self.connect() as sock:
            sock.sendall(request("/ping"))
            return read_response(sock)[0] == 200
        return False

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


def request(path: str, body: bytes | None = None, *, close: bool = False) -> bytes:
    head = f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\nHost: test\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def read_response(sock: socket.socket, pending: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    """One response from `sock` (what follows it stays in `pending`)."""
    buf = pending if pending is not None else bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a body")
        rest += chunk
    buf[:] = rest[length:]
    return int(lines[0].split()[1]), headers, rest[:length]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Gunicorn]:
    g = Gunicorn(tmp_path)
    try:
        yield g
    finally:
        g.stop()


def test_one_connection_serves_request_after_request(server):
    with server.connect() as sock:
        counts = []
        for i in range(20):
            sock.sendall(request("/echo", f"body {i}".encode()))
            status, headers, body = read_response(sock)
            assert status == 200 and headers["connection"] == "keep-alive"
            path, count, rest = body.decode().split(" ", 2)
            assert (path, rest) == ("/echo", f"body {i}")
            counts.append(int(count))
        assert counts == sorted(counts) and len(set(counts)) == 20


def test_pipelined_requests_are_all_answered_in_order(server):
    with server.connect() as sock:
        sock.sendall(b"".join(request("/echo", f"n{i}".encode()) for i in range(5)))
        pending = bytearray()
        bodies = [read_response(sock, pending)[2].decode().split(" ", 2)[2] for _ in range(5)]
        assert bodies == [f"n{i}" for i in range(5)]


def test_a_response_leaves_in_one_send(server):
    # Status line, headers and body in one segment: the first read holds the whole response.
    with server.connect() as sock:
        for _ in range(5):
            sock.sendall(request("/echo", b"x" * 100))
            first = sock.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body.startswith(b"/echo ") and body.endswith(b"x" * 100)


def test_an_app_error_is_a_500_and_the_connection_closes(server):
    with server.connect() as sock:
        sock.sendall(request("/boom"))
        status, _, _ = read_response(sock)
        assert status == 500
        assert closed_by_server(sock)
    with server.connect() as sock:  # the worker is still serving
        sock.sendall(request("/ping"))
        assert read_response(sock)[0] == 200
    assert "the app failed" in server.log_path.read_text()


def test_a_malformed_request_is_a_400(server):
    with server.connect() as sock:
        sock.sendall(b"NOT A REQUEST\r\n\r\n")
        assert read_response(sock)[0] == 400


def test_connection_close_is_honoured(server):
    with server.connect() as sock:
        sock.sendall(request("/ping", close=True))
        status, headers, _ = read_response(sock)
        assert status == 200 and headers["connection"] == "close"
        assert closed_by_server(sock)


def test_an_idle_connection_closes_after_the_keepalive_timeout(tmp_path):
    g = Gunicorn(tmp_path, "--keep-alive", "1")
    try:
        with g.connect() as sock:
            sock.sendall(request("/ping"))
            assert read_response(sock)[0] == 200
            started = time.monotonic()
            assert closed_by_server(sock)  # blocks until the server closes it (or the 10 s timeout)
            assert 0.5 < time.monotonic() - started < 5
    finally:
        g.stop()


def test_connections_beyond_the_limit_wait_to_be_accepted(tmp_path):
    g = Gunicorn(tmp_path, "--worker-connections", "2")
    try:
        first, second = g.connect(), g.connect()
        for sock in (first, second):
            sock.sendall(request("/ping"))
            assert read_response(sock)[0] == 200
        third = g.connect()  # the kernel completes the handshake; the worker does not take it yet
        third.sendall(request("/ping"))
        third.settimeout(0.5)
        with pytest.raises(TimeoutError):
            third.recv(1)
        first.close()  # a place frees up: the waiting connection is served
        third.settimeout(10)
        assert read_response(third)[0] == 200
        second.close()
        third.close()
    finally:
        g.stop()


def test_a_small_unread_body_is_discarded_and_the_connection_serves_on(server):
    with server.connect() as sock:
        sock.sendall(request("/noread", b"x" * 5000))
        assert read_response(sock)[2] == b"ok"
        sock.sendall(request("/echo", b"next"))
        assert read_response(sock)[2].endswith(b" next")


@pytest.mark.parametrize("size", [500, 5000])
def test_a_partly_read_body_is_discarded_and_the_connection_serves_on(server, size):
    # 500 bytes: the app's read of 10 took the whole body off the connection (gunicorn reads ahead for
    # it) and the next request starts right after; 5,000: the rest of the body is still to be read
    # from the connection, and must not be taken for a request.
    with server.connect() as sock:
        sock.sendall(request("/readsome", b"0123456789" + b"x" * (size - 10)) + request("/echo", b"next"))
        pending = bytearray()
        assert read_response(sock, pending)[2] == b"0123456789"
        status, _, body = read_response(sock, pending)
        assert status == 200 and body.endswith(b" next")


@pytest.fixture()
def impatient_server(tmp_path: Path) -> Iterator[Gunicorn]:
    g = Gunicorn(tmp_path, env={"TEST_READ_TIMEOUT_S": "0.5"})
    try:
        yield g
    finally:
        g.stop()


@pytest.mark.parametrize("sent", [
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Le",  # stops in the headers
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly part",  # and in the body
], ids=["headers", "body"])
def test_a_client_that_stops_sending_mid_request_is_closed_after_the_read_timeout(impatient_server, sent):
    with impatient_server.connect() as sock:
        sock.sendall(request("/ping"))  # a request served first: the timeout holds on a kept-alive connection
        assert read_response(sock)[0] == 200
        sock.sendall(sent)
        started = time.monotonic()
        assert closed_by_server(sock)  # blocks until the server closes it (or the 10 s timeout)
        assert 0.4 < time.monotonic() - started < 5
    with impatient_server.connect() as sock:  # and the worker serves on
        sock.sendall(request("/ping"))
        assert read_response(sock)[0] == 200
    assert "Socket error" not in impatient_server.log_path.read_text()


def test_a_large_unread_body_that_never_ends_closes_the_connection_soon(server):
    with server.connect() as sock:
        sock.sendall(b"POST /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n" + b"x" * 100_000)
        assert read_response(sock)[2] == b"ok"
        started = time.monotonic()
        assert closed_by_server(sock)  # not after 30 s of reading a GiB
        assert time.monotonic() - started < 5


def test_shutdown_finishes_the_request_under_way_and_closes_idle_connections(tmp_path):
    g = Gunicorn(tmp_path)
    try:
        silent = g.connect()  # connected, never sent a byte
        idle = g.connect()
        idle.sendall(request("/ping"))
        assert read_response(idle)[0] == 200
        busy = g.connect()
        busy.sendall(request("/slow?1.5"))
        time.sleep(0.3)  # let the request start: the app sleeps 1.5 s in it
        started = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        answer: list = []
        reader = threading.Thread(target=lambda: answer.append(read_response(busy)))
        reader.start()
        assert closed_by_server(idle)  # at once, not after the keep-alive timeout
        assert closed_by_server(silent)  # nor after the first request's read timeout
        assert time.monotonic() - started < 1.2
        reader.join(10)
        status, headers, body = answer[0]
        assert status == 200 and body.startswith(b"/slow") and headers["connection"] == "close"
        assert closed_by_server(busy)
        g.proc.wait(10)
        assert g.proc.returncode == 0
        assert not pid_alive(g.proc.pid)
        busy.close()
        idle.close()
        silent.close()
    finally:
        g.stop()


def test_a_quick_shutdown_does_not_wait_for_the_request_under_way(tmp_path):
    # Ctrl-C (SIGINT) to gunicorn: its workers get SIGQUIT and exit at once, as gunicorn's own do.
    g = Gunicorn(tmp_path, "--graceful-timeout", "30")
    try:
        (worker,) = _worker_pids(g)
        with g.connect() as busy:
            marker = tmp_path / "started"
            head = f"\r\nX-Started-Marker: {marker}\r\n\r\n".encode()
            busy.sendall(request("/slow?20").replace(b"\r\n\r\n", head))
            wait_for(marker.exists, 10, what="the request to start")
            g.proc.send_signal(signal.SIGINT)
            wait_for(lambda: not pid_alive(worker), 5, what="the worker to exit")
            assert closed_by_server(busy)  # no answer: the request was dropped
        assert g.proc.wait(10) == 0
    finally:
        g.stop()


def _worker_pids(g: Gunicorn) -> list[int]:
    children = Path(f"/proc/{g.proc.pid}/task/{g.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_out_of_file_descriptors_new_connections_wait_and_the_open_ones_are_served(server):
    # accept() failing with EMFILE is a limit, not a fault: the worker must not exit (and drop every
    # connection it has) but leave new ones in the backlog until descriptors free up.
    import resource

    kept = server.connect()
    kept.sendall(request("/ping"))
    assert read_response(kept)[0] == 200
    (worker,) = _worker_pids(server)
    limits = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{worker}/fd"))
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (in_use + 1, limits[1]))
    waiting = [server.connect() for _ in range(4)]  # the kernel completes them; the worker takes at most one
    for sock in waiting:
        sock.sendall(request("/ping"))
    wait_for(lambda: not pid_alive(worker) or "cannot accept connections" in server.log_path.read_text(),
             what="the worker at its limit")
    assert pid_alive(worker), f"the worker exited at its descriptor limit: {server.log_path.read_text()}"
    kept.sendall(request("/ping"))
    assert read_response(kept)[0] == 200  # same worker, same connection
    resource.prlimit(worker, resource.RLIMIT_NOFILE, limits)
    for sock in waiting:
        sock.settimeout(10)
        assert read_response(sock)[0] == 200
        sock.close()
    kept.close()
    assert _worker_pids(server) == [worker]
    wait_for(lambda: "accepting connections again" in server.log_path.read_text(), what="the recovery logged")
