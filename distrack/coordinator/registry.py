"""WorkerRegistry: the live workers, their free slots, and whose turn it is.

Pure bookkeeping, no sockets, no database: the clock is injected so tests can drive it. A lock
makes each method atomic because the gRPC handlers and the dispatcher share one registry.

The database is the truth (the `workers` table, shared by every coordinator): `sync` replaces this
view with it, including the tasks each worker holds, whoever dispatched them. Between two syncs the
registry counts this coordinator's own dispatches, reservations and final reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from distrack.db.store import LiveWorker


@dataclass
class WorkerInfo:
    worker_id: str
    address: str
    # How many tasks it takes at once: its slots, and its prefetch (tasks that wait there for a slot).
    takes: int
    # task id -> when this coordinator learned of it; a slot stays taken until the task's end.
    in_flight: dict[str, float] = field(default_factory=dict)
    # Slots taken for a claim under way, before the tasks have ids.
    reserved: int = 0
    # After a refusal, no task goes to this worker before this moment (or its next heartbeat).
    refusing_until: float = 0.0
    # When this coordinator last heard a heartbeat from it (0: only known from the database).
    heard_at: float = 0.0

    def free_slots(self, now: float) -> int:
        if now < self.refusing_until:
            return 0
        return max(self.takes - len(self.in_flight) - self.reserved, 0)


class WorkerRegistry:
    def __init__(self, *, refusal_backoff_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.refusal_backoff_s = refusal_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is the round-robin order; _next is the index of the next worker's turn.
        self._workers: dict[str, WorkerInfo] = {}
        self._next = 0

    def sync(self, live: Iterable[LiveWorker], snapshot_at: float) -> list[WorkerInfo]:
        """Replaces the view with the database's; returns the workers that left it.

        `snapshot_at` is this clock's time when the query started: local dispatches made after it may
        be missing from the snapshot, so they are kept; older ones not in it have ended.
        """
        now = self._clock()
        with self._lock:
            previous = self._workers
            current_id = self._current_worker_id()
            self._workers = {}
            for row in live:
                old = previous.get(row.worker_id)
                in_flight = {tid: (old.in_flight.get(tid, now) if old else now) for tid in row.active_task_ids}
                if old is not None:
                    for tid, since in old.in_flight.items():
                        if since >= snapshot_at:
                            in_flight.setdefault(tid, since)
                self._workers[row.worker_id] = WorkerInfo(
                    row.worker_id, row.address, max(row.takes, 0), in_flight,
                    old.reserved if old else 0, old.refusing_until if old else 0.0, old.heard_at if old else 0.0,
                )
            # A worker heard here after the snapshot began may be missing from it: it stays.
            for worker_id, info in previous.items():
                if worker_id not in self._workers and info.heard_at >= snapshot_at:
                    self._workers[worker_id] = info
            self._restore_turn(current_id)
            return [info for worker_id, info in previous.items() if worker_id not in self._workers]

    def heartbeat(self, worker_id: str, address: str, takes: int, running_task_ids: Iterable[str] = ()) -> bool:
        """Records a heartbeat heard by this coordinator; True when the worker is new here.

        What the worker says it runs holds slots (a coordinator that restarted learns this way).
        """
        now = self._clock()
        with self._lock:
            info = self._workers.get(worker_id)
            if info is None:
                info = WorkerInfo(worker_id, address, max(takes, 0), dict.fromkeys(running_task_ids, now), heard_at=now)
                self._workers[worker_id] = info
                return True
            info.address = address
            info.takes = max(takes, 0)
            info.refusing_until = 0.0
            info.heard_at = now
            for task_id in running_task_ids:
                info.in_flight.setdefault(task_id, now)
            return False

    def reserve(self, count: int, exclude: Collection[str] = ()) -> list[WorkerInfo]:
        """Takes up to `count` slots, one per worker per round, from the worker whose turn it is.

        The turn itself moves only when a reservation becomes a task (`confirm`): reserving every
        free slot for a claim that finds one due task must not skip the other workers' turns.
        """
        now = self._clock()
        picks: list[WorkerInfo] = []
        with self._lock:
            order = list(self._workers.values())
            if not order:
                return picks
            index, misses = self._next, 0
            while len(picks) < count and misses < len(order):
                info = order[index % len(order)]
                index += 1
                if info.worker_id in exclude or info.free_slots(now) <= 0:
                    misses += 1
                    continue
                info.reserved += 1
                picks.append(info)
                misses = 0
        return picks

    def confirm(self, worker_id: str, task_id: str) -> None:
        """Turns one reservation on the worker into a task it holds; the turn passes to the next."""
        with self._lock:
            info = self._workers.get(worker_id)
            if info is not None:
                info.reserved = max(info.reserved - 1, 0)
                info.in_flight[task_id] = self._clock()
                self._next = (list(self._workers).index(worker_id) + 1) % len(self._workers)

    def unreserve(self, worker_id: str, count: int = 1) -> None:
        with self._lock:
            info = self._workers.get(worker_id)
            if info is not None:
                info.reserved = max(info.reserved - count, 0)

    def release(self, worker_id: str, task_id: str) -> None:
        """Frees the slot `task_id` held on the worker (idempotent)."""
        with self._lock:
            info = self._workers.get(worker_id)
            if info is not None:
                info.in_flight.pop(task_id, None)

    def mark_refusing(self, worker_id: str) -> None:
        """The worker refused a task: give it none until its next heartbeat, or the backoff."""
        with self._lock:
            info = self._workers.get(worker_id)
            if info is not None:
                info.refusing_until = self._clock() + self.refusal_backoff_s

    def remove(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            current_id = self._current_worker_id()
            info = self._workers.pop(worker_id, None)
            self._restore_turn(current_id)
            return info

    def free_slots(self) -> int:
        now = self._clock()
        with self._lock:
            return sum(info.free_slots(now) for info in self._workers.values())

    def heard_within(self, worker_id: str, seconds: float) -> bool:
        """Whether this coordinator itself heard the worker's heartbeat in the last `seconds`."""
        with self._lock:
            info = self._workers.get(worker_id)
            return info is not None and info.heard_at > 0 and self._clock() - info.heard_at < seconds

    def get(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            return self._workers.get(worker_id)

    def snapshot(self) -> list[WorkerInfo]:
        """Copies of the live workers, in round-robin order."""
        with self._lock:
            return [
                WorkerInfo(i.worker_id, i.address, i.takes, dict(i.in_flight), i.reserved, i.refusing_until, i.heard_at)
                for i in self._workers.values()
            ]

    # The turn is kept as "the worker whose turn it is", so it survives workers joining or leaving.
    def _current_worker_id(self) -> str | None:
        ids = list(self._workers)
        return ids[self._next % len(ids)] if ids else None

    def _restore_turn(self, worker_id: str | None) -> None:
        ids = list(self._workers)
        self._next = ids.index(worker_id) if worker_id in self._workers else (self._next % len(ids) if ids else 0)
