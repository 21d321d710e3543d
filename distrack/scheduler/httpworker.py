"""A gunicorn worker class that gives every keep-alive connection a thread of its own.

gunicorn's gthread worker hands each request of a keep-alive connection from its poller thread to a
thread pool and back: a selector registration, a future and a wake-up pipe per request, which cost
more CPU than parsing the request and running the app together. API clients here keep their
connection and send request after request on it, so a thread per connection, blocking on its own
socket, serves each request with no hand-off at all. Only connection setup and shutdown involve the
main thread.

The main thread accepts connections (at most `worker_connections` open at once; more wait in the
listen backlog), tells the arbiter it is alive, and on shutdown stops accepting, wakes the idle
connections so they close, and gives busy ones `graceful_timeout` to finish their request.

A request avoids system calls that let go of the GIL for nothing: the connection threads share one
GIL, and each such call makes the thread queue for it again (a futex wait and wake). So a plain TCP
connection stays a blocking socket with its read and write timeouts kept by the kernel (SO_RCVTIMEO,
SO_SNDTIMEO), not by Python, whose socket timeouts poll before every recv and send; and the body of a
request the app read to its end is not "discarded" afterwards, which in gunicorn sets the socket's
timeout three times. Counted with `perf stat` over 5 s of POST /schedule load from 16 clients, per
request: 3.0 ioctl and 3.3 poll calls before, none and 1.3 after; 10.4 futex calls before, 8.7 after;
7.9 context switches before, 6.8 after. TLS connections keep Python's timeouts: the ssl module would
retry a TLS read that timed out in the kernel without end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from datetime import datetime
from typing import Any

from gunicorn import http, sock, util
from gunicorn.http import wsgi
from gunicorn.http.body import LengthReader
from gunicorn.workers import base

# How often the main thread tells the arbiter it is alive when nothing else wakes it.
HEARTBEAT_S = 1.0
# How long a new connection may take to send its first request, and the longest wait for more of a
# request under way (a stall in the headers closes the connection; in a body, the app's read fails).
READ_TIMEOUT_S = 30.0
# At most this long is spent discarding a body the app left unread before the next request.
BODY_DRAIN_S = 1.0
_DISCONNECTS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
# accept() failing for want of a file descriptor, socket buffer or memory: the process is at a limit,
# not broken. The connection stays in the listen backlog; accepting resumes once a connection closes,
# or after this long.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF_S = 0.1


class _ResponseBuffer:
    """Stands in for the client socket while a response is written, so the status line, headers and
    body leave in one send: gunicorn writes the headers and the body separately, and over a
    TCP_NODELAY connection each send is a packet and a wake-up of the client."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._parts: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self._parts.append(data)

    def fileno(self) -> int:
        # Whoever wants the descriptor writes to it directly: what came before goes first.
        self.flush()
        return self._sock.fileno()

    def sendfile(self, *args: Any, **kwargs: Any) -> int:
        self.flush()
        return self._sock.sendfile(*args, **kwargs)

    def send(self, data: bytes) -> int:
        self.flush()
        return self._sock.send(data)

    def flush(self) -> None:
        if self._parts:
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts.clear()
            self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ConnectionThreadWorker(base.Worker):
    """gunicorn worker: one thread per connection, serving its requests one after another."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_changed = threading.Condition()
        self._stop_r = self._stop_w = -1
        self._out_of_resources = False  # logged once per episode, not once per retry
        self._quick_exit = False

    def init_process(self) -> None:
        # Readable once shutdown begins; every idle connection polls it beside its socket. Never
        # drained, and non-blocking, so a signal handler's write cannot block.
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.alive = False
        self._wake_connections()

    def handle_quit(self, sig: int, frame: Any) -> None:
        # A quick shutdown (the arbiter got SIGINT or SIGQUIT): gunicorn's own workers exit at once,
        # dropping the requests under way, and so does this one, without the graceful wait.
        self._quick_exit = True
        super().handle_quit(sig, frame)

    def _wake_connections(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already full of wake-ups
            os.write(self._stop_w, b"x")

    def run(self) -> None:
        for listener in self.sockets:
            listener.setblocking(False)
        selector = selectors.DefaultSelector()
        for listener in self.sockets:
            selector.register(listener, selectors.EVENT_READ)
        selector.register(self.PIPE[0], selectors.EVENT_READ)
        try:
            while self.alive:
                self.notify()
                if not self._parent_alive():
                    break
                if not self._room_for_a_connection(HEARTBEAT_S):
                    continue
                for key, _ in selector.select(HEARTBEAT_S):
                    if key.fileobj == self.PIPE[0]:
                        self._drain_wakeups()
                    else:
                        self._accept_all(key.fileobj)
        finally:
            selector.close()
            self._shut_down()

    def _parent_alive(self) -> bool:
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            return False
        return True

    def _room_for_a_connection(self, timeout: float) -> bool:
        with self._open_changed:
            return self._open_changed.wait_for(
                lambda: len(self._open) < self.cfg.worker_connections or not self.alive, timeout)

    def _drain_wakeups(self) -> None:
        try:
            os.read(self.PIPE[0], 64)
        except BlockingIOError:
            pass

    def _accept_all(self, listener: socket.socket) -> None:
        while self.alive and len(self._open) < self.cfg.worker_connections:
            try:
                client, addr = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                    return
                if exc.errno in _OUT_OF_RESOURCES:
                    self._back_off(f"cannot accept connections ({os.strerror(exc.errno)}) with {len(self._open)} open")
                    return
                raise
            util.close_on_exec(client)
            with self._open_changed:
                self._open.add(client)
            try:
                threading.Thread(target=self._serve, args=(listener, client, addr), daemon=True,
                                 name="http-connection").start()
            except RuntimeError:  # no thread to be had: close this one rather than leave it unserved
                self._close(client)
                self._back_off(f"cannot start a thread for a connection with {len(self._open)} open")
                return
            if self._out_of_resources:
                self._out_of_resources = False
                self.log.warning("accepting connections again")

    def _close(self, client: socket.socket) -> None:
        """Closes a connection the main thread could not hand to a thread: at once, not the graceful
        close (with its lingering read) a serving thread does, which would hold up accepting."""
        with contextlib.suppress(OSError):
            client.close()
        with self._open_changed:
            self._open.discard(client)
            self._open_changed.notify_all()

    def _back_off(self, why: str) -> None:
        """Stops accepting until a connection closes, or ACCEPT_BACKOFF_S (the main thread goes on
        telling the arbiter it is alive)."""
        if not self._out_of_resources:
            self._out_of_resources = True
            self.log.warning("%s; connections wait in the listen backlog meanwhile", why)
        with self._open_changed:
            self._open_changed.wait(ACCEPT_BACKOFF_S)

    def _shut_down(self) -> None:
        """Idle connections close when the stop pipe wakes them; busy ones finish their request (and
        then close) within the graceful timeout."""
        self.alive = False
        self._wake_connections()
        if self._quick_exit:
            return  # the connection threads are daemons: they end with the process
        deadline = time.monotonic() + self.cfg.graceful_timeout
        with self._open_changed:
            while self._open and time.monotonic() < deadline:
                self.notify()
                self._open_changed.wait(min(HEARTBEAT_S, max(0.0, deadline - time.monotonic())))

    def _next_request_arrives(self, client: socket.socket, parser: Any, poller: select.poll,
                              timeout_s: float) -> bool:
        """Waits for a request on an idle connection: False on shutdown or after `timeout_s`."""
        if parser.unreader.buf.getvalue():  # pipelined behind the last one, already read
            return True
        if isinstance(client, ssl.SSLSocket) and client.pending():
            return True
        events = poller.poll(max(1, int(timeout_s * 1000)))
        return bool(events) and all(fd != self._stop_r for fd, _ in events)

    def _serve(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        req = None
        conn = client
        try:
            if self.cfg.is_ssl:
                conn.settimeout(READ_TIMEOUT_S)
                conn = sock.ssl_wrap_socket(conn, self.cfg)
            else:
                _set_kernel_timeouts(conn, READ_TIMEOUT_S)
            parser = http.get_parser(self.cfg, conn, addr)
            server = listener.getsockname()
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            # A new connection gets as long as a stalled request to send its first one (a TLS
            # handshake included); an idle kept-alive one gets the keep-alive timeout. Shutdown wakes
            # either.
            wait_s = READ_TIMEOUT_S
            while self.alive and self._next_request_arrives(conn, parser, poller, wait_s):
                req = next(parser)
                if not self._handle_request(req, conn, addr, server):
                    break
                # A body the app did not read (a 413, say) is discarded before the next request, but
                # only so much of it and for so long: beyond that the connection closes instead. One it
                # read to its end leaves nothing to discard: the parser forgets the request, so the next
                # one does not go through the discarding either (see the module docstring).
                if _body_fully_read(req):
                    parser.mesg = None
                elif not parser.finish_body(deadline=time.monotonic() + BODY_DRAIN_S):
                    break
                req = None
                wait_s = self.cfg.keepalive
        except (http.errors.NoMoreData, StopIteration):
            pass
        except (TimeoutError, BlockingIOError):  # BlockingIOError: a kernel timeout (EAGAIN)
            self.log.debug("Closing a connection that stopped sending.")
        except ssl.SSLError as exc:
            if exc.args[0] != ssl.SSL_ERROR_EOF:
                self.handle_error(req, conn, addr, exc)
        except OSError as exc:
            if exc.errno not in _DISCONNECTS:
                self.log.exception("Socket error processing request.")
        except Exception as exc:
            self.handle_error(req, conn, addr, exc)
        finally:
            try:
                util.close_graceful(conn)
            finally:
                with self._open_changed:
                    self._open.discard(client)
                    self._open_changed.notify_all()

    def _handle_request(self, req: Any, conn: socket.socket, addr: Any, server: Any) -> bool:
        """Serves one request; True when the connection stays open for another."""
        environ: dict = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            started = datetime.now()
            out = _ResponseBuffer(conn)
            resp, environ = wsgi.create(req, out, addr, server, self.cfg)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if not self.alive or not self.cfg.keepalive:
                resp.force_close()
            body = self.wsgi(environ, resp.start_response)
            if not self.alive:  # shutdown began while the app ran: say so in this response's headers
                resp.force_close()
            try:
                if isinstance(body, environ["wsgi.file_wrapper"]):
                    resp.write_file(body)
                else:
                    for chunk in body:
                        resp.write(chunk)
                resp.close()
                out.flush()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(body, "close"):
                    body.close()
            return not resp.should_close()
        except OSError:
            raise
        except (Exception, SystemExit):
            if resp is not None and resp.headers_sent:
                # A second status line on a response already under way would corrupt it.
                self.log.exception("Error handling request")
                raise StopIteration() from None
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")


def _set_kernel_timeouts(conn: socket.socket, timeout_s: float) -> None:
    """Makes `conn` a blocking socket whose every recv and send fails (BlockingIOError, EAGAIN) after
    `timeout_s` without progress, as Python's own timeout would (TimeoutError), without its polls."""
    conn.settimeout(None)
    seconds = int(timeout_s)
    interval = struct.pack("@ll", seconds, int((timeout_s - seconds) * 1_000_000))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)


def _body_fully_read(req: Any) -> bool:
    """Whether all of a request's body has been taken from the connection (or it had none): its length
    was known and nothing of it is left there. What gunicorn read ahead for the app and the app left is
    gone with the request. False for any body gunicorn reads another way (chunked), or a body whose
    reading failed."""
    body = getattr(req, "body", None)
    reader = getattr(body, "reader", None)
    return isinstance(reader, LengthReader) and reader.length == 0 and getattr(body, "failed", False) is False
