"""Dispatcher: the coordinator's loop that claims due tasks and hands them to workers.

Concurrency: two threads. The dispatcher thread only claims: it reserves free slots round-robin,
claims that many due tasks in one short transaction that names each task's worker, and dispatches
them after it has committed (one SubmitTasks call per worker, started without waiting for it). It
wakes on any of: a NOTIFY of new tasks, a freed slot or a new worker (set by the gRPC handlers), the
next due `scheduled_at`, or the poll interval. The housekeeping thread, so that no due task waits for
its queries:
1. refreshes the worker registry from the database (shared by every coordinator);
2. rescues attempts whose worker went silent and dispatches never acknowledged, but only once the
   database has been reachable for a whole worker ttl (after an outage or a restart of this
   coordinator, heartbeats need that long to be on record again);
3. asks workers to stop cancelled tasks (at once on a NOTIFY of a cancel, and at every sweep).
Each SubmitTasks answer is read as it comes, on gRPC's own thread, and the tasks a worker did not take
are passed on from a thread pool (that takes a statement, and calls to other workers), so one slow
worker never holds up the others; CancelTask calls run on a small pool of their own, one at a time
per task and worker, so cancels piling up for a silent worker never delay a dispatch.

A worker starts what it takes at once, or as a slot frees when it takes the task to wait for one (its
prefetch): the committed claim (worker and lease) is what lets it run.
So a task moves to another worker only on an answer that says the first did not take it (a refusal,
or a call that never reached it). After a call that may have reached the worker (a timeout, a
connection lost mid-call) the task stays that worker's: it runs there, or the worker's heartbeats
show it does not hold it and the rescue puts it back in the queue. Every dispatch must reach its
worker within half the acknowledgement bound of its claim (its call deadline, which the worker
checks), so a heartbeat recorded a whole bound after the claim shows all a worker can ever take.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from distrack.config import CoordinatorConfig
from distrack.coordinator.registry import WorkerInfo, WorkerRegistry
from distrack.db.store import Attempt, ClaimedTask, EndedAttempt, TaskStore, any_requeued
from distrack.errors import DatabaseUnavailable
from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.transport import TransportSecurity, client_channel

log = logging.getLogger(__name__)

# Batching under load: while due tasks wait for slots (the last claim took all the room there was
# and found at least as many due) and that claim was less than BUSY_WINDOW_S ago, the loop waits up
# to LINGER_S after a wake-up, so the slots freed meanwhile are claimed and sent together (a statement
# and a call cost far more CPU than another task in them). Otherwise it claims at once: a task that
# finds a free slot is never held back, however often tasks come (at 100 a second, one every 10 ms,
# lingering after every wake-up added 5 ms to each pickup).
BUSY_WINDOW_S = 0.01
LINGER_S = 0.005
# When due rows exist but another coordinator holds their locks, look again this soon.
LOCKED_ROWS_RETRY_S = 0.01
# Backoff while the database is unreachable.
DB_RETRY_MAX_S = 2.0
# The ordinary ways a worker says no (full, leaving or unreachable, running an older dispatch of
# the task); other failures are logged louder.
REFUSED_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS}
# Call failures that show the worker's handler never ran: the tasks can go to another worker. (gRPC
# cannot say whether an UNAVAILABLE call was sent, except when no connection could be made.)
NEVER_REACHED_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                       grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
NOT_CONNECTED_DETAILS = "failed to connect to all addresses"
# When the last claim left nothing due, a claim reserves at most this many slots: a wake-up on an idle
# queue most often brings one task, and a claim over every worker's room (prefetch included, tens of
# slots) costs that task's pickup more in the statement and the reservations. A claim that fills
# them all is followed at once by one over all the room.
IDLE_CLAIM_LIMIT = 4
# A dispatch is not started with less time than this left before its deadline.
MIN_DISPATCH_S = 0.05
# Passing on refused tasks holds a thread through each further call (at most dispatch_timeout_s
# each): enough that workers slow to answer leave threads for the others. CancelTask calls have a
# pool of their own, so a pile of them (a silent worker with many cancels pending) never holds up a
# dispatch.
DISPATCH_THREADS = 64
CANCEL_THREADS = 4
# A new task due this long after the loop's planned wake-up is left to that wake-up (which looks up
# the next due time) rather than waking the loop now. The margin covers a coordinator clock behind
# the database's by up to this much.
NOTIFY_CLOCK_MARGIN_S = 1.0
CANCEL_TIMEOUT_S = 5.0
# stop() waits for the answers of the calls under way this much longer than a call may take.
STOP_ANSWERS_MARGIN_S = 5.0

WORKER_LOST_ERROR = "worker {worker_id} was lost (no heartbeat for {silent})"
UNACKNOWLEDGED_ERROR = "dispatched to worker {worker_id}, which does not hold it {ack_timeout_s:g} s later"


class WorkerClients:
    """One gRPC channel per worker, reused for every call, keyed by worker id (a new worker at an
    old address gets a channel of its own)."""

    def __init__(self, security: TransportSecurity | None = None, reconnect_s: float | None = None) -> None:
        """`reconnect_s`: the longest a lost connection to a worker waits before the next try (without
        a bound, a worker cut off for a few seconds would then be sent nothing for seconds more)."""
        self._security = security or TransportSecurity()
        self._reconnect_s = reconnect_s
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[str, grpc.Channel, distrack_pb2_grpc.WorkerStub]] = {}

    def stub(self, worker: WorkerInfo) -> distrack_pb2_grpc.WorkerStub:
        with self._lock:
            entry = self._stubs.get(worker.worker_id)
            if entry is not None and entry[0] == worker.address:
                return entry[2]
            if entry is not None:
                entry[1].close()
            channel = client_channel(worker.address, self._security, reconnect_s=self._reconnect_s)
            stub = distrack_pb2_grpc.WorkerStub(channel)
            self._stubs[worker.worker_id] = (worker.address, channel, stub)
            return stub

    def forget(self, worker_id: str) -> None:
        with self._lock:
            entry = self._stubs.pop(worker_id, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        with self._lock:
            entries, self._stubs = list(self._stubs.values()), {}
        for _, channel, _ in entries:
            channel.close()


class Dispatcher:
    def __init__(
        self,
        store: TaskStore,
        registry: WorkerRegistry,
        config: CoordinatorConfig,
        wakeup: threading.Event,
        clients: WorkerClients | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.wakeup = wakeup
        self.clients = clients or WorkerClients()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(DISPATCH_THREADS, thread_name_prefix="dispatch")
        self._cancel_pool = ThreadPoolExecutor(CANCEL_THREADS, thread_name_prefix="cancel")
        # (task id, worker id) of the CancelTask calls queued or under way: each sweep asks again for
        # every pending cancel, and a silent worker would otherwise pile up copies of the same call.
        self._cancels_sent: set[tuple[str, str]] = set()
        self._cancels_sent_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._housekeeper: threading.Thread | None = None
        self._chores = threading.Event()  # wakes the housekeeping thread (a cancel, stopping)
        # Rescue waits until the database has been reachable this long (see the module docstring).
        self._db_ok_since = time.monotonic()
        self._next_refresh = 0.0
        self._next_sweep = 0.0
        self._last_claim = 0.0
        # Whether the last claim found more due than it took (or found due rows locked): see IDLE_CLAIM_LIMIT.
        self._backlog = True
        # Whether due tasks wait for slots: the last claim took all the room there was and found at
        # least as many due, or there was no room at all. Freed slots wake the loop only then
        # (slots_freed); see also BUSY_WINDOW_S.
        self._short_of_slots = False
        # When the sleeping loop wakes up by itself (monotonic); infinity while it is awake.
        self._sleep_until = math.inf
        # While the loop is awake: the earliest due time (monotonic, clock margin taken off) of the
        # new tasks announced meanwhile. Its claim may have looked up the next due time before they
        # were there, so its next sleep ends by then.
        self._announced_due = math.inf
        self._plan_lock = threading.Lock()  # _sleep_until and _announced_due change together
        # Task ids whose cancel was announced by NOTIFY, or None meaning "look them all up".
        self._cancels: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.dispatched = 0  # tasks a worker accepted from this coordinator (logged at shutdown)
        self.dispatch_calls = 0
        self._dispatched_lock = threading.Lock()
        # SubmitTasks answers not yet handled (stop waits for them before the call pool goes).
        self._answers_owed = 0
        self._answers_changed = threading.Condition()

    # --- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="dispatcher", daemon=True)
        self._thread.start()
        self._housekeeper = threading.Thread(target=self.run_housekeeping, name="housekeeping", daemon=True)
        self._housekeeper.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops claiming; dispatches not yet sent go back to the queue; calls under way finish."""
        self._stop.set()
        self.wakeup.set()
        self._chores.set()
        for thread in (self._thread, self._housekeeper):
            if thread is not None:
                thread.join(timeout)
        with self._answers_changed:  # each call ends within the dispatch timeout
            self._answers_changed.wait_for(lambda: self._answers_owed == 0,
                                           self.config.dispatch_timeout_s + STOP_ANSWERS_MARGIN_S)
        self._pool.shutdown(wait=True)
        self._cancel_pool.shutdown(wait=True, cancel_futures=True)  # the next sweep, anywhere, asks again
        self.clients.close()
        log.info("dispatched %d task(s) in %d call(s)", self.dispatched, self.dispatch_calls)

    def note_db_failure(self) -> None:
        """Something could not be written (a heartbeat, say): restart the wait before any rescue."""
        self._db_ok_since = time.monotonic()

    def on_notify(self, channel: str, payload: str | None) -> None:
        """The Listener's callback: new tasks wake the loop, unless they are due after it wakes anyway;
        cancels go to the housekeeping thread."""
        if channel == "distrack_cancel":
            self._cancels.put(payload)
            self._chores.set()
        elif self._wakes_the_loop(payload):
            self.wakeup.set()

    def _wakes_the_loop(self, payload: str | None) -> bool:
        """Whether new tasks (payload: their earliest scheduled_at, epoch seconds on the database's
        clock) must wake the loop now. A sleeping loop wakes only for tasks due before its own wake-up
        (margin included); an awake one notes when they are due, and its next sleep ends by then, so
        tasks scheduled for later cost no claim however fast they come."""
        due = _monotonic_due(payload) - NOTIFY_CLOCK_MARGIN_S
        with self._plan_lock:
            if self._sleep_until == math.inf:
                self._announced_due = min(self._announced_due, due)
                return False
            return due < self._sleep_until

    def slots_freed(self) -> None:
        """Tasks ended and freed their slots: wakes the loop if due tasks wait for slots. Otherwise
        its last claim took everything due, and what comes due later wakes it by itself (a NOTIFY, or
        its planned wake-up), so a claim now would find nothing: at a moderate rate, one wasted
        statement per task."""
        if self._short_of_slots:
            self.wakeup.set()

    def run(self) -> None:
        self._loop("dispatcher", self.run_once, self._sleep)

    def run_housekeeping(self) -> None:
        self._loop("housekeeping", self.housekeeping_once, self._chores.wait)

    def _loop(self, name: str, step: Callable[[], float], wait: Callable[[float], object]) -> None:
        """Runs `step` until stopped, waiting as long as it says (with backoff while the database is
        unreachable)."""
        db_delay = 0.1
        while not self._stop.is_set():
            try:
                wait_s = step()
                db_delay = 0.1
            except DatabaseUnavailable as exc:
                log.warning("%s: %s; retrying in %.1f s", name, exc, db_delay)
                self._db_ok_since = time.monotonic()
                wait_s, db_delay = db_delay, min(db_delay * 2, DB_RETRY_MAX_S)
            except Exception:
                log.exception("%s step failed", name)
                wait_s = self.config.poll_interval_s
            wait(wait_s)

    def _sleep(self, wait_s: float) -> None:
        """The claim loop's wait: until woken or wait_s, then a linger while busy (see BUSY_WINDOW_S)."""
        with self._plan_lock:
            now = time.monotonic()
            wait_s = min(wait_s, self._announced_due - now)
            self._announced_due = math.inf
            if wait_s > 0:
                self._sleep_until = now + wait_s
        if wait_s > 0:
            self.wakeup.wait(wait_s)
            with self._plan_lock:
                self._sleep_until = math.inf
        if self._short_of_slots and time.monotonic() - self._last_claim < BUSY_WINDOW_S:
            self._stop.wait(LINGER_S)

    # --- one step

    def run_once(self) -> float:
        """One step of the claim loop (see the module docstring); returns how long to wait before the
        next."""
        self.wakeup.clear()
        if self._next_refresh == 0.0:
            self._refresh_workers()  # the first step: the registry is empty until then
        return self._claim_step()

    def housekeeping_once(self) -> float:
        """One step of the housekeeping thread; returns how long it may wait before the next."""
        self._chores.clear()
        now = time.monotonic()
        if now >= self._next_refresh:
            had_free = self.registry.free_slots() > 0
            self._refresh_workers()
            if not had_free and self.registry.free_slots() > 0:
                self.wakeup.set()  # slots appeared (a new worker, or ones that ended elsewhere): claim now
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.poll_interval_s
            if now - self._db_ok_since >= self.config.worker_ttl_s:
                self._rescue()
            self._cancels.put(None)
        self._send_cancels()
        return max(min(self._next_refresh, self._next_sweep) - time.monotonic(), 0.0)

    def _claim_step(self) -> float:
        """Claims a task for every free slot; returns how long the loop may wait before the next."""
        free = self.registry.free_slots()
        reservations = self.registry.reserve(free if self._backlog else min(free, IDLE_CLAIM_LIMIT))
        if not reservations:
            self._short_of_slots = True  # no room: whatever is due waits for a slot to free
            return self.config.poll_interval_s
        claimed, next_due_s = self._claim(reservations)
        self._backlog = len(claimed) == len(reservations) or (next_due_s is not None and next_due_s < 0)
        self._short_of_slots = self._backlog and len(reservations) >= free
        if len(claimed) == len(reservations):
            # Every free slot got a task, so more may be due: claim again at once if slots are free,
            # else when one frees (a final report wakes the loop).
            return 0.0 if self.registry.free_slots() > 0 else self.config.poll_interval_s
        if next_due_s is None:
            return self.config.poll_interval_s
        if next_due_s < 0:
            # Due, yet not claimed: another coordinator holds those rows, or slots filled meanwhile.
            return LOCKED_ROWS_RETRY_S if not claimed else 0.0
        # 0.0: one fell due while the claim ran; claim it at once, not after the locked rows' wait.
        return min(next_due_s, self.config.poll_interval_s)

    def _refresh_workers(self) -> None:
        snapshot_at = time.monotonic()
        live = self.store.live_workers(self.config.worker_ttl_s)
        for gone in self.registry.sync(live, snapshot_at):
            self.clients.forget(gone.worker_id)
        self._next_refresh = snapshot_at + self.config.registry_refresh_s

    def _rescue(self) -> None:
        """Frees what lost workers and lost dispatches hold. An attempt that never started (picked)
        goes back to the queue at no cost; one that was running has ended, unsuccessfully."""
        ended: list[EndedAttempt] = []
        never_started: list[tuple[Attempt, str]] = []
        for attempt, started, silent_s in self.store.orphaned_attempts(self.config.worker_ttl_s):
            if self.registry.heard_within(attempt.worker_id, self.config.worker_ttl_s):
                continue  # alive to this coordinator; its record in the database is just late
            reason = WORKER_LOST_ERROR.format(worker_id=attempt.worker_id,
                                              silent="ever" if silent_s is None else f"{silent_s:.1f} s")
            if started:
                ended.append(EndedAttempt(attempt, reason))
            else:
                never_started.append((attempt, reason))
        never_started += [
            (attempt, UNACKNOWLEDGED_ERROR.format(worker_id=attempt.worker_id, ack_timeout_s=self.config.ack_timeout_s))
            for attempt in self.store.unacknowledged_attempts(self.config.ack_timeout_s)
        ]
        by_task = {e.attempt.task_id: e for e in ended}
        statuses = self.store.end_attempts(ended, self.config.retry_delay_s)
        for task_id, status in statuses.items():
            log.warning("rescued task %s: %s; now %s", task_id, by_task[task_id].error, status)
            self.registry.release(by_task[task_id].attempt.worker_id, str(task_id))
        for attempt, reason in never_started:
            if self.store.unclaim(attempt):
                log.warning("rescued task %s before it started: %s; back in the queue", attempt.task_id, reason)
                self.registry.release(attempt.worker_id, str(attempt.task_id))
        # Both go back in the queue unannounced (the NOTIFY is on INSERT): the loop's next claim finds
        # them, or the retries' due time.
        if never_started or any_requeued(statuses):
            self.wakeup.set()
        for row in self.store.delete_stale_workers(self.config.worker_ttl_s):
            log.warning("worker %s at %s removed after %.1f s of silence", row["worker_id"], row["address"],
                        row["silent_s"])
            self.registry.remove(row["worker_id"])
            self.clients.forget(row["worker_id"])

    def _send_cancels(self) -> None:
        wanted: set[str] = set()
        look_up = False
        while True:
            try:
                item = self._cancels.get_nowait()
            except queue.Empty:
                break
            if item is None:
                look_up = True
            else:
                wanted.add(item)
        if not wanted and not look_up:
            return
        for task_id, worker_id in self.store.cancels_pending():
            if (look_up or str(task_id) in wanted) and worker_id:
                worker = self.registry.get(worker_id)
                if worker is not None:
                    self._ask_to_cancel(task_id, worker)

    def _ask_to_cancel(self, task_id: uuid.UUID, worker: WorkerInfo) -> None:
        key = (str(task_id), worker.worker_id)
        with self._cancels_sent_lock:
            if key in self._cancels_sent:
                return
            self._cancels_sent.add(key)
        try:
            future = self._cancel_pool.submit(self._cancel_on_worker, task_id, worker)
        except RuntimeError:  # stopping
            with self._cancels_sent_lock:
                self._cancels_sent.discard(key)
            return
        future.add_done_callback(_log_failure)

    def _cancel_on_worker(self, task_id: uuid.UUID, worker: WorkerInfo) -> None:
        try:
            self._cancel_call(task_id, worker)
        finally:
            with self._cancels_sent_lock:
                self._cancels_sent.discard((str(task_id), worker.worker_id))

    def _cancel_call(self, task_id: uuid.UUID, worker: WorkerInfo) -> None:
        try:
            self.clients.stub(worker).CancelTask(distrack_pb2.CancelTaskRequest(task_id=str(task_id)),
                                                 timeout=CANCEL_TIMEOUT_S)
        except (grpc.RpcError, ValueError) as exc:  # ValueError: its channel was just closed
            # The next sweep (or the worker's heartbeat, which lists runs to stop) tries again.
            log.warning("cancel of %s on %s: %s", task_id, worker.worker_id, _describe(exc))

    # --- claim and dispatch

    def _claim(self, reservations: list[WorkerInfo]) -> tuple[list[ClaimedTask], float | None]:
        """Claims a task for each reservation and dispatches them; returns them with the seconds until
        the next unclaimed task is due."""
        # Taken before the claim's transaction starts, so it is no later than picked_at.
        deadline = time.monotonic() + self.config.ack_timeout_s / 2
        try:
            claimed, next_due_s = self.store.claim([w.worker_id for w in reservations])
        except BaseException:
            for worker in reservations:
                self.registry.unreserve(worker.worker_id)
            raise
        if claimed:
            self._last_claim = time.monotonic()
        if claimed and self.config.fault_claim_delay_s:
            log.warning("testing: pausing %.1f s between claim and dispatch", self.config.fault_claim_delay_s)
            self._stop.wait(self.config.fault_claim_delay_s)
        by_id = {w.worker_id: w for w in reservations}
        unused: dict[str, int] = {}
        for worker in reservations:
            unused[worker.worker_id] = unused.get(worker.worker_id, 0) + 1
        batches: dict[str, list[ClaimedTask]] = {}
        for task in claimed:
            unused[task.worker_id] -= 1
            self.registry.confirm(task.worker_id, str(task.id))
            batches.setdefault(task.worker_id, []).append(task)
        # Slots no task was claimed for are freed first: a refusal may come back at once and look for one.
        for worker_id, count in unused.items():
            if count:
                self.registry.unreserve(worker_id, count)
        for worker_id, tasks in batches.items():
            self._dispatch(tasks, by_id[worker_id], deadline)
        return claimed, next_due_s

    def _submit_call(self, fn, *args) -> None:  # noqa: ANN001 - a bound method and its arguments
        future: Future = self._pool.submit(fn, *args)
        future.add_done_callback(_log_failure)

    def _call_timeout(self, deadline: float) -> float | None:
        """The timeout of a dispatch call made now, or None when too little time is left for one."""
        timeout = min(self.config.dispatch_timeout_s, deadline - time.monotonic())
        return timeout if timeout >= MIN_DISPATCH_S else None

    def _dispatch(self, tasks: list[ClaimedTask], worker: WorkerInfo, deadline: float) -> None:
        """Starts one SubmitTasks call and returns without waiting for it: the loop goes on. Its answer
        is handled as it comes (_answered). The call leaves from this thread: handing it to a pool
        thread first made a lone task's pickup about 0.25 ms longer (the wake-up of that thread on an
        idle machine). gRPC starts a thread for a channel's answers once the call is sent, and it ends
        when no call is left, so at a moderate rate each dispatch starts one: at 100 tasks a second the
        coordinator's CPU per task measured the same as with the pool (4.60/4.77 against 4.64/4.71 ms)."""
        timeout = None if self._stop.is_set() else self._call_timeout(deadline)
        if timeout is None:
            self._send_late(tasks)
            return
        with self._answers_changed:
            self._answers_owed += 1
        try:
            call = self.clients.stub(worker).SubmitTasks.future(_batch(tasks), timeout=timeout)
        except ValueError as exc:  # its channel was just closed
            self._answered(tasks, worker, deadline, functools.partial(self._failed_call, tasks, worker, exc))
            return
        call.add_done_callback(lambda ended: self._answered(
            tasks, worker, deadline, functools.partial(self._outcome, tasks, worker, ended)))

    def _outcome(self, tasks: list[ClaimedTask], worker: WorkerInfo, call: grpc.Future
                 ) -> list[tuple[ClaimedTask, str]]:
        """The tasks of an ended SubmitTasks call that its worker did not take, each with why."""
        try:
            reply = call.result()
        except grpc.RpcError as exc:
            return self._failed_call(tasks, worker, exc)
        return self._not_taken(tasks, worker, reply)

    def _answered(self, tasks: list[ClaimedTask], worker: WorkerInfo, deadline: float,
                  outcome: Callable[[], list[tuple[ClaimedTask, str]]]) -> None:
        """Handles a dispatch's answer (on gRPC's thread): the tasks its worker did not take are passed
        on from the call pool, which waits on statements and further calls."""
        not_taken: list[tuple[ClaimedTask, str]] = []
        try:
            not_taken = outcome()
        except Exception:  # the tasks stay with the worker: its heartbeats settle them (see the docstring)
            log.exception("the answer to a dispatch of %d task(s) to worker %s could not be read",
                          len(tasks), worker.worker_id)
        if not not_taken:
            self._answer_handled()
            return
        try:
            self._submit_call(self._pass_on_all, not_taken, worker, deadline)
        except RuntimeError:  # the call pool shut down (stopping): handled here, now
            self._pass_on_all(not_taken, worker, deadline)

    def _pass_on_all(self, not_taken: list[tuple[ClaimedTask, str]], worker: WorkerInfo, deadline: float) -> None:
        try:
            for task, why in not_taken:
                self._pass_on(task, worker, why, deadline)
        finally:
            self._answer_handled()

    def _answer_handled(self) -> None:
        with self._answers_changed:
            self._answers_owed -= 1
            self._answers_changed.notify_all()

    def _send_late(self, tasks: list[ClaimedTask]) -> None:
        """Claimed tasks that will not be sent (stopping, or too little of their deadline left) go back."""
        if not self._stop.is_set():
            log.warning("%d claimed task(s) not dispatched in time; back in the queue", len(tasks))
        for task in tasks:
            self._return_to_queue(Attempt(task.id, task.lease, task.worker_id))

    def _send(self, tasks: list[ClaimedTask], worker: WorkerInfo, timeout: float) -> list[tuple[ClaimedTask, str]]:
        """One SubmitTasks call, waited for; returns the tasks the worker did not take, each with why."""
        if self._stop.is_set():
            return [(task, "stopping") for task in tasks]
        try:
            reply = self.clients.stub(worker).SubmitTasks(_batch(tasks), timeout=timeout)
        except (grpc.RpcError, ValueError) as exc:  # ValueError: its channel was just closed
            return self._failed_call(tasks, worker, exc)
        return self._not_taken(tasks, worker, reply)

    def _failed_call(self, tasks: list[ClaimedTask], worker: WorkerInfo, exc: Exception
                     ) -> list[tuple[ClaimedTask, str]]:
        """The tasks of a failed call that may go to another worker: all of them when the call never
        reached this one, else none (they stay its own; see the module docstring)."""
        self.registry.mark_refusing(worker.worker_id)
        if _never_reached(exc):
            refused = isinstance(exc, grpc.RpcError) and exc.code() in REFUSED_CODES
            log.log(logging.INFO if refused else logging.WARNING, "worker %s refused a dispatch of %d task(s) (%s)",
                    worker.worker_id, len(tasks), _describe(exc))
            return [(task, _describe(exc)) for task in tasks]
        log.warning("dispatch of %d task(s) to worker %s ended with %s; they stay with it until its heartbeats "
                    "show whether it took them", len(tasks), worker.worker_id, _describe(exc))
        return []

    def _not_taken(self, tasks: list[ClaimedTask], worker: WorkerInfo, reply: distrack_pb2.TaskBatchResponse
                   ) -> list[tuple[ClaimedTask, str]]:
        results = {r.task_id: r for r in reply.results}
        not_taken = []
        for task in tasks:
            result = results.get(str(task.id))
            if result is not None and result.accepted:
                continue
            why = distrack_pb2.Refusal.Name(result.refusal) if result is not None else "no answer for it"
            log.info("worker %s refused %s (%s)", worker.worker_id, task.id, why)
            not_taken.append((task, why))
            if result is None or result.refusal != distrack_pb2.OLDER_DISPATCH:
                self.registry.mark_refusing(worker.worker_id)
        with self._dispatched_lock:
            self.dispatched += len(tasks) - len(not_taken)
            self.dispatch_calls += 1
        return not_taken

    def _pass_on(self, task: ClaimedTask, worker: WorkerInfo, why: str, deadline: float) -> None:
        """Passes the same lease to the next worker with a free slot, until one takes the task, none is
        left or the claim's dispatch deadline is near (then it goes back to the queue)."""
        tried: set[str] = set()
        while True:
            attempt = Attempt(task.id, task.lease, worker.worker_id)
            self.registry.release(worker.worker_id, str(task.id))
            tried.add(worker.worker_id)
            late = self._call_timeout(deadline) is None
            picks = [] if self._stop.is_set() or late else self.registry.reserve(1, exclude=tried)
            if not picks:
                self._return_to_queue(attempt, release=False)
                return
            next_worker = picks[0]
            try:
                moved = self.store.reassign(attempt, next_worker.worker_id)
            except DatabaseUnavailable as exc:
                self.registry.unreserve(next_worker.worker_id)
                log.warning("could not pass %s on (%s); the acknowledgement deadline will", task.id, exc)
                return
            if not moved:  # cancelled meanwhile, or rescued: nothing left to dispatch
                self.registry.unreserve(next_worker.worker_id)
                self._return_to_queue(attempt, release=False)
                return
            log.info("passed %s on from %s (%s) to %s", task.id, worker.worker_id, why, next_worker.worker_id)
            self.registry.confirm(next_worker.worker_id, str(task.id))
            worker = next_worker
            timeout = self._call_timeout(deadline)
            if timeout is None:
                self._return_to_queue(Attempt(task.id, task.lease, worker.worker_id))
                return
            not_taken = self._send([task], worker, timeout)
            if not not_taken:
                return
            why = not_taken[0][1]

    def _return_to_queue(self, attempt: Attempt, *, release: bool = True) -> None:
        if release:
            self.registry.release(attempt.worker_id, str(attempt.task_id))
        try:
            self.store.unclaim(attempt)
        except DatabaseUnavailable as exc:
            log.warning("could not return %s to the queue (%s); the acknowledgement deadline will",
                        attempt.task_id, exc)


def _monotonic_due(payload: str | None) -> float:
    """A NOTIFY payload's due time (epoch seconds on the database's clock) on this process's
    monotonic clock; minus infinity (due at once) when it names no time."""
    try:
        due_epoch = float(payload or "")
    except ValueError:
        return -math.inf  # no due time (a trigger from before migration 0003)
    if not math.isfinite(due_epoch):
        return -math.inf
    return time.monotonic() + (due_epoch - time.time())


def _batch(tasks: list[ClaimedTask]) -> distrack_pb2.TaskBatch:
    return distrack_pb2.TaskBatch(tasks=[
        distrack_pb2.TaskRequest(task_id=str(t.id), command=t.command, attempt=t.attempt, lease=t.lease,
                                 timeout_seconds=t.timeout_seconds or 0.0)
        for t in tasks
    ])


def _never_reached(exc: Exception) -> bool:
    """Whether a failed dispatch call certainly never ran the worker's handler."""
    if not isinstance(exc, grpc.RpcError):
        return True  # ValueError: the channel was closed before the call
    code = exc.code()
    if code in NEVER_REACHED_CODES:
        return True
    return code == grpc.StatusCode.UNAVAILABLE and NOT_CONNECTED_DETAILS in (exc.details() or "").lower()


def _describe(exc: Exception) -> str:
    return exc.code().name if isinstance(exc, grpc.RpcError) else f"{type(exc).__name__}: {exc}"


def _log_failure(future: Future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("dispatcher call failed", exc_info=exc)
