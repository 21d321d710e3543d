"""Keep-alive HTTP clients of the scheduler (standard library only): SchedulerClient, one per thread,
and AsyncSchedulerClient, many to an event loop, for the load generator."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

# One request should take milliseconds; anything near this means the scheduler is stuck or gone.
HTTP_TIMEOUT_S = 10.0


class TransportError(Exception):
    """The request did not get an HTTP answer (refused, reset, timed out, unknown host...)."""


class ApiError(Exception):
    """The scheduler answered with an error status."""

    def __init__(self, status: int, title: str, description: str) -> None:
        super().__init__(f"HTTP {status}" + "".join(f": {part}" for part in (title, description) if part))
        self.status = status
        self.title = title
        self.description = description


def normalize_url(text: str) -> str:
    """`host:8081` or `http://host:8081/` -> `http://host:8081`; raises ValueError when unusable."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: the scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"{text!r} has a malformed port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a query or fragment makes no sense here")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def schedule_body(command: str, delay_s: float) -> bytes:
    """The body of one POST /schedule; build it once and send the same bytes every time."""
    return json.dumps({"command": command, "delay_seconds": delay_s}).encode()


def batch_body(command: str, delay_s: float, size: int) -> bytes:
    """The body of one POST /tasks with `size` copies of the same task."""
    return json.dumps({"tasks": [{"command": command, "delay_seconds": delay_s}] * size}).encode()


class SchedulerClient:
    """One keep-alive connection to the scheduler. Not thread-safe: give each thread its own."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = connection_class(parts.hostname, parts.port, timeout=timeout_s)
        self._prefix = parts.path.rstrip("/")
        # Built once: http.client copies nothing, so every request reuses these objects.
        self._get_headers = {"Accept": "application/json"}
        if token:
            self._get_headers["Authorization"] = f"Bearer {token}"
        self._post_headers = {**self._get_headers, "Content-Type": "application/json"}

    def schedule(self, command: str, delay_s: float) -> dict[str, Any]:
        return self.post("/schedule", schedule_body(command, delay_s))

    def post(self, path: str, body: bytes) -> dict[str, Any]:
        """POST ready-made JSON bytes to `path`; the answer's JSON object."""
        return self._request("POST", path, body)

    def status(self, task_id: str) -> dict[str, Any]:
        return self._request("GET", f"/status?task_id={quote(task_id)}")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._request("POST", f"/tasks/{quote(task_id)}/cancel", b"")

    def close(self) -> None:
        self._conn.close()

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = self._get_headers if body is None else self._post_headers
        # A kept-alive connection may have been closed by the server while idle; the request then
        # never reached it, so it is safe to send once more on a fresh connection.
        for attempt in (1, 2):
            reused = self._conn.sock is not None
            try:
                self._conn.request(method, self._prefix + path, body=body, headers=headers)
                response = self._conn.getresponse()
                status, data = response.status, response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._conn.close()
                if not reused or attempt == 2:
                    raise TransportError(describe(exc)) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                raise TransportError(describe(exc)) from exc
        return _answer(status, data)


def _answer(status: int, data: bytes) -> dict[str, Any]:
    """The answer's JSON object; an ApiError for an error status."""
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    if not 200 <= status < 300:
        raise ApiError(status, str(doc.get("title", "")), str(doc.get("description", "")))
    return doc


class AsyncSchedulerClient:
    """One keep-alive connection over asyncio streams; many share one thread and its event loop.

    The load generator uses these: a thread per client with http.client costs the client several
    times the CPU per request, and threads waiting for the GIL add their own delays to the round
    trips it measures. Requests are written in one piece (head and body together); answers are read
    by Content-Length, which every answer of the scheduler has.
    """

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._timeout_s = timeout_s
        self._fixed_headers = f"Host: {parts.netloc}\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
        if token:
            self._fixed_headers += f"Authorization: Bearer {token}\r\n"
        self._heads: dict[tuple[str, int], bytes] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> dict[str, Any]:
        """POST ready-made JSON bytes to `path`; the answer's JSON object."""
        head = self._heads.get((path, len(body)))
        if head is None:
            head = self._heads[(path, len(body))] = (
                f"POST {self._prefix}{path} HTTP/1.1\r\n{self._fixed_headers}Content-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1")
        request = head + body
        # As SchedulerClient: a kept-alive connection the server closed while idle never got the
        # request, so it is sent once more on a fresh connection.
        for attempt in (1, 2):
            reused = self._writer is not None
            try:
                async with asyncio.timeout(self._timeout_s):
                    if self._writer is None:
                        self._reader, self._writer = await asyncio.open_connection(
                            self._host, self._port, ssl=self._tls)
                    assert self._reader is not None
                    self._writer.write(request)
                    status, data, close = await _read_answer(self._reader)
                break
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
                await self.close()
                if not reused or attempt == 2:
                    raise TransportError(describe(exc) if not isinstance(exc, asyncio.IncompleteReadError)
                                         else "the connection closed before an answer") from exc
            except (OSError, TimeoutError, ValueError, ssl.SSLError) as exc:
                await self.close()
                raise TransportError(describe(exc) if not isinstance(exc, TimeoutError)
                                     else f"no answer within {self._timeout_s:g} s") from exc
        if close:
            await self.close()
        return _answer(status, data)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection) of one HTTP/1.1 answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    length = None
    close = version == "HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
        elif name == "transfer-encoding":
            raise ValueError("a chunked answer; the scheduler always sends a Content-Length")
    if length is None:
        # Only an answer that ends the connection may go without a length.
        return int(status), await reader.read(), True
    return int(status), await reader.readexactly(length), close


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class ClientPool:
    """A SchedulerClient per thread, made on first use, all closed together at the end."""

    def __init__(self, factory: Callable[[], SchedulerClient]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[SchedulerClient] = []

    def get(self) -> SchedulerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory()
            with self._lock:
                self._clients.append(client)
        return client

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
