"""The worker process: gRPC server, heartbeat thread and task threads, with one shutdown path.

Concurrency: threads. SubmitTask runs on the gRPC server's pool and returns at once; each accepted
task runs on its own thread (at most `slots`); one thread sends heartbeats.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from distrack.config import WorkerConfig
from distrack.process import grpc_server
from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.worker.identity import advertised_address, new_worker_id
from distrack.worker.reporter import CoordinatorClient
from distrack.worker.service import WorkerService

log = logging.getLogger(__name__)

GRPC_THREADS = 8
# On SIGTERM, how long running tasks get to finish before the worker exits anyway.
SHUTDOWN_GRACE_S = 30.0


class Heartbeats:
    """Sends a heartbeat at once, then every interval, until stopped."""

    def __init__(self, client: CoordinatorClient, service: WorkerService, address: str, interval_s: float) -> None:
        self.client = client
        self.service = service
        self.address = address
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 1)

    def _run(self) -> None:
        reachable = True
        while not self._stop.is_set():
            request = distrack_pb2.HeartbeatRequest(
                worker_id=self.service.worker_id,
                address=self.address,
                slots=self.service.slots,
                running_task_ids=self.service.running_task_ids(),
            )
            try:
                self.client.heartbeat(request, timeout_s=self.interval_s)
                if not reachable:
                    log.info("coordinator %s reachable again", self.client.target)
                reachable = True
            except grpc.RpcError as exc:
                if reachable:
                    log.warning("heartbeat to %s failed: %s", self.client.target, exc.code().name)
                reachable = False
            self._stop.wait(self.interval_s)


def serve(config: WorkerConfig, stop: threading.Event) -> None:
    """Runs a worker until `stop` is set."""
    server, port = grpc_server(config.listen, GRPC_THREADS)
    worker_id = new_worker_id(port)
    address = advertised_address(config.listen, port, config.coordinator, config.advertise_host)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Reports keep retrying through a shutdown's grace period; the stop event only ends their waits.
    reports_stop = threading.Event()
    client = CoordinatorClient(
        config.coordinator.dial_target(), report_retry_s=config.report_retry_s, stop=reports_stop
    )
    service = WorkerService(worker_id, config.slots, output_dir, client)
    distrack_pb2_grpc.add_WorkerServicer_to_server(service, server)
    heartbeats = Heartbeats(client, service, address, config.heartbeat_interval_s)
    try:
        server.start()
        heartbeats.start()
        log.info(
            "worker %s listening on port %d, advertised as %s, coordinator %s, %d slot(s), output in %s",
            worker_id,
            port,
            address,
            client.target,
            config.slots,
            output_dir.resolve(),
        )
        stop.wait()
    finally:
        # Order: refuse new tasks, let running ones finish and report, then go quiet.
        service.stop_accepting()
        server.stop(grace=1.0)
        if not service.wait_idle(SHUTDOWN_GRACE_S):
            log.warning("tasks still running after %.0f s: %s", SHUTDOWN_GRACE_S, service.running_task_ids())
        heartbeats.stop()
        reports_stop.set()
        client.close()
        log.info("worker %s stopped", worker_id)
