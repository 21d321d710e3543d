"""CoordinatorService: the gRPC handlers workers call (heartbeats, status reports, leaving)."""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence

import grpc

from distrack.config import CoordinatorConfig
from distrack.coordinator.registry import WorkerRegistry
from distrack.db.store import Attempt, EndedAttempt, TaskStore, any_requeued
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
        on_slots_freed: Callable[[], None] | None = None,
    ) -> None:
        """`on_slots_freed`: told when tasks ended and freed their slots (the dispatcher's
        slots_freed, which wakes the claim loop only if due tasks wait for slots); without it, such
        ends wake the loop."""
        self.store = store
        self.registry = registry
        self.config = config
        self.wakeup = wakeup
        self.on_slots_freed = on_slots_freed or wakeup.set
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
        stop: dict[str, bool] = {}  # task id -> whether because its cancel was asked
        prefetch = max(request.prefetch, 0)
        # Told to the worker only when its heartbeat is on record and its runs checked: it starts tasks
        # waiting for a slot only within that ttl (see HeartbeatResponse in the proto).
        ttl_s = 0.0
        try:
            if self.store.record_heartbeat(request.worker_id, request.address, request.slots, request.running_task_ids,
                                           listed, prefetch):
                log.info("worker %s joined at %s with %d slot(s) and %d to prefetch", request.worker_id,
                         request.address, request.slots, prefetch)
            # Runs, not every unfinished task: one whose run ended and whose final report is on its
            # way (or recorded, its answer not yet back) has nothing left to stop.
            stop = self.store.runs_to_stop(request.worker_id, request.running_task_ids)
            self._end_unlisted_runs(request)
            ttl_s = self.config.worker_ttl_s
        except DatabaseUnavailable as exc:
            # The worker is alive all the same; the rescue waits for the database to be back a while.
            log.warning("heartbeat of %s not recorded: %s", request.worker_id, exc)
            self.on_db_failure()
            if self.registry.get(request.worker_id) is None:
                return distrack_pb2.HeartbeatResponse()  # not on record: not dispatched to either
        if self.registry.heartbeat(request.worker_id, request.address, request.slots + prefetch,
                                   request.running_task_ids):
            self.wakeup.set()
        if stop:
            log.info("telling %s to stop %s", request.worker_id, ", ".join(stop))
        return distrack_pb2.HeartbeatResponse(stop_task_ids=list(stop), worker_ttl_s=ttl_s,
                                              cancel_task_ids=[t for t, cancel in stop.items() if cancel])

    def _end_unlisted_runs(self, request: distrack_pb2.HeartbeatRequest) -> None:
        grace_s = 2 * self.config.heartbeat_interval_s + 1.0
        lost = self.store.unlisted_runs(request.worker_id, request.unfinished_task_ids, grace_s)
        ended = [EndedAttempt(a, UNLISTED_ERROR.format(worker_id=request.worker_id)) for a in lost]
        statuses = self.store.end_attempts(ended, self.config.retry_delay_s)
        for task_id, status in statuses.items():
            log.warning("task %s: worker %s no longer runs it; now %s", task_id, request.worker_id, status)
            self.registry.release(request.worker_id, str(task_id))
        if statuses:
            self.on_slots_freed()
        if any_requeued(statuses):
            self.wakeup.set()

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
        ack = self._record_reports([request], context)[0]
        if ack.error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, ack.error)
        return ack

    def ReportTasks(self, request: distrack_pb2.TaskStatusReports, context: grpc.ServicerContext):
        return distrack_pb2.TaskStatusAcks(acks=self._record_reports(request.updates, context))

    def _record_reports(self, updates: Sequence[distrack_pb2.TaskStatusUpdate],
                        context: grpc.ServicerContext) -> list[distrack_pb2.TaskStatusAck]:
        """Records a batch of reports in at most four statements (starts, cancelled starts, successes,
        other ends) and one per task given back; a malformed report is answered with its error and the
        rest still recorded."""
        acks: list[distrack_pb2.TaskStatusAck | None] = [None] * len(updates)
        starts: list[tuple[int, Attempt, float | None]] = []
        completions: list[tuple[int, Attempt, int, float | None]] = []
        failures: list[tuple[int, EndedAttempt]] = []
        returns: list[tuple[int, Attempt]] = []
        for index, update in enumerate(updates):
            task_id = _uuid_or_none(update.task_id)
            problem = _report_problem(update, task_id)
            if task_id is None or problem:
                acks[index] = distrack_pb2.TaskStatusAck(error=problem)
                continue
            attempt = Attempt(task_id, update.lease, update.worker_id)
            started_at = update.started_at or None  # 0: the worker did not say (it never started it)
            if update.status == Status.INPROGRESS:
                starts.append((index, attempt, started_at))
                continue
            # The worker freed the slot before reporting; free it here even if the write below must
            # be retried, so the capacity shows at once.
            self.registry.release(update.worker_id, update.task_id)
            if update.status == Status.COMPLETED:
                completions.append((index, attempt, update.exit_code, started_at))
            elif update.status == Status.RETURNED:
                returns.append((index, attempt))
            else:
                # Postgres text cannot hold NUL; the rest of the message is kept as the worker wrote it.
                error = (update.error or f"exited with code {update.exit_code}").replace("\x00", "")
                failures.append((index, EndedAttempt(attempt, error, update.exit_code, started_at)))
        if completions or failures or returns:
            # The slots they freed (the dispatcher wakes its loop if tasks wait for them). What they
            # put back in the queue wakes the loop once written, in _record.
            self.on_slots_freed()
        try:
            recorded = self._record(starts, completions, failures, returns)
        except DatabaseUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except DataRejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for index, update in enumerate(updates):
            if acks[index] is None:
                acks[index] = distrack_pb2.TaskStatusAck(recorded=index in recorded)
                if index not in recorded:
                    log.info("stale %s report for %s (lease %d) from %s refused",
                             Status.Name(update.status), update.task_id, update.lease, update.worker_id)
        return acks  # type: ignore[return-value]

    def _record(self, starts: list[tuple[int, Attempt, float | None]],
                completions: list[tuple[int, Attempt, int, float | None]],
                failures: list[tuple[int, EndedAttempt]], returns: list[tuple[int, Attempt]]) -> set[int]:
        """The indexes of the reports recorded. Starts go first: a batch may hold a task's start and
        its end."""
        recorded: set[int] = set()
        if starts:
            running = self.store.mark_running_many([(a, at) for _, a, at in starts])
            recorded.update(i for i, a, _ in starts if a.task_id in running)
            # A start refused because of a cancel (or the retry of one whose answer was lost) ends
            # here: cancelled now (the refusal stops the run), rather than left picked or running.
            refused = [a for _, a, _ in starts if a.task_id not in running]
            for task_id in self.store.cancel_refused_starts(refused):
                log.info("task %s cancelled as it started", task_id)
        if completions:
            done = self.store.mark_completed_many([(a, code, at) for _, a, code, at in completions])
            recorded.update(i for i, a, _, _ in completions if a.task_id in done)
        if failures:
            ended = self.store.end_attempts([e for _, e in failures], self.config.retry_delay_s)
            recorded.update(i for i, e in failures if e.attempt.task_id in ended)
            if any_requeued(ended):
                self.wakeup.set()
        # Tasks a worker gives back before starting them (they waited too long for a slot there, or were
        # stopped): back to the queue as if never claimed, or cancelled. Rare, so one statement each.
        for index, attempt in returns:
            if self.store.unclaim(attempt):
                recorded.add(index)
                log.info("worker %s gave %s back before starting it", attempt.worker_id, attempt.task_id)
        if returns:
            self.wakeup.set()  # the tasks can be claimed only now
        return recorded


# The last second of year 9999: later than any start, and within what PostgreSQL's to_timestamp takes.
MAX_STARTED_AT = 253_402_300_799.0


def _report_problem(update: distrack_pb2.TaskStatusUpdate, task_id: uuid.UUID | None) -> str | None:
    """What is wrong with a report, if anything; `task_id` is its task_id parsed (None: not a UUID)."""
    if task_id is None:
        return f"task_id {update.task_id[:100]!r} is not a UUID"
    if not update.worker_id or "\x00" in update.worker_id:
        return "a status report needs a worker_id (without NUL characters)"
    if update.status not in (Status.INPROGRESS, Status.COMPLETED, Status.FAILED, Status.RETURNED):
        return f"unknown task status {update.status}"
    # Refused here, alone: PostgreSQL would refuse it too, but with the whole batch of reports it came in.
    if not (math.isfinite(update.started_at) and 0 <= update.started_at <= MAX_STARTED_AT):
        return f"started_at {update.started_at!r} is not a time in Unix seconds"
    return None


def _uuid_or_none(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
