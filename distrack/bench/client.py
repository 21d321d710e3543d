"""A keep-alive HTTP client of the scheduler (standard library only), one per thread."""

from __future__ import annotations

import http.client
import json
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
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if not 200 <= status < 300:
            raise ApiError(status, str(doc.get("title", "")), str(doc.get("description", "")))
        return doc


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
