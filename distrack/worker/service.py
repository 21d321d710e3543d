"""WorkerService: takes tasks from the coordinator while it has free slots and runs each on a thread.

Each task's thread spawns the command, reports INPROGRESS, waits, frees the slot, then reports
COMPLETED or FAILED. The slot is freed before the final report so the coordinator, which frees it on
that report, never sees a slot it cannot use.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import grpc

from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.worker.reporter import CoordinatorClient
from distrack.worker.runner import CommandRun, Outcome, output_path

log = logging.getLogger(__name__)

Status = distrack_pb2.TaskStatus


class WorkerService(distrack_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, slots: int, output_dir: Path, coordinator: CoordinatorClient) -> None:
        self.worker_id = worker_id
        self.slots = slots
        self.output_dir = output_dir
        self.coordinator = coordinator
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        # Tasks accepted whose final report has not been sent yet (a superset of _running).
        self._unfinished = 0
        self._accepting = True
        self._idle = threading.Condition(self._lock)

    def running_task_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def SubmitTask(self, request: distrack_pb2.TaskRequest, context: grpc.ServicerContext):
        try:
            task_id = str(uuid.UUID(request.task_id))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"task_id {request.task_id!r} is not a UUID")
        if not request.command:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "command is empty")
        with self._lock:
            if task_id in self._running:
                return distrack_pb2.TaskResponse(accepted=True, message="already running")
            if not self._accepting:
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
            if len(self._running) >= self.slots:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.slots} slot(s) are busy")
            thread = threading.Thread(
                target=self._run, args=(task_id, request), name=f"task-{task_id[:8]}", daemon=True
            )
            self._running[task_id] = thread
            self._unfinished += 1
        thread.start()
        return distrack_pb2.TaskResponse(accepted=True)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until every accepted task has run and been reported; False if not within `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout_s)

    def _run(self, task_id: str, request: distrack_pb2.TaskRequest) -> None:
        outcome: Outcome
        try:
            run = CommandRun(
                request.command,
                output_path(self.output_dir, self.worker_id, task_id),
                request.timeout_seconds,
            )
            try:
                run.start()
            except OSError as exc:
                outcome = Outcome(127, f"could not start the command: {exc}")
            else:
                self._report(task_id, request.attempt, Status.INPROGRESS)
                outcome = run.wait()
        except Exception as exc:  # a task thread must always free its slot and report
            log.exception("task %s crashed the worker's runner", task_id)
            outcome = Outcome(1, f"worker error: {exc}")
        finally:
            with self._lock:
                self._running.pop(task_id, None)
        status = Status.COMPLETED if outcome.succeeded else Status.FAILED
        try:
            self._report(task_id, request.attempt, status, outcome)
        finally:
            with self._lock:
                self._unfinished -= 1
                self._idle.notify_all()

    def _report(self, task_id: str, attempt: int, status: int, outcome: Outcome | None = None) -> None:
        update = distrack_pb2.TaskStatusUpdate(
            task_id=task_id,
            worker_id=self.worker_id,
            status=status,
            attempt=attempt,
            exit_code=outcome.exit_code if outcome else 0,
            error=(outcome.error or "") if outcome else "",
        )
        try:
            if not self.coordinator.report(update):
                log.info("coordinator ignored %s for %s (stale attempt %d)", Status.Name(status), task_id, attempt)
        except grpc.RpcError as exc:
            log.error("gave up reporting %s for %s: %s", Status.Name(status), task_id, exc.code())
