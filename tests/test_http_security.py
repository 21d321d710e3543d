"""Issue 5 end to end: a real scheduler (gunicorn, real PostgreSQL) on a loopback port with a token,
and every attempt to get past the token or a limit, over real sockets. Each attempt checks the status
and the body it gets; the table of what each got is printed at the end of the module."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest
from helpers import add_report, wait_for

from distrack.scheduler.app import DEFAULT_MAX_BODY_BYTES
from distrack.scheduler.server import LIMIT_REQUEST_FIELD_BYTES, LIMIT_REQUEST_FIELDS, LIMIT_REQUEST_LINE_BYTES
from distrack.scheduler.validation import MAX_BATCH_TASKS, MAX_COMMAND_BYTES, MAX_DELAY_SECONDS

LIMIT = DEFAULT_MAX_BODY_BYTES
SOCKET_TIMEOUT_S = 10.0


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    seconds: float

    @property
    def json(self) -> dict:
        return json.loads(self.body)

    def summary(self) -> str:
        try:
            doc = self.json
        except ValueError:  # gunicorn's own HTML pages: their title says it
            match = re.search(rb"<title>(.*?)</title>", self.body)
            return (match.group(1) if match else self.body[:80]).decode(errors="replace")
        if isinstance(doc, dict) and "title" in doc:
            return f"{doc['title']}: {doc.get('description', '')}"[:110]
        if isinstance(doc, dict) and "task_id" in doc:
            return f"task {doc['status']}"
        if isinstance(doc, dict) and "count" in doc:
            return f"{doc['count']} tasks stored"
        return json.dumps(doc)[:80]


def send(port: int, head: str, body: bytes | Callable[[socket.socket], None] = b"") -> Answer:
    """One request on its own connection: `head` (request line and headers, without the blank line),
    then `body` as bytes, or written by a function from another thread (so that a server answering
    before reading it all cannot block us). Reads the whole answer with a deadline."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n")
        writer = None
        if callable(body):
            writer = threading.Thread(target=_quietly, args=(body, sock), daemon=True)
            writer.start()
        elif body:
            sock.sendall(body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        elapsed = time.monotonic() - started
    if writer is not None:
        writer.join(SOCKET_TIMEOUT_S)
    return Answer(response.status, data, headers, elapsed)


def _quietly(write: Callable[[socket.socket], None], sock: socket.socket) -> None:
    # The server may answer and close before taking everything: the point of a limit.
    try:
        write(sock)
    except OSError:
        pass


RESULTS: list[tuple[str, Answer]] = []


@pytest.fixture(scope="module")
def server(secured_cluster, request):
    port = secured_cluster.scheduler_port
    yield secured_cluster
    lines = [f"  {'attempt':<58} {'status':>6}  answer"]
    lines += [f"  {label:<58} {answer.status:>6}  {answer.summary()}" for label, answer in RESULTS]
    add_report(request.config, f"issue 5: attempts on a live scheduler at 127.0.0.1:{port} with a token", lines)


def attempt(label: str, answer: Answer) -> Answer:
    RESULTS.append((label, answer))
    return answer


def post(server, path: str, body: bytes, *, token: str | None = "right", content_type: str = "application/json",
         extra: str = "") -> Answer:
    auth = {None: "", "right": f"\nAuthorization: Bearer {server.api_token}"}.get(token, f"\nAuthorization: {token}")
    head = (f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: {content_type}\n"
            f"Content-Length: {len(body)}{auth}{extra}")
    return send(server.scheduler_port, head, body)


def get(server, path: str, *, token: str | None = "right", extra: str = "") -> Answer:
    auth = {None: "", "right": f"\nAuthorization: Bearer {server.api_token}"}.get(token, f"\nAuthorization: {token}")
    return send(server.scheduler_port, f"GET {path} HTTP/1.1\nHost: 127.0.0.1{auth}{extra}")


SCHEDULE = b'{"command": "echo hello", "delay_seconds": 3600}'


# --- the token


def test_no_token_is_401(server):
    answer = attempt("no token: POST /schedule", post(server, "/schedule", SCHEDULE, token=None))
    assert answer.status == 401 and answer.json["title"] == "Authentication required"
    assert answer.headers["www-authenticate"] == 'Bearer realm="distrack"'


@pytest.mark.parametrize(
    ("label", "header"),
    [
        ("wrong token", "Bearer not-the-token"),
        ("right token under the Basic scheme", "Basic {token}"),
        ("right token plus one character", "Bearer {token}x"),
        ("right token minus its last character", "Bearer {token_short}"),
        ("empty bearer token", "Bearer "),
    ],
)
def test_a_wrong_token_is_401(server, label, header):
    value = header.format(token=server.api_token, token_short=server.api_token[:-1])
    answer = attempt(f"{label}: POST /schedule", post(server, "/schedule", SCHEDULE, token=value))
    assert answer.status == 401 and answer.json["title"] == "Invalid token"
    assert "invalid_token" in answer.headers["www-authenticate"]


def test_the_right_token_is_200(server):
    answer = attempt("right token: POST /schedule", post(server, "/schedule", SCHEDULE))
    assert answer.status == 200 and answer.json["status"] == "queued"


@pytest.mark.parametrize(
    ("label", "path", "status"),
    [
        ("no token: GET /health", "/health", 200),
        ("no token: GET /openapi.json", "/openapi.json", 401),
        ("no token: GET /status?task_id=<uuid>", f"/status?task_id={uuid.uuid4()}", 401),
        ("no token: GET /no/such/path", "/no/such/path", 401),
    ],
)
def test_only_health_is_open(server, label, path, status):
    answer = attempt(label, get(server, path, token=None))
    assert answer.status == status, answer.body


def test_without_the_token_a_big_body_is_not_read(server):
    """401 at once, without waiting for a body the client announced but never sends."""
    head = (f"POST /schedule HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
            f"Content-Length: {10 * 1024**3}")
    answer = attempt("no token, Content-Length 10 GiB, no body sent", send(server.scheduler_port, head))
    assert answer.status == 401
    assert answer.seconds < SOCKET_TIMEOUT_S / 2


# --- the limits


def test_a_body_over_the_limit_is_413(server):
    body = b'{"command": "' + b"x" * (LIMIT - 15 + 1) + b'"}'
    assert len(body) == LIMIT + 1
    answer = attempt("body of 1 MiB + 1 byte", post(server, "/schedule", body))
    assert answer.status == 413
    assert answer.json == {"title": "Body too large", "description": f"the body is {LIMIT + 1} bytes; the limit "
                           f"is {LIMIT}"}


def test_an_announced_huge_body_is_413_before_any_of_it_arrives(server):
    head = (f"POST /tasks HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {server.api_token}\n"
            f"Content-Length: {10 * 1024**3}")
    answer = attempt("Content-Length 10 GiB, no body sent", send(server.scheduler_port, head))
    assert answer.status == 413
    assert answer.seconds < SOCKET_TIMEOUT_S / 2


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    chunk = b"x" * 65536
    sent = []

    def write(sock: socket.socket) -> None:
        for _ in range(LIMIT // len(chunk) + 4):  # 1 MiB + 256 KiB
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent.append(len(chunk))
        sock.sendall(b"0\r\n\r\n")

    head = (f"POST /schedule HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {server.api_token}\n"
            "Transfer-Encoding: chunked")
    answer = attempt("chunked body of 1.25 MiB", send(server.scheduler_port, head, write))
    assert answer.status == 413
    assert answer.json["description"] == f"the body is over {LIMIT} bytes"


def test_a_body_of_exactly_the_limit_is_accepted(server):
    tasks = {"tasks": [{"command": f"echo {i}", "delay_seconds": 3600} for i in range(1000)]}
    body = json.dumps(tasks).encode()
    body += b" " * (LIMIT - len(body))
    answer = attempt("body of exactly 1 MiB (1,000 tasks and spaces)", post(server, "/tasks", body))
    assert answer.status == 200 and answer.json["count"] == 1000


@pytest.mark.parametrize(
    ("label", "path", "body", "status", "fragment"),
    [
        ("command of 64 KiB", "/schedule", {"command": "x" * MAX_COMMAND_BYTES, "delay_seconds": 3600}, 200, None),
        ("command of 64 KiB + 1 byte", "/schedule", {"command": "x" * (MAX_COMMAND_BYTES + 1)}, 400,
         f"limit is {MAX_COMMAND_BYTES}"),
        ("delay_seconds of a year (366 days)", "/schedule", {"command": "x", "delay_seconds": MAX_DELAY_SECONDS},
         200, None),
        ("delay_seconds of a year + 1 s", "/schedule", {"command": "x", "delay_seconds": MAX_DELAY_SECONDS + 1}, 400,
         "between 0 and"),
        ("delay_seconds -1", "/schedule", {"command": "x", "delay_seconds": -1}, 400, "between 0 and"),
        ("max_attempts 101", "/schedule", {"command": "x", "max_attempts": 101}, 400, "between 1 and 100"),
        ("timeout_seconds 0", "/schedule", {"command": "x", "timeout_seconds": 0}, 400, "greater than 0"),
        ("an unknown field", "/schedule", {"command": "x", "dealy_seconds": 5}, 400, "unknown field"),
        (f"batch of {MAX_BATCH_TASKS + 1:,} tasks", "/tasks", {"tasks": [{"command": "x"}] * (MAX_BATCH_TASKS + 1)},
         400, f"the limit is {MAX_BATCH_TASKS}"),
        ("empty batch", "/tasks", {"tasks": []}, 400, "must not be empty"),
    ],
)
def test_field_limits(server, label, path, body, status, fragment):
    answer = attempt(label, post(server, path, json.dumps(body).encode()))
    assert answer.status == status, answer.body[:300]
    if fragment:
        assert fragment in answer.json["description"]


@pytest.mark.parametrize(
    ("label", "body", "fragment"),
    [
        ("invalid UTF-8", b'{"command": "\xff\xfe"}', "not UTF-8"),
        ("not JSON", b"command=echo+hello", "not valid JSON"),
        ("empty body", b"", "body is empty"),
        ("a JSON array, not an object", b'["echo"]', "must be a JSON object"),
        ("JSON nested 100,000 deep", b'{"command": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ("NaN", b'{"command": "x", "delay_seconds": NaN}', "not a JSON number"),
        ("Infinity", b'{"command": "x", "delay_seconds": Infinity}', "not a JSON number"),
        ("1e999 (a float overflow)", b'{"command": "x", "delay_seconds": 1e999}', "between 0 and"),
        ("an integer of 5,000 digits", b'{"command": "x", "delay_seconds": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ("a NUL in the command", b'{"command": "a\\u0000b"}', "NUL"),
        ("an unpaired surrogate in the command", b'{"command": "\\ud800"}', "surrogate"),
    ],
)
def test_malformed_bodies_are_400(server, label, body, fragment):
    answer = attempt(label, post(server, "/schedule", body))
    assert answer.status == 400, answer.body[:300]
    assert fragment in answer.json["description"]


def test_the_body_is_json_whatever_its_content_type(server):
    answer = attempt("JSON sent as text/plain", post(server, "/schedule", SCHEDULE, content_type="text/plain"))
    assert answer.status == 200


@pytest.mark.parametrize(
    ("label", "path", "status"),
    [
        ("malformed id: GET /tasks/nope", "/tasks/nope", 400),
        ("SQL as an id: GET /status?task_id=1'%20OR%20'1'='1", "/status?task_id=1'%20OR%20'1'='1", 400),
        ("id without hyphens: GET /tasks/<32 hex>", f"/tasks/{uuid.uuid4().hex}", 400),
        ("two ids: GET /status?task_id=a&task_id=b", f"/status?task_id={uuid.uuid4()}&task_id={uuid.uuid4()}", 400),
        ("no id: GET /status", "/status", 400),
        ("unknown id: GET /tasks/<uuid>", f"/tasks/{uuid.uuid4()}", 404),
    ],
)
def test_malformed_and_unknown_ids(server, label, path, status):
    answer = attempt(label, get(server, path))
    assert answer.status == status, answer.body


def test_a_wrong_method_is_405(server):
    answer = attempt("DELETE /schedule", send(server.scheduler_port,
                                              f"DELETE /schedule HTTP/1.1\nHost: x\nAuthorization: Bearer "
                                              f"{server.api_token}"))
    assert answer.status == 405 and "POST" in answer.headers["allow"]


def test_sql_in_a_command_is_stored_as_text(server):
    command = "echo '; DROP TABLE tasks; --"
    answer = attempt("SQL in a command", post(server, "/schedule", json.dumps({"command": command,
                                                                                "delay_seconds": 3600}).encode()))
    assert answer.status == 200
    stored = get(server, f"/tasks/{answer.json['task_id']}").json
    assert stored["command"] == command
    with psycopg.connect(server.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM tasks WHERE command = %s", (command,)).fetchone()[0] == 1


def test_oversized_request_lines_and_headers_are_refused_by_gunicorn(server):
    answer = attempt(f"a header of {LIMIT_REQUEST_FIELD_BYTES + 1} bytes",
                     get(server, "/health", extra=f"\nX-Pad: {'x' * (LIMIT_REQUEST_FIELD_BYTES + 1 - len('X-Pad: '))}"))
    assert answer.status == 431
    answer = attempt(f"{LIMIT_REQUEST_FIELDS + 1} headers",
                     get(server, "/health", extra="".join(f"\nX-{i}: y" for i in range(LIMIT_REQUEST_FIELDS + 1))))
    assert answer.status == 431
    answer = attempt(f"a request line over {LIMIT_REQUEST_LINE_BYTES} bytes",
                     get(server, "/status?task_id=" + "x" * LIMIT_REQUEST_LINE_BYTES))
    assert answer.status == 414
    # Just inside every limit, the request reaches the app.
    inside = "".join(f"\nX-{i}: y" for i in range(LIMIT_REQUEST_FIELDS - 3))  # Host and Authorization count
    assert get(server, "/health", extra=inside).status == 200


def test_the_token_never_reaches_the_log(server):
    """Run last in this module: every attempt above has been logged (the access log is on)."""
    log = wait_for(lambda: server.services[0].log() if "DELETE /schedule" in server.services[0].log() else None,
                   what="the access log to show the requests")
    assert server.api_token not in log
    assert "no API token" not in log  # a loopback scheduler with a token has nothing to warn about
