"""WorkerService: takes tasks from the coordinator while it has room and runs them.

A worker runs up to `slots` commands at once and takes up to `prefetch` more, which wait for a slot
in the order they came. Prefetching keeps the slots busy while the coordinator records a finished
task and sends the next one, and lets it send several at a time. A waiting task cannot start late
behind long runs for long: the worker takes none to wait while any of its commands has run for
LONG_RUN_S, and gives back (RETURNED: the coordinator puts it back in the queue, at no cost, or
ends it cancelled if that was asked) one that has waited GIVE_BACK_S, one that is stopped while it
waits (cancelled, or no longer this worker's), and those that wait when the worker starts to shut
down. A waiting task starts only while the coordinator answers heartbeats (heard_from_coordinator).

Each task has a thread of a pool, and a task that finds a free slot starts at once: the coordinator's
committed claim (this worker, this lease) is what lets it run, and a dispatch is taken only before its
call's deadline, which the coordinator's rescue counts on (see the dispatcher). The start report
(INPROGRESS) then says when it started; if the coordinator refuses it (the attempt is no longer this
worker's, or was cancelled), the run is stopped. When it ends, the slot is freed and the final report
(COMPLETED or FAILED, with the start time too, in case the start report was lost) queued; the task
stays "unfinished", and listed in heartbeats, until that report is settled. The slot is freed before
the final report so the coordinator, which frees it on that report, never sees a slot it cannot use.
A run is stopped early when it is cancelled, when a heartbeat says this worker no longer owns it, or
when the worker shuts down; its final report still goes out and ends the attempt.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.worker.environment import TaskEnvironment
from distrack.worker.reporter import ReportBatcher
from distrack.worker.runner import CommandRun, Outcome, output_path

log = logging.getLogger(__name__)

Status = distrack_pb2.TaskStatus
Refusal = distrack_pb2.Refusal
# The error of a run stopped because its cancel was asked.
CANCELLED = "cancelled"
NOT_OWNER = "stopped: the coordinator no longer assigns this attempt to this worker"
SHUTDOWN = "stopped: the worker shut down before the task finished"
START_REFUSED = "stopped: the coordinator did not record its start (cancelled, or no longer this worker's)"
# A worker with a command running this long takes no task to wait for a slot: its slots may not
# free soon.
LONG_RUN_S = 0.5
# A task that has waited this long for a slot goes back to the coordinator, for another worker.
GIVE_BACK_S = 2.0
# The status a single SubmitTask call fails with, for each reason a task is refused.
REFUSAL_CODES = {
    Refusal.FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
    Refusal.OLDER_DISPATCH: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass
class Run:
    attempt: int
    lease: int
    command: CommandRun
    started_at: float = 0.0  # Unix seconds, set as the command is spawned


class WorkerService(distrack_pb2_grpc.WorkerServicer):
    def __init__(
        self, worker_id: str, slots: int, output_dir: Path, reports: ReportBatcher,
        *, default_timeout_s: float = 0.0, task_env: TaskEnvironment | None = None, prefetch: int = 0,
    ) -> None:
        self.worker_id = worker_id
        # Never the worker's own environment, even when the caller gives no task environment. Tasks
        # run in the worker's working directory, which serve() makes the task directory.
        self.task_env = task_env or TaskEnvironment(Path.cwd())
        self.slots = slots
        self.prefetch = max(prefetch, 0)
        self.output_dir = output_dir
        self.reports = reports
        self.default_timeout_s = default_timeout_s
        self._lock = threading.Lock()
        # Taken and not ended: running, or waiting for a slot.
        self._runs: dict[str, Run] = {}
        # The ones waiting, in the order they came, each woken on its own (only the first in line can
        # take a freed slot: waking them all for every slot would cost a thread switch each); and how
        # many slots are in use.
        self._waiting: deque[str] = deque()
        self._turns: dict[str, threading.Condition] = {}
        self._busy_slots = 0
        # Until when (monotonic) a waiting task may start: see heard_from_coordinator.
        self._contact_until = 0.0
        # Tasks accepted whose final report is not settled yet (a superset of _runs), with the lease of
        # that report: heartbeats list them, so the coordinator can tell a report in flight from one
        # that was lost. (A task given back may come again, with a new lease, before the report that
        # gave it back is settled: settling that one must not drop the new run.)
        self._unfinished: dict[str, int] = {}
        self._accepting = True
        self._idle = threading.Condition(self._lock)
        self._threads = ThreadPoolExecutor(max(slots + self.prefetch, 1), thread_name_prefix="task")

    # --- what the heartbeat says

    def running_task_ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def unfinished_leases(self) -> dict[str, int]:
        """Each unfinished task with the lease of its run: what a heartbeat lists (the ids), and what an
        answer telling it to stop some of them refers to (those runs, not later ones)."""
        with self._lock:
            return dict(self._unfinished)

    def advertised_slots(self) -> int:
        """Zero once shutting down, so no coordinator counts on this worker any more."""
        with self._lock:
            return self.slots if self._accepting else 0

    def advertised_prefetch(self) -> int:
        """How many tasks it would take now beyond its slots."""
        with self._lock:
            return self._prefetch_now()

    def _prefetch_now(self) -> int:
        """Holds _lock."""
        if not self._accepting:
            return 0
        long_since = time.time() - LONG_RUN_S
        if any(0 < run.started_at <= long_since for run in self._runs.values()):
            return 0
        return self.prefetch

    def heard_from_coordinator(self, sent_at: float, worker_ttl_s: float) -> None:
        """A heartbeat sent at `sent_at` (monotonic) was answered by a coordinator that declares a
        worker lost after `worker_ttl_s` of silence (0: it has no record of this worker). A waiting task
        starts only within half that ttl of the heartbeat: a worker cut off from its coordinators must
        not start tasks that may already be rescued and running elsewhere. (A task that finds a free
        slot as it is taken needs no such check: its dispatch's deadline bounds it; see the module
        docstring.)"""
        if worker_ttl_s <= 0:
            return
        with self._lock:
            self._contact_until = max(self._contact_until, sent_at + worker_ttl_s / 2)
            self._wake_first()

    # --- gRPC

    def SubmitTasks(self, request: distrack_pb2.TaskBatch, context: grpc.ServicerContext):
        return distrack_pb2.TaskBatchResponse(results=self._accept(request.tasks, _expired(context)))

    def SubmitTask(self, request: distrack_pb2.TaskRequest, context: grpc.ServicerContext):
        result = self._accept([request], _expired(context))[0]
        if not result.accepted:
            context.abort(REFUSAL_CODES[result.refusal], result.message)
        return result

    def _accept(self, requests, expired: bool = False) -> list[distrack_pb2.TaskResponse]:  # noqa: ANN001 - a repeated TaskRequest
        """Takes each task it has room for (none once the call's deadline has passed); starts the ones
        that find a free slot, and queues the others for one."""
        results: list[distrack_pb2.TaskResponse] = []
        accepted: list[tuple[str, Run, bool]] = []
        with self._lock:
            for request in requests:
                if expired:
                    results.append(distrack_pb2.TaskResponse(
                        task_id=request.task_id, refusal=Refusal.EXPIRED, message="the dispatch arrived too late"))
                    continue
                task_id, refusal, message = self._admit(request)
                if refusal == Refusal.REFUSAL_UNSPECIFIED and message is None:
                    run = Run(request.attempt, request.lease, self._command_run(task_id, request))
                    self._runs[task_id] = run
                    self._unfinished[task_id] = request.lease
                    slot_free = self._busy_slots < self.slots and not self._waiting
                    if slot_free:
                        self._busy_slots += 1
                    else:
                        self._waiting.append(task_id)
                        self._turns[task_id] = threading.Condition(self._lock)
                    accepted.append((task_id, run, slot_free))
                results.append(distrack_pb2.TaskResponse(
                    task_id=request.task_id, accepted=refusal == Refusal.REFUSAL_UNSPECIFIED, refusal=refusal,
                    message=message or ""))
        for n, (task_id, run, slot_free) in enumerate(accepted):
            # The first one starts on this thread, with no hand-off between its dispatch and its start;
            # the others start (or wait for a slot) in parallel on their own threads. Each waits on its own
            # thread.
            first = n == 0 and slot_free
            start_error = self._start(task_id, run) if first else None
            self._threads.submit(self._run, task_id, run, first, start_error, not slot_free)
        return results

    def _admit(self, request: distrack_pb2.TaskRequest) -> tuple[str, int, str | None]:
        """(canonical task id, refusal, message); no refusal and no message means a new run. Holds _lock."""
        try:
            task_id = str(uuid.UUID(request.task_id))
        except ValueError:
            return request.task_id, Refusal.INVALID, f"task_id {request.task_id[:100]!r} is not a UUID"
        if not request.command:
            return task_id, Refusal.INVALID, "command is empty"
        run = self._runs.get(task_id)
        if run is not None:
            if run.lease == request.lease:
                return task_id, Refusal.REFUSAL_UNSPECIFIED, "already running"
            return task_id, Refusal.OLDER_DISPATCH, f"still running an older dispatch of this task (lease {run.lease})"
        if not self._accepting:
            return task_id, Refusal.SHUTTING_DOWN, "worker is shutting down"
        if len(self._runs) >= self.slots + self._prefetch_now():
            waiting = f" and {len(self._waiting)} task(s) wait for one" if self._waiting else ""
            return task_id, Refusal.FULL, f"all {self.slots} slot(s) are busy{waiting}"
        return task_id, Refusal.REFUSAL_UNSPECIFIED, None

    def CancelTask(self, request: distrack_pb2.CancelTaskRequest, context: grpc.ServicerContext):
        with self._lock:
            run = self._runs.get(request.task_id)
        if run is None:
            return distrack_pb2.CancelTaskResponse(found=False)
        log.info("cancelling %s", request.task_id)
        self._stop_run(request.task_id, run, CANCELLED, cancelled=True)
        return distrack_pb2.CancelTaskResponse(found=True)

    # --- stopping runs

    def stop_runs(self, task_ids: Iterable[str], reason: str) -> None:
        with self._lock:
            runs = [(t, self._runs[t]) for t in task_ids if t in self._runs]
        self._stop_each(runs, reason)

    def stop_listed_runs(self, listed: Mapping[str, int], reason: str, *, cancelled: bool = False) -> None:
        """Stops the runs of these tasks that still have the listed leases. A heartbeat's answer says
        which tasks to stop as of the heartbeat; by the time it arrives, a task named in it may have been
        given back and sent here again, and that newer run is not the one it meant."""
        with self._lock:
            runs = [(t, run) for t, lease in listed.items() if (run := self._runs.get(t)) is not None
                    and run.lease == lease]
        self._stop_each(runs, reason, cancelled=cancelled)

    def _stop_each(self, runs: list[tuple[str, Run]], reason: str, *, cancelled: bool = False) -> None:
        for task_id, run in runs:
            log.warning("stopping %s: %s", task_id, reason)
            self._stop_run(task_id, run, reason, cancelled=cancelled)

    def _stop_run(self, task_id: str, run: Run, reason: str, *, cancelled: bool = False) -> None:
        run.command.stop(reason, cancelled=cancelled)
        with self._lock:
            if (turn := self._turns.get(task_id)) is not None:
                turn.notify()  # it waits for a slot no more

    def stop_accepting(self) -> None:
        """Takes no more tasks; the ones waiting for a slot go back to the coordinator."""
        with self._lock:
            self._accepting = False
            for turn in self._turns.values():
                turn.notify()

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until every accepted task has run and been reported; False if not within `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._unfinished, timeout_s)

    def stop_all(self, timeout_s: float) -> bool:
        """Stops every run still going and waits (up to `timeout_s`) for their reports."""
        self.stop_runs(self.running_task_ids(), SHUTDOWN)
        return self.wait_idle(timeout_s)

    # --- one task

    def close(self) -> None:
        """Releases the task threads (after stop_all or wait_idle)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _command_run(self, task_id: str, request: distrack_pb2.TaskRequest) -> CommandRun:
        return CommandRun(
            request.command,
            output_path(self.output_dir, self.worker_id, task_id),
            request.timeout_seconds or self.default_timeout_s,
            self.task_env.for_task(task_id, request.attempt, self.worker_id),
        )

    def _start(self, task_id: str, run: Run) -> Outcome | None:
        """Spawns the command (its start time taken just before) and queues the start report; returns
        the Outcome of a run that could not start, else None. Never raises."""
        try:
            run.started_at = time.time()
            try:
                run.command.start()
            except OSError as exc:
                return Outcome(127, f"could not start the command: {exc}")
            if run.command.child is None:  # stopped before it began: no start to report
                run.started_at = 0.0
                return None
            start = self.reports.submit([self._update(task_id, run, Status.INPROGRESS)])[0]
            start.add_done_callback(lambda f: self._start_settled(task_id, run, f))
            return None
        except Exception as exc:  # the run still frees its slot and reports (see _run)
            log.exception("task %s could not be started", task_id)
            return Outcome(1, f"worker error: {exc}")

    def _run(self, task_id: str, run: Run, started: bool = False, start_error: Outcome | None = None,
             waits: bool = False) -> None:
        """Waits for a slot when `waits` (or gives the task back), starts the task (unless `started`,
        with `start_error` as that start's result), waits for it, frees its slot and queues its final
        report."""
        if waits and (why := self._take_slot(task_id, run)) is not None:
            log.info("giving %s back before starting it: %s", task_id, why)
            self._report_end(task_id, run, Status.RETURNED)
            return
        outcome: Outcome | None = None
        try:
            outcome = start_error if started else self._start(task_id, run)
            # Waited for even after a worker error (no child outlives its report); wait() also answers
            # for a run stopped before it began.
            if outcome is None or run.command.child is not None:
                waited = run.command.wait()
                outcome = outcome or waited
        except Exception as exc:  # a started task must always free its slot and report
            log.exception("task %s crashed the worker's runner", task_id)
            outcome = Outcome(1, f"worker error: {exc}")
        finally:
            with self._lock:
                if self._runs.get(task_id) is run:
                    del self._runs[task_id]
                self._busy_slots -= 1
                self._wake_first()
            if outcome is None:
                self._finished(task_id, run.lease)
            else:
                status = Status.COMPLETED if outcome.succeeded else Status.FAILED
                self._report_end(task_id, run, status, outcome)

    def _take_slot(self, task_id: str, run: Run) -> str | None:
        """Waits until the task is first in line, a slot is free and the coordinator was heard from
        recently (heard_from_coordinator), and takes the slot (None); or says why the task goes back
        instead, taken off this worker's runs: it was stopped (cancelled, no longer this worker's), the
        worker is shutting down, or it waited GIVE_BACK_S. A task given back never ran, so the
        coordinator puts it back in the queue at no cost, or ends it cancelled if that was asked."""
        give_back_at = time.monotonic() + GIVE_BACK_S
        with self._lock:
            while True:
                why = run.command.stop_reason
                if why is None and not self._accepting:
                    why = "the worker is shutting down"
                if why is None and self._waiting[0] == task_id and self._busy_slots < self.slots \
                        and time.monotonic() < self._contact_until:
                    self._busy_slots += 1
                elif why is None and time.monotonic() < give_back_at:
                    self._turns[task_id].wait(give_back_at - time.monotonic())
                    continue
                else:
                    why = why or f"it waited {GIVE_BACK_S:g} s for a slot"
                    if self._runs.get(task_id) is run:
                        del self._runs[task_id]
                self._waiting.remove(task_id)
                del self._turns[task_id]
                self._wake_first()  # the next in line may go now
                return why

    def _wake_first(self) -> None:
        """Wakes the first task in line, which may take a free slot now. Holds _lock."""
        if self._waiting:
            self._turns[self._waiting[0]].notify()

    def _report_end(self, task_id: str, run: Run, status: int, outcome: Outcome | None = None) -> None:
        try:
            final = self.reports.submit([self._update(task_id, run, status, outcome)])[0]
        except Exception:  # the reporter was closed (shutdown): nothing more can be said
            log.error("could not queue the %s report for %s", Status.Name(status), task_id)
            self._finished(task_id, run.lease)
        else:
            final.add_done_callback(lambda f: self._final_settled(task_id, run.lease, status, f))

    def _start_settled(self, task_id: str, run: Run, report: Future) -> None:
        """A refused start means the run is not (or no longer) this worker's: it is stopped. A start
        not delivered is not: the final report records the start too."""
        if report.exception() is not None:
            return  # the report thread crashed, and said why
        recorded = report.result()
        if recorded is None:
            log.error("gave up reporting the start of %s", task_id)
        elif not recorded:
            with self._lock:
                running = self._runs.get(task_id) is run
            if running:
                log.info("coordinator refused the start of %s; stopping it", task_id)
                run.command.stop(START_REFUSED)

    def _final_settled(self, task_id: str, lease: int, status: int, report: Future) -> None:
        try:
            self._settled(task_id, status, report.result())
        finally:
            self._finished(task_id, lease)

    def _finished(self, task_id: str, lease: int) -> None:
        with self._lock:
            if self._unfinished.get(task_id) == lease:
                del self._unfinished[task_id]
            self._idle.notify_all()

    def _update(self, task_id: str, run: Run, status: int, outcome: Outcome | None = None
                ) -> distrack_pb2.TaskStatusUpdate:
        return distrack_pb2.TaskStatusUpdate(
            task_id=task_id,
            worker_id=self.worker_id,
            status=status,
            attempt=run.attempt,
            lease=run.lease,
            exit_code=outcome.exit_code if outcome else 0,
            error=(outcome.error or "") if outcome else "",
            cancelled=outcome.cancelled if outcome else False,
            started_at=run.started_at,
        )

    @staticmethod
    def _settled(task_id: str, status: int, recorded: bool | None) -> bool:
        """Logs how a report ended (True recorded, False refused as stale, None not delivered)."""
        if recorded is None:
            log.error("gave up reporting %s for %s", Status.Name(status), task_id)
        elif not recorded:
            log.info("coordinator refused %s for %s (its lease is not current)", Status.Name(status), task_id)
        return bool(recorded)


def _expired(context: grpc.ServicerContext) -> bool:
    """Whether the call's deadline has passed: the caller counts on nothing being taken after it."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
