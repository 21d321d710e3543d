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
from collections.abc import Callable, Sequence
from typing import Any

from distrack.errors import DataRejected
from distrack.tasks import TaskSpec

# The most tasks in one group; a statement takes many more, but a request should not
# wait behind an unbounded crowd.
MAX_GROUP = 256


class _Pending:
    __slots__ = ("spec", "result", "error", "done")

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.result: Any = None
        self.error: Exception | None = None
        self.done = False

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class GroupInserter:
    """insert(spec) commits one task, in a group with whichever others are waiting, and returns what
    `insert_many` returned for it: `insert_many` commits a list in one statement and returns one
    result per task, in order."""

    def __init__(self, insert_many: Callable[[Sequence[TaskSpec]], list[Any]], *, max_group: int = MAX_GROUP) -> None:
        self._insert_many = insert_many
        self._max_group = max_group
        self._changed = threading.Condition()
        self._waiting: list[_Pending] = []
        self._busy = False

    def insert(self, spec: TaskSpec) -> Any:
        mine = _Pending(spec)
        with self._changed:
            self._waiting.append(mine)
            while self._busy and not mine.done:
                self._changed.wait()
            if mine.done:
                return mine.outcome()
            # This thread writes the next group: its own task and those waiting longest.
            self._waiting.remove(mine)
            group = [mine, *self._waiting[: self._max_group - 1]]
            del self._waiting[: self._max_group - 1]
            self._busy = True
        try:
            self._write(group)
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()
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
