"""Dispatcher: the coordinator's loop that claims due tasks and hands them to workers.

Concurrency: one dispatcher thread runs the loop; SubmitTask calls run on a small thread pool so one
slow worker never holds up the others. The loop wakes on any of: a NOTIFY (new task), a freed slot
or a new worker (set by the gRPC handlers), the next due `scheduled_at`, or the poll interval. It
claims at most as many tasks as there are free slots, in one short transaction, and dispatches after
that transaction has committed.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from distrack.config import CoordinatorConfig
from distrack.coordinator.registry import LostWorker, WorkerInfo, WorkerRegistry
from distrack.db.store import ClaimedTask, TaskStore
from distrack.errors import DatabaseUnavailable
from distrack.rpc import distrack_pb2, distrack_pb2_grpc

log = logging.getLogger(__name__)

# When due rows exist but another coordinator holds their locks, look again this soon.
LOCKED_ROWS_RETRY_S = 0.01
# Backoff while the database is unreachable.
DB_RETRY_MAX_S = 2.0
# gRPC codes that prove the worker did not take the task: safe to give it to another.
REFUSED_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
DISPATCH_THREADS = 16


class WorkerClients:
    """One gRPC channel per worker address, reused for every dispatch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[grpc.Channel, distrack_pb2_grpc.WorkerStub]] = {}

    def stub(self, address: str) -> distrack_pb2_grpc.WorkerStub:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                channel = grpc.insecure_channel(address)
                entry = (channel, distrack_pb2_grpc.WorkerStub(channel))
                self._stubs[address] = entry
            return entry[1]

    def forget(self, address: str) -> None:
        with self._lock:
            entry = self._stubs.pop(address, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            entries, self._stubs = list(self._stubs.values()), {}
        for channel, _ in entries:
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
        self._thread: threading.Thread | None = None
        # Lost workers whose tasks could not be released yet (database down): retried every step.
        self._unreleased: list[LostWorker] = []
        self._next_ack_check = 0.0

    # --- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops claiming, then waits for dispatches already under way to end."""
        self._stop.set()
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True)
        self.clients.close()

    def run(self) -> None:
        db_delay = 0.1
        while not self._stop.is_set():
            try:
                wait_s = self.run_once()
                db_delay = 0.1
            except DatabaseUnavailable as exc:
                log.warning("%s; retrying in %.1f s", exc, db_delay)
                wait_s, db_delay = db_delay, min(db_delay * 2, DB_RETRY_MAX_S)
            except Exception:
                log.exception("dispatcher step failed")
                wait_s = self.config.poll_interval_s
            if wait_s > 0:
                self.wakeup.wait(wait_s)

    # --- one step

    def run_once(self) -> float:
        """Expires silent workers, claims and dispatches what is due; returns how long to wait next."""
        self.wakeup.clear()
        self._rescue_lost_work()
        free = self.registry.free_slots()
        if free <= 0:
            return self.config.poll_interval_s
        claimed = self.store.claim_due(free)
        for task in claimed:
            self._dispatch(task)
        if len(claimed) == free and self.registry.free_slots() > 0:
            return 0.0
        next_due_s = self.store.seconds_until_next_due()
        if next_due_s is None:
            return self.config.poll_interval_s
        if next_due_s <= 0:
            # Due, yet not claimed: another coordinator holds those rows, or slots filled meanwhile.
            return LOCKED_ROWS_RETRY_S if not claimed else 0.0
        return min(next_due_s, self.config.poll_interval_s)

    def _rescue_lost_work(self) -> None:
        for lost in self.registry.expire():
            log.warning("worker %s at %s lost after %.1f s of silence", lost.worker_id, lost.address, lost.silent_s)
            self.clients.forget(lost.address)
            self._unreleased.append(lost)
        while self._unreleased:
            lost = self._unreleased[0]
            released = self.store.release_worker_tasks(lost.worker_id, lost.silent_s)
            self._unreleased.pop(0)
            if released:
                log.warning("re-queued or failed %d task(s) of lost worker %s", len(released), lost.worker_id)
        now = time.monotonic()
        if now >= self._next_ack_check:
            self._next_ack_check = now + self.config.poll_interval_s
            for row in self.store.requeue_unacknowledged(self.config.ack_timeout_s):
                log.warning("task %s was never acknowledged; now %s", row["id"], row["status"])

    def _dispatch(self, task: ClaimedTask) -> None:
        worker = self.registry.reserve(str(task.id))
        if worker is None:
            self._return_to_queue(task)
            return
        self._pool.submit(self._submit, task, worker, frozenset())

    def _submit(self, task: ClaimedTask, worker: WorkerInfo, tried: frozenset[str]) -> None:
        request = distrack_pb2.TaskRequest(
            task_id=str(task.id),
            command=task.command,
            attempt=task.attempt,
            timeout_seconds=task.timeout_seconds or 0.0,
        )
        try:
            self.clients.stub(worker.address).SubmitTask(request, timeout=self.config.dispatch_timeout_s)
            return
        except grpc.RpcError as exc:
            code = exc.code()
            self.registry.release(worker.worker_id, str(task.id))
            if code not in REFUSED_CODES:
                # The worker may have taken it (a timeout, say): leave it picked. If no INPROGRESS
                # report follows, the worker's loss or the acknowledgement deadline re-queues it.
                log.warning("dispatch of %s to %s ended with %s: %s", task.id, worker.worker_id, code, exc.details())
                return
            log.info("worker %s refused %s (%s); trying another", worker.worker_id, task.id, code.name)
        except Exception:
            self.registry.release(worker.worker_id, str(task.id))
            log.exception("dispatch of %s to %s failed", task.id, worker.worker_id)
        tried = tried | {worker.worker_id}
        next_worker = self.registry.reserve(str(task.id), exclude=tried)
        if next_worker is None or self._stop.is_set():
            self._return_to_queue(task)
        else:
            self._submit(task, next_worker, tried)

    def _return_to_queue(self, task: ClaimedTask) -> None:
        try:
            self.store.unclaim(task.id, task.attempt)
        except DatabaseUnavailable as exc:
            log.warning("could not return %s to the queue (%s); the acknowledgement deadline will", task.id, exc)
