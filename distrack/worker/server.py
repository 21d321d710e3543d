"""The worker process: gRPC server, heartbeat thread and task threads, with one shutdown path.

Concurrency: threads. SubmitTasks runs on the gRPC server's pool and returns at once; each accepted
task runs on a thread of a pool of `slots` + `prefetch`; one thread sends status reports, one heartbeats.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import grpc

from distrack.config import WorkerConfig
from distrack.process import freeze_startup_objects, grpc_server, wait_for_stop
from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.transport import describe_rpc_error
from distrack.worker.environment import TaskEnvironment, prepare_task_dir
from distrack.worker.identity import advertised_address, new_worker_id
from distrack.worker.reporter import CoordinatorClient, ReportBatcher
from distrack.worker.service import CANCELLED, NOT_OWNER, WorkerService

log = logging.getLogger(__name__)

GRPC_THREADS = 8
# After the grace period, stopped runs get this long to die and be reported.
STOP_REPORT_S = 10.0


class Heartbeats:
    """Sends a heartbeat at once, then at a fixed rate, until stopped; stops the runs it is told to."""

    def __init__(self, client: CoordinatorClient, service: WorkerService, address: str,
                 interval_s: float) -> None:
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
        self._thread.join(self.interval_s + 5)

    def _run(self) -> None:
        reachable = True
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                listed = self.service.unfinished_leases()
                request = distrack_pb2.HeartbeatRequest(
                    worker_id=self.service.worker_id,
                    address=self.address,
                    slots=self.service.advertised_slots(),
                    prefetch=self.service.advertised_prefetch(),
                    running_task_ids=self.service.running_task_ids(),
                    unfinished_task_ids=list(listed),
                )
                # Bounded so one slow answer does not push the next heartbeat late.
                sent_at = time.monotonic()
                reply = self.client.heartbeat(request, timeout_s=max(self.interval_s, 1.0))
                if not reachable:
                    log.info("coordinator %s reachable again", self.client.target)
                reachable = True
                if reply.stop_task_ids:
                    stops = {t: listed[t] for t in reply.stop_task_ids if t in listed}
                    # A cancel that the heartbeat brings before CancelTask does is still a cancel.
                    cancels = set(reply.cancel_task_ids)
                    self.service.stop_listed_runs({t: lease for t, lease in stops.items() if t not in cancels},
                                                  NOT_OWNER)
                    self.service.stop_listed_runs({t: lease for t, lease in stops.items() if t in cancels},
                                                  CANCELLED, cancelled=True)
                # After the stops: a waiting task this answer says to stop is not started on its strength.
                self.service.heard_from_coordinator(sent_at, reply.worker_ttl_s)
            except grpc.RpcError as exc:
                if reachable:
                    log.warning("heartbeat to %s failed: %s", self.client.target, describe_rpc_error(exc))
                reachable = False
            except Exception:  # the heartbeat must go on: without it the worker is declared lost
                log.exception("heartbeat failed")
            # A fixed rate: the interval runs from one heartbeat's start to the next one's.
            next_at = max(next_at + self.interval_s, time.monotonic())
            self._stop.wait(next_at - time.monotonic())


def serve(config: WorkerConfig, stop: threading.Event) -> None:
    """Runs a worker until `stop` is set, then shuts down gracefully."""
    task_env = TaskEnvironment(prepare_task_dir(config.task_dir), config.task_env_allow)
    server, port = grpc_server(config.listen, GRPC_THREADS, config.security)
    worker_id = new_worker_id(port)
    address = advertised_address(config.listen, port, config.coordinators[0], config.advertise_host)
    output_dir = Path(config.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    # Reports keep retrying through the shutdown grace; this event ends them once the worker is done.
    reports_stop = threading.Event()
    client = CoordinatorClient(
        [c.dial_target() for c in config.coordinators], report_retry_s=config.report_retry_s, stop=reports_stop,
        security=config.security, reconnect_s=config.heartbeat_interval_s,
    )
    reports = ReportBatcher(client).start()
    # Tasks start in the task directory: the worker makes it its own working directory (every path it
    # uses is absolute or already open by now), since posix_spawn, the cheap way to start them, cannot
    # change directory for the child.
    os.chdir(task_env.task_dir)
    service = WorkerService(worker_id, config.slots, output_dir, reports, default_timeout_s=config.task_timeout_s,
                            task_env=task_env, prefetch=config.prefetch)
    distrack_pb2_grpc.add_WorkerServicer_to_server(service, server)
    heartbeats = Heartbeats(client, service, address, config.heartbeat_interval_s)
    try:
        server.start()
        heartbeats.start()
        log.info("worker %s listening on port %d, advertised as %s, coordinator %s, %d slot(s) and %d to prefetch, "
                 "output in %s", worker_id, port, address, ",".join(client.targets), config.slots, config.prefetch,
                 output_dir.resolve())
        task_env.log_summary()
        freeze_startup_objects()
        wait_for_stop(stop)
    finally:
        # Order: take no new task (heartbeats now advertise no slot), let running ones finish within
        # the grace period (cancels still reach them), stop what is left and report it (attempts left
        # retry elsewhere), leave the registry, and only then go quiet.
        service.stop_accepting()
        if not service.wait_idle(config.shutdown_grace_s):
            log.warning("tasks still running after %.0f s: %s; stopping them", config.shutdown_grace_s,
                        service.running_task_ids())
            if not service.stop_all(STOP_REPORT_S):
                log.error("some reports could not be sent before exiting")
        heartbeats.stop()
        client.deregister(worker_id)
        server.stop(grace=1.0).wait()
        reports_stop.set()
        reports.close()
        service.close()
        client.close()
        log.info("worker %s stopped (%d status report(s) sent in %d call(s))", worker_id, reports.sent, reports.calls)
