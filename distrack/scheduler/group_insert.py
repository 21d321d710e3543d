"""Group insert: single POST /schedule requests that arrive while an insert is under way are written
together, in one statement and one commit, when it ends.

Every insert fires the queue's NOTIFY, and PostgreSQL serialises the commits of transactions that
notify (a database-wide lock held through the commit's WAL flush). Concurrent clients would otherwise
wait for each other's commits one at a time, whatever the cores could do. With groups, a request
that finds no insert under way is written at once, alone; the ones that arrive meanwhile wait for it
and go next, together. Nothing is held back for a group to fill, so a lone client waits no longer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from distrack.errors import DataRejected
from distrack.tasks import TaskSpec

# The most tasks in one group; a statement takes many more, but a request should not
# wait behind an unbounded crowd.
MAX_GROUP = 256


class _Pending:
    __slots__ = ("spec", "result", "error", "done", "wake")

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.result: Any = None
        self.error: Exception | None = None
        self.done = False
        # Held until this request's thread is woken: its task is written (done), or it writes next.
        self.wake = threading.Lock()
        self.wake.acquire()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class GroupInserter:
    """insert(spec) commits one task, in a group with whichever others are waiting, and returns what
    `insert_many` returned for it: `insert_many` commits a list in one statement and returns one
    result per task, in order.

    Each waiting request is woken once, by name: when its group is written, or when it is first in
    line to write the next group. (One condition for all of them would wake every waiting request at
    every write, to find most of them still waiting: a thread switch each, for nothing.)"""

    def __init__(self, insert_many: Callable[[Sequence[TaskSpec]], list[Any]], *, max_group: int = MAX_GROUP) -> None:
        self._insert_many = insert_many
        self._max_group = max_group
        self._lock = threading.Lock()
        self._waiting: deque[_Pending] = deque()
        self._busy = False  # a group is being written; the next writer is woken by the one writing

    def insert(self, spec: TaskSpec) -> Any:
        mine = _Pending(spec)
        with self._lock:
            waits = self._busy
            if waits:
                self._waiting.append(mine)
            else:
                self._busy = True
        if waits:
            mine.wake.acquire()
            if mine.done:
                return mine.outcome()
        # This thread writes the next group (the one writing handed over to it, or none was): its own
        # task and those waiting longest.
        with self._lock:
            group = [mine]
            while self._waiting and len(group) < self._max_group:
                group.append(self._waiting.popleft())
        try:
            self._write(group)
        finally:
            with self._lock:
                next_writer = self._waiting.popleft() if self._waiting else None
                self._busy = next_writer is not None
            if next_writer is not None:
                next_writer.wake.release()
            for pending in group[1:]:
                pending.wake.release()
        return mine.outcome()

    def _write(self, group: list[_Pending]) -> None:
        try:
            try:
                results = self._insert_many([p.spec for p in group])
            except DataRejected:
                if len(group) == 1:
                    raise
                # One task the database refuses (a character its encoding lacks) must not fail the
                # others that happened to share its statement: each goes again on its own.
                for pending in group:
                    self._write([pending])
                return
            for pending, result in zip(group, results, strict=True):
                pending.result = result
        except Exception as exc:
            for pending in group:
                if not pending.done and pending.result is None:
                    pending.error = exc
        finally:
            for pending in group:
                if pending.result is None and pending.error is None:
                    pending.error = RuntimeError("the group insert ended without an outcome for this task")
                pending.done = True
