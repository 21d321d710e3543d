"""The coordinator process: gRPC server, LISTEN thread and dispatcher, with one shutdown path.

Concurrency: threads. gRPC handlers run on the server's thread pool, the dispatcher on its own
thread (with a pool for SubmitTasks calls), the listener on another; all share one psycopg pool.
"""

from __future__ import annotations

import logging
import threading

from distrack.config import CoordinatorConfig
from distrack.coordinator.dispatcher import Dispatcher, WorkerClients
from distrack.coordinator.registry import WorkerRegistry
from distrack.coordinator.service import CoordinatorService
from distrack.db.listener import Listener
from distrack.db.pool import make_pool
from distrack.db.store import CANCEL_CHANNEL, QUEUED_CHANNEL, TaskStore
from distrack.process import freeze_startup_objects, grpc_server, wait_for_stop
from distrack.rpc import distrack_pb2_grpc

log = logging.getLogger(__name__)

GRPC_THREADS = 32
SHUTDOWN_GRACE_S = 5.0


def serve(config: CoordinatorConfig, stop: threading.Event) -> None:
    """Runs the coordinator until `stop` is set."""
    # Enough for every gRPC handler and the dispatcher's threads at once, so a burst of heartbeats
    # does not starve the dispatcher (or the other way round).
    pool = make_pool(config.database_url, max_size=GRPC_THREADS + 4, name="coordinator")
    store = TaskStore(pool)
    registry = WorkerRegistry(refusal_backoff_s=config.heartbeat_interval_s)
    wakeup = threading.Event()
    clients = WorkerClients(config.security, reconnect_s=config.heartbeat_interval_s)
    dispatcher = Dispatcher(store, registry, config, wakeup, clients)
    listener = Listener(config.database_url, [QUEUED_CHANNEL, CANCEL_CHANNEL], dispatcher.on_notify)
    server, port = grpc_server(config.listen, GRPC_THREADS, config.security)
    service = CoordinatorService(store, registry, config, wakeup, on_slots_freed=dispatcher.slots_freed)
    distrack_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    try:
        server.start()
        listener.start()
        dispatcher.start()
        log.info("coordinator listening on %s (port %d)", config.listen.bind_target(), port)
        freeze_startup_objects()
        wait_for_stop(stop)
    finally:
        # Order: stop claiming first, then stop taking reports (letting in-flight ones finish),
        # then the listener, then the pool everything above used.
        dispatcher.stop()
        server.stop(SHUTDOWN_GRACE_S).wait()
        listener.stop()
        pool.close()
        log.info("coordinator stopped")
