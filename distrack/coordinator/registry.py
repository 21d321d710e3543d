"""WorkerRegistry: the live workers, their free slots, and whose turn it is.

Pure bookkeeping, no sockets, no database: the clock is injected so tests can drive it. A lock
makes each method atomic because the gRPC handlers and the dispatcher share one registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field


@dataclass
class WorkerInfo:
    worker_id: str
    address: str
    slots: int
    last_seen: float
    # task id -> when it was dispatched here; a slot stays taken until the task's final report.
    in_flight: dict[str, float] = field(default_factory=dict)

    @property
    def free_slots(self) -> int:
        return max(self.slots - len(self.in_flight), 0)


@dataclass(frozen=True)
class LostWorker:
    worker_id: str
    address: str
    silent_s: float


class WorkerRegistry:
    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is the round-robin order; _next is the index of the next worker's turn.
        self._workers: dict[str, WorkerInfo] = {}
        self._next = 0

    def heartbeat(self, worker_id: str, address: str, slots: int, running_task_ids: Iterable[str] = ()) -> bool:
        """Records a heartbeat; returns True when the worker is new (a capacity change worth a wake-up).

        The worker's own list of running tasks frees slots whose final report never arrived, except
        for tasks dispatched within the last ttl, whose start may not show in this heartbeat yet.
        """
        now = self._clock()
        running = set(running_task_ids)
        with self._lock:
            info = self._workers.get(worker_id)
            if info is None:
                # Known to a restarted coordinator only now: what it already runs holds its slots.
                in_flight = dict.fromkeys(running, now)
                self._workers[worker_id] = WorkerInfo(worker_id, address, max(slots, 0), now, in_flight)
                return True
            info.address = address
            info.slots = max(slots, 0)
            info.last_seen = now
            for task_id, dispatched_at in list(info.in_flight.items()):
                if task_id not in running and now - dispatched_at > self.ttl_s:
                    del info.in_flight[task_id]
            return False

    def reserve(self, task_id: str, exclude: Collection[str] = ()) -> WorkerInfo | None:
        """Takes a slot for `task_id` on the next worker in turn that has one; None when all are full."""
        with self._lock:
            order = list(self._workers.values())
            for offset in range(len(order)):
                index = (self._next + offset) % len(order)
                info = order[index]
                if info.worker_id in exclude or info.free_slots <= 0:
                    continue
                info.in_flight[task_id] = self._clock()
                self._next = index + 1
                return info
            return None

    def release(self, worker_id: str, task_id: str) -> None:
        """Frees the slot `task_id` held on the worker (idempotent)."""
        with self._lock:
            info = self._workers.get(worker_id)
            if info is not None:
                info.in_flight.pop(task_id, None)

    def release_task(self, task_id: str) -> None:
        """Frees `task_id`'s slot on whichever worker holds it."""
        with self._lock:
            for info in self._workers.values():
                info.in_flight.pop(task_id, None)

    def free_slots(self) -> int:
        with self._lock:
            return sum(info.free_slots for info in self._workers.values())

    def expire(self) -> list[LostWorker]:
        """Removes and returns the workers silent for longer than the ttl."""
        now = self._clock()
        lost: list[LostWorker] = []
        with self._lock:
            for worker_id, info in list(self._workers.items()):
                silent_s = now - info.last_seen
                if silent_s > self.ttl_s:
                    lost.append(LostWorker(worker_id, info.address, silent_s))
                    self._remove_locked(worker_id)
        return lost

    def remove(self, worker_id: str) -> None:
        with self._lock:
            self._remove_locked(worker_id)

    def _remove_locked(self, worker_id: str) -> None:
        ids = list(self._workers)
        if worker_id not in self._workers:
            return
        index = ids.index(worker_id)
        del self._workers[worker_id]
        # Keep the turn on the same next worker after the list shrinks.
        if index < self._next:
            self._next -= 1
        if self._workers:
            self._next %= len(self._workers)
        else:
            self._next = 0

    def get(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            return self._workers.get(worker_id)

    def snapshot(self) -> list[WorkerInfo]:
        """Copies of the live workers, in round-robin order."""
        with self._lock:
            return [
                WorkerInfo(i.worker_id, i.address, i.slots, i.last_seen, dict(i.in_flight))
                for i in self._workers.values()
            ]
