"""CoordinatorService: the gRPC handlers workers call (heartbeats, status reports, leaving)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import grpc

from distrack.config import CoordinatorConfig
from distrack.coordinator.registry import WorkerRegistry
from distrack.db.store import Attempt, EndedAttempt, TaskStore
from distrack.errors import DatabaseUnavailable, DataRejected
from distrack.rpc import distrack_pb2, distrack_pb2_grpc

log = logging.getLogger(__name__)

Status = distrack_pb2.TaskStatus
WORKER_LEFT_ERROR = "worker {worker_id} left before finishing it"
UNLISTED_ERROR = "worker {worker_id} no longer runs it (its report was lost)"


class CoordinatorService(distrack_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        store: TaskStore,
        registry: WorkerRegistry,
        config: CoordinatorConfig,
        wakeup: threading.Event,
        on_db_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.wakeup = wakeup
        # Told when a heartbeat could not be recorded, so no worker is declared lost for silence
        # the database never got to hear.
        self.on_db_failure = on_db_failure

    def Heartbeat(self, request: distrack_pb2.HeartbeatRequest, context: grpc.ServicerContext):
        if not request.worker_id or not request.address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a heartbeat needs worker_id and address")
        # Validated here, not by the database: unfinished_task_ids (a superset of the running ones)
        # goes into SQL, where a malformed id would be a DataError rather than the caller's mistake.
        listed = [*request.running_task_ids, *request.unfinished_task_ids]
        if any(_uuid_or_none(t) is None for t in listed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "running_task_ids and unfinished_task_ids must be UUIDs")
        stop: list[str] = []
        try:
            if self.store.record_heartbeat(request.worker_id, request.address, request.slots, request.running_task_ids):
                log.info("worker %s joined at %s with %d slot(s)", request.worker_id, request.address, request.slots)
            stop = self.store.runs_to_stop(request.worker_id, request.unfinished_task_ids)
            self._end_unlisted_runs(request)
        except DatabaseUnavailable as exc:
            # The worker is alive all the same; the rescue waits for the database to be back a while.
            log.warning("heartbeat of %s not recorded: %s", request.worker_id, exc)
            self.on_db_failure()
            if self.registry.get(request.worker_id) is None:
                return distrack_pb2.HeartbeatResponse()  # not on record: not dispatched to either
        if self.registry.heartbeat(request.worker_id, request.address, request.slots, request.running_task_ids):
            self.wakeup.set()
        if stop:
            log.info("telling %s to stop %s", request.worker_id, ", ".join(stop))
        return distrack_pb2.HeartbeatResponse(stop_task_ids=stop)

    def _end_unlisted_runs(self, request: distrack_pb2.HeartbeatRequest) -> None:
        grace_s = 2 * self.config.heartbeat_interval_s + 1.0
        lost = self.store.unlisted_runs(request.worker_id, request.unfinished_task_ids, grace_s)
        ended = [EndedAttempt(a, UNLISTED_ERROR.format(worker_id=request.worker_id)) for a in lost]
        for task_id, status in self.store.end_attempts(ended, self.config.retry_delay_s).items():
            log.warning("task %s: worker %s no longer runs it; now %s", task_id, request.worker_id, status)
            self.registry.release(request.worker_id, str(task_id))

    def Deregister(self, request: distrack_pb2.DeregisterRequest, context: grpc.ServicerContext):
        if not request.worker_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id is required")
        try:
            self.store.delete_worker(request.worker_id)
            held = self.store.worker_attempts(request.worker_id)
            left = [EndedAttempt(a, WORKER_LEFT_ERROR.format(worker_id=request.worker_id)) for a, started in held
                    if started]
            self.store.end_attempts(left, self.config.retry_delay_s)
            for attempt, started in held:
                if not started:
                    self.store.unclaim(attempt)
        except DatabaseUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        self.registry.remove(request.worker_id)
        log.info("worker %s left", request.worker_id)
        return distrack_pb2.DeregisterResponse()

    def UpdateTaskStatus(self, request: distrack_pb2.TaskStatusUpdate, context: grpc.ServicerContext):
        task_id = _uuid_or_none(request.task_id)
        if task_id is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"task_id {request.task_id!r} is not a UUID")
        if not request.worker_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a status report needs worker_id")
        if request.status not in (Status.INPROGRESS, Status.COMPLETED, Status.FAILED):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown task status {request.status}")
        attempt = Attempt(task_id, request.lease, request.worker_id)
        final = request.status in (Status.COMPLETED, Status.FAILED)
        if final:
            # The worker freed the slot before reporting; free it here even if the write below must
            # be retried, so the capacity shows at once.
            self.registry.release(request.worker_id, request.task_id)
            self.wakeup.set()
        try:
            recorded = self._record(attempt, request)
        except DatabaseUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except DataRejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not recorded:
            log.info("stale %s report for %s (lease %d) from %s refused",
                     Status.Name(request.status), task_id, request.lease, request.worker_id)
        return distrack_pb2.TaskStatusAck(recorded=recorded)

    def _record(self, attempt: Attempt, request: distrack_pb2.TaskStatusUpdate) -> bool:
        if request.status == Status.INPROGRESS:
            if self.store.mark_running(attempt):
                return True
            # Refused. If a cancel is why, the start (or the retry of one whose answer was lost) ends
            # here: cancelled now, rather than left picked or running with nothing behind it.
            if self.store.cancel_refused_start(attempt):
                log.info("task %s cancelled before its start on %s", attempt.task_id, attempt.worker_id)
            return False
        if request.status == Status.COMPLETED:
            return self.store.mark_completed(attempt, request.exit_code)
        error = request.error or f"exited with code {request.exit_code}"
        ended = EndedAttempt(attempt, error, request.exit_code)
        return bool(self.store.end_attempts([ended], self.config.retry_delay_s))


def _uuid_or_none(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
