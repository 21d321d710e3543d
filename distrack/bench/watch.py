"""Waiting for submitted tasks to finish, and their timestamps: from PostgreSQL when the suite can
reach it (one cheap query per poll, nothing added to the scheduler's load), else over GET /status."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from distrack.bench.client import ApiError, ClientPool, SchedulerClient, TransportError
from distrack.bench.config import FINISHED_STATUSES
from distrack.bench.progress import Progress

# The database is asked every 50 ms: finish detection a few polls late costs nothing but idle time,
# since the figures come from the tasks' own timestamps.
DB_POLL_S = 0.05
# While many tasks are pending, a poll (one lookup per task) is asked for at most this often, so
# watching a long run takes little of the CPU the run is measured by.
MANY_PENDING = 100
MANY_PENDING_POLL_S = 0.5
# Columns of a task as GET /status shows them, the timestamps as datetimes.
_FINISHED_SQL = """
SELECT id::text AS task_id, status, scheduled_at, picked_at, started_at, completed_at, failed_at
FROM tasks
WHERE id = ANY(%s::uuid[]) AND status = ANY(%s::text[])
"""


class TaskSource(Protocol):
    poll_s: float

    def finished(self, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The tasks among `task_ids` that are finished, with their timestamps."""
        ...


class DbTasks:
    """Reads tasks straight from PostgreSQL. A context manager: the connection closes on the way out."""

    poll_s = DB_POLL_S

    def __init__(self, database_url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self._conn = psycopg.connect(database_url, autocommit=True, row_factory=dict_row)

    def finished(self, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        return self._conn.execute(_FINISHED_SQL, (list(task_ids), sorted(FINISHED_STATUSES))).fetchall()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> DbTasks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class HttpTasks:
    """Polls GET /status for each task, from `concurrency` keep-alive clients."""

    def __init__(self, url: str, *, concurrency: int, poll_s: float, token: str | None = None) -> None:
        self.poll_s = poll_s
        self._pool = ClientPool(lambda: SchedulerClient(url, token=token))
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="poll")

    def finished(self, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        docs = self._executor.map(self._status, task_ids)
        return [doc for doc in docs if doc is not None and doc.get("status") in FINISHED_STATUSES]

    def _status(self, task_id: str) -> dict[str, Any] | None:
        try:
            return self._pool.get().status(task_id)
        except (TransportError, ApiError):
            return None  # the scheduler or its database may be back by the next round

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pool.close_all()

    def __enter__(self) -> HttpTasks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class WaitResult:
    docs: list[dict[str, Any]]  # the finished tasks
    unfinished: int
    # time.monotonic() when the last task was seen finished, or the wait gave up.
    ended: float


def wait_finished(
    source: TaskSource,
    task_ids: Sequence[str],
    *,
    timeout_s: float,
    progress: Progress | None = None,
    label: str = "waiting",
) -> WaitResult:
    """Polls until every task is finished or `timeout_s` has passed."""
    progress = progress or Progress()
    pending = list(task_ids)
    docs: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            found = source.finished(pending)
            docs.extend(found)
            done = {doc["task_id"] for doc in found}
            pending = [task_id for task_id in pending if task_id not in done]
            progress.step(label, len(docs), len(task_ids))
            if not pending or time.monotonic() >= deadline:
                break
            poll_s = source.poll_s if len(pending) <= MANY_PENDING else max(source.poll_s, MANY_PENDING_POLL_S)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    finally:
        progress.clear()
    return WaitResult(docs, len(pending), time.monotonic())
