"""A WSGI app for tests/test_httpworker.py, served by gunicorn with distrack's connection worker."""

from __future__ import annotations

import os
import threading
import time

from distrack.scheduler import httpworker

# The tests of stalled clients wait this long, not the 30 s a real client gets (read at each connection).
if os.environ.get("TEST_READ_TIMEOUT_S"):
    httpworker.READ_TIMEOUT_S = float(os.environ["TEST_READ_TIMEOUT_S"])

_served = 0
_lock = threading.Lock()


def app(environ, start_response):  # noqa: ANN001, ANN201 - WSGI
    global _served
    path = environ["PATH_INFO"]
    with _lock:
        _served += 1
        count = _served
    if path == "/boom":
        raise RuntimeError("the app failed")
    if path == "/noread":  # answers without reading the body, as a 413 does
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    if path == "/readsome":  # reads the first 10 bytes of the body and leaves the rest
        first = environ["wsgi.input"].read(10)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(first)))])
        return [first]
    if path == "/slow":
        if environ.get("HTTP_X_STARTED_MARKER"):  # tells the test the request is under way
            open(environ["HTTP_X_STARTED_MARKER"], "w").close()
        time.sleep(float(environ.get("QUERY_STRING") or "1"))
    body = environ["wsgi.input"].read() if environ.get("CONTENT_LENGTH") else b""
    payload = f"{path} {count} ".encode() + body
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(payload)))])
    return [payload]
