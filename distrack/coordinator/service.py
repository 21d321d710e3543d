"""CoordinatorService: the gRPC handlers workers call (heartbeats and status reports)."""

from __future__ import annotations

import logging
import threading
import uuid

import grpc

from distrack.config import CoordinatorConfig
from distrack.coordinator.registry import WorkerRegistry
from distrack.db.store import TaskStore
from distrack.errors import DatabaseUnavailable
from distrack.rpc import distrack_pb2, distrack_pb2_grpc

log = logging.getLogger(__name__)

Status = distrack_pb2.TaskStatus


class CoordinatorService(distrack_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        store: TaskStore,
        registry: WorkerRegistry,
        config: CoordinatorConfig,
        wakeup: threading.Event,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.wakeup = wakeup

    def Heartbeat(self, request: distrack_pb2.HeartbeatRequest, context: grpc.ServicerContext):
        if not request.worker_id or not request.address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a heartbeat needs worker_id and address")
        if self.registry.heartbeat(request.worker_id, request.address, request.slots, request.running_task_ids):
            log.info("worker %s joined at %s with %d slot(s)", request.worker_id, request.address, request.slots)
            self.wakeup.set()
        return distrack_pb2.HeartbeatResponse()

    def UpdateTaskStatus(self, request: distrack_pb2.TaskStatusUpdate, context: grpc.ServicerContext):
        try:
            task_id = uuid.UUID(request.task_id)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"task_id {request.task_id!r} is not a UUID")
        if not request.worker_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a status report needs worker_id")
        if request.status not in (Status.INPROGRESS, Status.COMPLETED, Status.FAILED):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown task status {request.status}")
        final = request.status in (Status.COMPLETED, Status.FAILED)
        if final:
            # The worker freed the slot before reporting; free it here even if the write below must
            # be retried, so the capacity shows at once.
            self.registry.release(request.worker_id, request.task_id)
            self.wakeup.set()
        try:
            recorded = self._record(task_id, request)
        except DatabaseUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if not recorded:
            log.info(
                "stale %s report for %s attempt %d from %s ignored",
                Status.Name(request.status),
                task_id,
                request.attempt,
                request.worker_id,
            )
        return distrack_pb2.TaskStatusAck(recorded=recorded)

    def _record(self, task_id: uuid.UUID, request: distrack_pb2.TaskStatusUpdate) -> bool:
        if request.status == Status.INPROGRESS:
            return self.store.mark_running(task_id, request.attempt, request.worker_id)
        if request.status == Status.COMPLETED:
            return self.store.mark_completed(task_id, request.attempt, request.worker_id, request.exit_code)
        if request.status == Status.FAILED:
            new_status = self.store.mark_failed(
                task_id,
                request.attempt,
                request.worker_id,
                request.exit_code,
                request.error or None,
                self.config.retry_delay_s,
            )
            return new_status is not None
        raise AssertionError(request.status)
