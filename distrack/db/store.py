"""TaskStore: the one class that runs SQL. Every statement comes from sql/queries.sql by name.

Thread-safe: each call takes a connection from the pool for one statement (autocommit), so no
transaction ever spans a network call to a worker or a client.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from distrack.db.queries import queries
from distrack.errors import DatabaseUnavailable

NOTIFY_CHANNEL = "distrack_task_queued"
WORKER_LOST_ERROR = "worker {worker_id} was lost (no heartbeat for {silent_s:.1f} s)"
UNACKNOWLEDGED_ERROR = "dispatched but not acknowledged by a worker within {ack_timeout_s:g} s"


@dataclass(frozen=True)
class ClaimedTask:
    id: uuid.UUID
    command: str
    attempt: int
    timeout_seconds: float | None
    scheduled_at: datetime


class TaskStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._sql = queries()

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor]:
        """A cursor on a pooled autocommit connection; driver failures become DatabaseUnavailable."""
        try:
            with self.pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except PoolTimeout as exc:
            raise DatabaseUnavailable(f"no database connection available: {exc}") from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc}".strip()) from None

    def _one(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        with self._cursor() as cur:
            cur.execute(self._sql[name], params)
            return cur.fetchone()

    def _all(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            cur.execute(self._sql[name], params)
            return cur.fetchall()

    # --- the scheduler's side

    def insert_task(
        self,
        command: str,
        delay_seconds: float = 0.0,
        *,
        max_attempts: int = 1,
        timeout_seconds: float | None = None,
        task_id: uuid.UUID | None = None,
    ) -> dict[str, Any]:
        """Commits one queued task (the trigger wakes the coordinators) and returns its row."""
        row = self._one(
            "insert_task",
            {
                "id": task_id or uuid.uuid4(),
                "command": command,
                "delay_seconds": float(delay_seconds),
                "max_attempts": max_attempts,
                "timeout_seconds": timeout_seconds,
            },
        )
        assert row is not None
        return row

    def get_task(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        return self._one("get_task", {"id": task_id})

    def ping(self) -> None:
        self._one("ping")

    # --- the coordinator's side

    def claim_due(self, limit: int) -> list[ClaimedTask]:
        """Marks up to `limit` due tasks picked, in one short transaction, and returns them."""
        if limit <= 0:
            return []
        rows = self._all("claim_due", {"limit": limit})
        tasks = [
            ClaimedTask(r["id"], r["command"], r["attempts"], r["timeout_seconds"], r["scheduled_at"]) for r in rows
        ]
        tasks.sort(key=lambda t: t.scheduled_at)
        return tasks

    def seconds_until_next_due(self) -> float | None:
        row = self._one("seconds_until_next_due")
        return None if row is None else row["seconds"]

    def unclaim(self, task_id: uuid.UUID, attempt: int) -> bool:
        row = self._one("unclaim", {"id": task_id, "attempt": attempt})
        return bool(row and row["n"])

    def mark_running(self, task_id: uuid.UUID, attempt: int, worker_id: str) -> bool:
        return self._one("mark_running", {"id": task_id, "attempt": attempt, "worker_id": worker_id}) is not None

    def mark_completed(self, task_id: uuid.UUID, attempt: int, worker_id: str, exit_code: int) -> bool:
        params = {"id": task_id, "attempt": attempt, "worker_id": worker_id, "exit_code": exit_code}
        return self._one("mark_completed", params) is not None

    def mark_failed(
        self,
        task_id: uuid.UUID,
        attempt: int,
        worker_id: str,
        exit_code: int | None,
        error: str | None,
        retry_delay_s: float,
    ) -> str | None:
        """Records a failed attempt; returns the new status ('queued' for a retry), None if stale."""
        row = self._one(
            "mark_failed",
            {
                "id": task_id,
                "attempt": attempt,
                "worker_id": worker_id,
                "exit_code": exit_code,
                "error": error,
                "retry_delay_s": retry_delay_s,
            },
        )
        if row is None:
            return None
        if row["status"] == "queued":
            self._one("notify_queued")
        return row["status"]

    def release_worker_tasks(self, worker_id: str, silent_s: float) -> list[dict[str, Any]]:
        """Re-queues (or fails, with no attempt left) what a lost worker had not finished."""
        error = WORKER_LOST_ERROR.format(worker_id=worker_id, silent_s=silent_s)
        rows = self._all("release_worker_tasks", {"worker_id": worker_id, "error": error})
        if any(r["status"] == "queued" for r in rows):
            self._one("notify_queued")
        return rows

    def requeue_unacknowledged(self, ack_timeout_s: float) -> list[dict[str, Any]]:
        """Re-queues (or fails) tasks picked longer than `ack_timeout_s` ago that never started."""
        error = UNACKNOWLEDGED_ERROR.format(ack_timeout_s=ack_timeout_s)
        rows = self._all("requeue_unacknowledged", {"ack_timeout_s": ack_timeout_s, "error": error})
        if any(r["status"] == "queued" for r in rows):
            self._one("notify_queued")
        return rows
