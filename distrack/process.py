"""What every long-running distrack process shares: logging, a gRPC server, a stop signal."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from distrack.config import Address
from distrack.transport import TransportSecurity, add_port, server_interceptors

# Refuse to share a port: grpc sets SO_REUSEPORT by default, which would let a second worker bind
# the same port silently and steal half its connections.
GRPC_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


PR_SET_DUMPABLE = 4


def shield_process() -> bool:
    """Makes this process non-dumpable: the kernel then gives its /proc files to root, so the tasks
    a worker runs (as the same ordinary user) can neither read /proc/<pid>/environ of any distrack
    process, where DATABASE_URL or the cluster token may be, nor attach a debugger to it. Children
    that execute another program (task commands, gunicorn's re-exec, `distrack up`'s services) get
    the flag reset by the kernel; forked ones (gunicorn workers) keep it. A worker run as root gives
    its tasks root, which reads anything anyway. Returns whether it took effect (Linux only); side
    effect: no core dumps.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def freeze_startup_objects() -> int:
    """Puts every object alive now (modules, classes, the service's long-lived state) out of the cyclic
    garbage collector's reach, once the service is up. A full collection over a service's ~46,000
    startup objects takes about 30 ms here, a pause with the GIL held that lands on whatever is under
    way (a pickup's p99); afterwards collections look only at what was made since. Returns how many
    objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def setup_logging(service: str) -> None:
    level = os.environ.get("DISTRACK_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def grpc_server(listen: Address, threads: int,
                security: TransportSecurity | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server bound to `listen` (not started), secured as `security` says; returns it with the
    port it got."""
    security = security or TransportSecurity()
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=GRPC_SERVER_OPTIONS,
                         interceptors=server_interceptors(security))
    try:
        port = add_port(server, listen.bind_target(), security)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen.bind_target()}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen.bind_target()} (address in use?)")
    logging.getLogger(__name__).info("gRPC on port %d: %s", port, security.describe())
    return server, port


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the main thread waits on it, then shuts down in order."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


# How often the main thread looks at signals delivered to another thread (see wait_for_stop).
SIGNAL_CHECK_S = 0.2


def wait_for_stop(stop: threading.Event) -> None:
    """Blocks the main thread until `stop` is set by a signal handler.

    Not `stop.wait()`: the kernel hands a process's signal to any thread that does not block it, and
    when that is not the main thread, Python only runs the handler once the main thread wakes up, which
    an untimed wait never does. A timed wait wakes it often enough.
    """
    while not stop.wait(SIGNAL_CHECK_S):
        pass
