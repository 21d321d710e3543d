"""WorkerService: takes tasks from the coordinator while it has free slots and runs each on a thread.

Each task's thread reports INPROGRESS and spawns the command only once the coordinator has recorded
it (the start fence: a stale or duplicate dispatch never runs anything), waits, frees the slot, then
reports COMPLETED or FAILED. The slot is freed before the final report so the coordinator, which
frees it on that report, never sees a slot it cannot use. A run is stopped early when it is
cancelled, when a heartbeat says this worker no longer owns it, or when the worker shuts down; its
final report still goes out and ends the attempt.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.worker.environment import TaskEnvironment
from distrack.worker.reporter import CoordinatorClient
from distrack.worker.runner import CommandRun, Outcome, output_path

log = logging.getLogger(__name__)

Status = distrack_pb2.TaskStatus
NOT_OWNER = "stopped: the coordinator no longer assigns this attempt to this worker"
SHUTDOWN = "stopped: the worker shut down before the task finished"


@dataclass
class Run:
    attempt: int
    lease: int
    command: CommandRun


class WorkerService(distrack_pb2_grpc.WorkerServicer):
    def __init__(
        self, worker_id: str, slots: int, output_dir: Path, coordinator: CoordinatorClient,
        *, default_timeout_s: float = 0.0, task_env: TaskEnvironment | None = None,
    ) -> None:
        self.worker_id = worker_id
        # Never the worker's own environment, even when the caller gives no task environment.
        self.task_env = task_env or TaskEnvironment(Path.cwd())
        self.slots = slots
        self.output_dir = output_dir
        self.coordinator = coordinator
        self.default_timeout_s = default_timeout_s
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        # Tasks accepted whose final report is not settled yet (a superset of _runs): heartbeats
        # list them, so the coordinator can tell a report in flight from one that was lost.
        self._unfinished: set[str] = set()
        self._accepting = True
        self._idle = threading.Condition(self._lock)

    # --- what the heartbeat says

    def running_task_ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def unfinished_task_ids(self) -> list[str]:
        with self._lock:
            return list(self._unfinished)

    def advertised_slots(self) -> int:
        """Zero once shutting down, so no coordinator counts on this worker any more."""
        with self._lock:
            return self.slots if self._accepting else 0

    # --- gRPC

    def SubmitTask(self, request: distrack_pb2.TaskRequest, context: grpc.ServicerContext):
        try:
            task_id = str(uuid.UUID(request.task_id))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"task_id {request.task_id!r} is not a UUID")
        if not request.command:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "command is empty")
        with self._lock:
            run = self._runs.get(task_id)
            if run is not None:
                if run.lease == request.lease:
                    return distrack_pb2.TaskResponse(accepted=True, message="already running")
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"still running an older dispatch of this task (lease {run.lease})")
            if not self._accepting:
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
            if len(self._runs) >= self.slots:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.slots} slot(s) are busy")
            run = Run(request.attempt, request.lease, self._command_run(task_id, request))
            self._runs[task_id] = run
            self._unfinished.add(task_id)
        threading.Thread(target=self._run, args=(task_id, run), name=f"task-{task_id[:8]}", daemon=True).start()
        return distrack_pb2.TaskResponse(accepted=True)

    def CancelTask(self, request: distrack_pb2.CancelTaskRequest, context: grpc.ServicerContext):
        with self._lock:
            run = self._runs.get(request.task_id)
        if run is None:
            return distrack_pb2.CancelTaskResponse(found=False)
        log.info("cancelling %s", request.task_id)
        run.command.stop("cancelled", cancelled=True)
        return distrack_pb2.CancelTaskResponse(found=True)

    # --- stopping runs

    def stop_runs(self, task_ids: list[str], reason: str) -> None:
        with self._lock:
            runs = [(t, self._runs[t]) for t in task_ids if t in self._runs]
        for task_id, run in runs:
            log.warning("stopping %s: %s", task_id, reason)
            run.command.stop(reason)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until every accepted task has run and been reported; False if not within `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._unfinished, timeout_s)

    def stop_all(self, timeout_s: float) -> bool:
        """Stops every run still going and waits (up to `timeout_s`) for their reports."""
        self.stop_runs(self.running_task_ids(), SHUTDOWN)
        return self.wait_idle(timeout_s)

    # --- one task

    def _command_run(self, task_id: str, request: distrack_pb2.TaskRequest) -> CommandRun:
        return CommandRun(
            request.command,
            output_path(self.output_dir, self.worker_id, task_id),
            request.timeout_seconds or self.default_timeout_s,
            self.task_env.for_task(task_id, request.attempt, self.worker_id),
            cwd=self.task_env.task_dir,
        )

    def _run(self, task_id: str, run: Run) -> None:
        outcome: Outcome | None = None
        try:
            if not self._report(task_id, run, Status.INPROGRESS):
                # Not this worker's to run (stale, cancelled, or the coordinator stayed unreachable
                # until shutdown): nothing started, so there is nothing to report either.
                log.info("not starting %s: the coordinator did not record its start", task_id)
                return
            try:
                run.command.start()
            except OSError as exc:
                outcome = Outcome(127, f"could not start the command: {exc}")
            else:
                outcome = run.command.wait()
        except Exception as exc:  # a started task must always free its slot and report
            log.exception("task %s crashed the worker's runner", task_id)
            outcome = Outcome(1, f"worker error: {exc}")
        finally:
            with self._lock:
                self._runs.pop(task_id, None)
            try:
                if outcome is not None:
                    status = Status.COMPLETED if outcome.succeeded else Status.FAILED
                    self._report(task_id, run, status, outcome)
            finally:
                with self._lock:
                    self._unfinished.discard(task_id)
                    self._idle.notify_all()

    def _report(self, task_id: str, run: Run, status: int, outcome: Outcome | None = None) -> bool | None:
        """Sends a report; True if recorded, False if refused as stale, None if it could not be sent."""
        update = distrack_pb2.TaskStatusUpdate(
            task_id=task_id,
            worker_id=self.worker_id,
            status=status,
            attempt=run.attempt,
            lease=run.lease,
            exit_code=outcome.exit_code if outcome else 0,
            error=(outcome.error or "") if outcome else "",
            cancelled=outcome.cancelled if outcome else False,
        )
        try:
            recorded = self.coordinator.report(update)
        except (grpc.RpcError, ValueError) as exc:  # ValueError: the channel was closed at shutdown
            code = exc.code().name if isinstance(exc, grpc.RpcError) else exc
            log.error("gave up reporting %s for %s: %s", Status.Name(status), task_id, code)
            return None
        if not recorded:
            log.info("coordinator refused %s for %s (lease %d is not current)", Status.Name(status), task_id,
                     run.lease)
        return recorded
