"""TaskStore: the one class that runs SQL. Every statement comes from sql/queries.sql by name.

Thread-safe: each call takes a connection from the pool for one statement (autocommit), so no
transaction ever spans a network call to a worker or a client.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from distrack.db.literals import number_array, random_uuid4s, text_array, uuid_array
from distrack.db.queries import queries
from distrack.errors import DatabaseUnavailable, DataRejected
from distrack.tasks import TaskSpec

log = logging.getLogger(__name__)

QUEUED_CHANNEL = "distrack_task_queued"
CANCEL_CHANNEL = "distrack_cancel"
# The longest wait before a retry, however many attempts came before.
MAX_RETRY_DELAY_S = 3600.0


@dataclass(frozen=True)
class InsertedTasks:
    """What insert_tasks committed, in its input's order: each task's id, and when it is due (the same
    datetime object for tasks with the same delay)."""

    ids: list[str]
    scheduled_ats: list[datetime]


@dataclass(frozen=True)
class ClaimedTask:
    id: uuid.UUID
    command: str
    lease: int
    attempt: int  # the number this attempt will have if it starts
    timeout_seconds: float | None
    scheduled_at: datetime
    worker_id: str


@dataclass(frozen=True)
class Attempt:
    """One dispatch of a task, as owned by one worker: the fence every change of it must name."""

    task_id: uuid.UUID
    lease: int
    worker_id: str


@dataclass(frozen=True)
class EndedAttempt:
    attempt: Attempt
    error: str
    exit_code: int | None = None
    # When the worker started it (Unix seconds, the worker's clock): lets the end also record a start
    # whose report was lost or overtaken. None for ends the coordinator decides (a lost worker).
    started_at: float | None = None


@dataclass(frozen=True)
class LiveWorker:
    worker_id: str
    address: str
    takes: int  # how many tasks it takes at once: its slots and its prefetch
    running: int
    active_task_ids: frozenset[str]


class TaskStore:
    def __init__(self, pool: ConnectionPool, *, max_retry_delay_s: float = MAX_RETRY_DELAY_S) -> None:
        self.pool = pool
        self.max_retry_delay_s = max_retry_delay_s
        self._sql = queries()

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor]:
        """A cursor on a pooled autocommit connection; driver errors become distrack's own."""
        try:
            with self.pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except PoolTimeout as exc:
            raise DatabaseUnavailable(f"no database connection available: {exc}") from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc}".strip()) from None
        except psycopg.DataError as exc:
            # Data the database cannot hold (an encoding it lacks, a value out of range): the
            # caller's input, not an outage.
            raise DataRejected(f"the database rejected the data: {exc}".strip()) from None
        except psycopg.Error as exc:
            # Anything else (schema missing, read-only after a failover...) is the service's
            # problem, not the client's; logged in full, reported as unavailable.
            log.error("database error: %s: %s", type(exc).__name__, exc)
            raise DatabaseUnavailable(f"database error: {type(exc).__name__}") from None

    def _one(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        with self._cursor() as cur:
            cur.execute(self._sql[name], params)
            return cur.fetchone()

    def _all(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            cur.execute(self._sql[name], params)
            return cur.fetchall()

    # --- the scheduler's side

    def insert_task(self, command: str, delay_seconds: float = 0.0, *, max_attempts: int = 1,
                    timeout_seconds: float | None = None) -> dict[str, Any]:
        """Commits one queued task, as a batch of one (the statement the API uses), and returns it as
        get_task would show it now."""
        inserted = self.insert_tasks([TaskSpec(command, float(delay_seconds), max_attempts, timeout_seconds)])
        return {"id": uuid.UUID(inserted.ids[0]), "command": command, "scheduled_at": inserted.scheduled_ats[0],
                "status": "queued", "attempts": 0, "max_attempts": max_attempts, "timeout_seconds": timeout_seconds}

    def insert_tasks(self, tasks: Sequence[TaskSpec]) -> InsertedTasks:
        """Commits a batch of queued tasks in one statement (one wake-up); returns their ids and due
        times, in the input's order."""
        ids = random_uuid4s(len(tasks))
        delays_us = [delay_microseconds(t.delay_seconds) for t in tasks]
        row = self._one("insert_tasks", {
            "ids": text_array(ids),
            # UTF-8 as it is: the database converts it, or refuses what its encoding cannot hold.
            "commands": text_array(t.command for t in tasks),
            "delays_us": number_array(delays_us),
            "max_attempts": number_array(t.max_attempts for t in tasks),
            "timeouts": number_array(t.timeout_seconds for t in tasks),
        })
        if row is None or row["count"] != len(tasks):  # cannot happen unless the schema gains a rule
            raise RuntimeError(f"insert_tasks stored {row and row['count']} of {len(tasks)} tasks")
        # In UTC, not the session's time zone: adding a delay to a local time with daylight saving
        # would move the wall clock, where PostgreSQL added exact microseconds.
        now: datetime = row["now"].astimezone(UTC)
        # A batch's tasks mostly share a delay: one datetime each, not one per task.
        due: dict[int, datetime] = {}
        scheduled_ats = [due.get(us) or due.setdefault(us, now + timedelta(microseconds=us)) for us in delays_us]
        return InsertedTasks(ids, scheduled_ats)

    def get_task(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        return self._one("get_task", {"id": task_id})

    def cancel_task(self, task_id: uuid.UUID) -> str | None:
        """Cancels a queued task, or asks for a picked or running one to be stopped.

        Returns the status after the call ('cancelled', or 'picked'/'running' while the stop is under
        way), or None when the task is unknown or already finished.
        """
        row = self._one("cancel_task", {"id": task_id})
        if row is None:
            return None
        if row["status"] != "cancelled":
            self._one("notify_cancel", {"id": str(task_id)})
        return row["status"]

    def ping(self) -> None:
        self._one("ping")

    # --- the coordinator's side: claiming and reports

    def claim_due(self, worker_ids: Sequence[str]) -> list[ClaimedTask]:
        """Claims up to len(worker_ids) due tasks, the n-th for the n-th worker, in one transaction."""
        return self.claim(worker_ids)[0]

    def claim(self, worker_ids: Sequence[str]) -> tuple[list[ClaimedTask], float | None]:
        """claim_due, and how many seconds until the next queued task it did not claim is due, from the
        same statement: None when there is none; 0.0 when one fell due while the claim ran (claim again
        at once); below zero when one was due when the claim looked and was left, held by another
        coordinator or beyond the slots."""
        if not worker_ids:
            return [], self.seconds_until_next_due()
        rows = self._all("claim_due", {"worker_ids": text_array(worker_ids)})
        tasks = [
            ClaimedTask(r["id"], r["command"], r["lease"], r["attempt"], r["timeout_seconds"], r["scheduled_at"],
                        r["worker_id"])
            for r in rows if r["id"] is not None
        ]
        summary = next(r for r in rows if r["id"] is None)
        next_due_s = summary["next_due_s"]
        if next_due_s is not None and next_due_s <= 0 and not summary["left_due"]:
            next_due_s = 0.0  # fell due while the statement ran: nothing was left behind
        # The order the statement paired tasks with workers in: confirming them in it keeps the turn.
        tasks.sort(key=lambda t: (t.scheduled_at, t.id))
        return tasks, next_due_s

    def seconds_until_next_due(self) -> float | None:
        row = self._one("seconds_until_next_due")
        return None if row is None else row["seconds"]

    def reassign(self, attempt: Attempt, new_worker_id: str) -> bool:
        return self._one("reassign", {**_fence(attempt), "new_worker_id": new_worker_id}) is not None

    def unclaim(self, attempt: Attempt) -> bool:
        return self._one("unclaim", _fence(attempt)) is not None

    def mark_running(self, attempt: Attempt, started_at: float | None = None) -> bool:
        """Records a start (at `started_at`, Unix seconds, else now): True when the worker may (still)
        run it; False tells it to stop."""
        return attempt.task_id in self.mark_running_many([(attempt, started_at)])

    def mark_running_many(self, starts: Sequence[tuple[Attempt, float | None]]) -> set[uuid.UUID]:
        """mark_running for a batch, in one statement: the ids whose worker may (still) run them."""
        if not starts:
            return set()
        params = {**_fences([a for a, _ in starts]), "started_ats": number_array(at for _, at in starts)}
        return {r["id"] for r in self._all("mark_running", params)}

    def cancel_refused_starts(self, attempts: Sequence[Attempt]) -> set[uuid.UUID]:
        """After mark_running refused the owners because of a cancel: cancels those tasks now."""
        if not attempts:
            return set()
        return {r["id"] for r in self._all("cancel_refused_starts", _fences(attempts))}

    def mark_completed(self, attempt: Attempt, exit_code: int, started_at: float | None = None) -> bool:
        return attempt.task_id in self.mark_completed_many([(attempt, exit_code, started_at)])

    def mark_completed_many(self, completed: Sequence[tuple[Attempt, int, float | None]]) -> set[uuid.UUID]:
        """Records successful ends in one statement (and the start of any still picked, at its
        started_at); the ids still current (the others were stale)."""
        if not completed:
            return set()
        params = {**_fences([a for a, _, _ in completed]), "exit_codes": number_array(code for _, code, _ in completed),
                  "started_ats": number_array(at for _, _, at in completed)}
        return {r["id"] for r in self._all("mark_completed", params)}

    def end_attempts(self, ended: Sequence[EndedAttempt], retry_delay_s: float) -> dict[uuid.UUID, str]:
        """Ends attempts that did not succeed; returns {task_id: new status} for those still current."""
        if not ended:
            return {}
        rows = self._all(
            "end_attempts",
            {
                **_fences([e.attempt for e in ended]),
                "exit_codes": number_array(e.exit_code for e in ended),
                "errors": text_array(e.error for e in ended),
                "started_ats": number_array(e.started_at for e in ended),
                "retry_delay_s": retry_delay_s,
                "max_retry_delay_s": self.max_retry_delay_s,
            },
        )
        return {r["id"]: r["status"] for r in rows}

    # --- the coordinator's side: rescue

    def orphaned_attempts(self, ttl_s: float) -> list[tuple[Attempt, bool, float | None]]:
        """Attempts held by workers silent for longer than `ttl_s` (or unknown): each with whether it
        had started (running) and how long the worker has been silent (None: never registered)."""
        rows = self._all("orphaned_attempts", {"ttl_s": ttl_s})
        return [(Attempt(r["id"], r["lease"], r["worker_id"]), r["status"] == "running", r["silent_s"])
                for r in rows]

    def unacknowledged_attempts(self, ack_timeout_s: float) -> list[Attempt]:
        """Picked attempts their worker's heartbeat shows it does not hold (see queries.sql)."""
        rows = self._all("unacknowledged_attempts", {"ack_timeout_s": ack_timeout_s})
        return [Attempt(r["id"], r["lease"], r["worker_id"]) for r in rows]

    def unlisted_runs(self, worker_id: str, listed: Sequence[str], grace_s: float) -> list[Attempt]:
        rows = self._all("unlisted_runs", {"worker_id": worker_id, "task_ids": list(listed), "grace_s": grace_s})
        return [Attempt(r["id"], r["lease"], r["worker_id"]) for r in rows]

    def worker_attempts(self, worker_id: str) -> list[tuple[Attempt, bool]]:
        """What a worker holds, each with whether it started."""
        rows = self._all("worker_attempts", {"worker_id": worker_id})
        return [(Attempt(r["id"], r["lease"], r["worker_id"]), r["status"] == "running") for r in rows]

    # --- the coordinator's side: the shared worker registry

    def record_heartbeat(self, worker_id: str, address: str, slots: int, running: Sequence[str],
                         unfinished: Sequence[str] = (), prefetch: int = 0) -> bool:
        """Upserts the worker's row (with the tasks it holds: `unfinished`, UUIDs); True when it is new."""
        row = self._one("upsert_worker", {"worker_id": worker_id, "address": address, "slots": slots,
                                          "prefetch": prefetch, "running": len(running),
                                          "unfinished": list(unfinished)})
        return bool(row and row["joined"])

    def runs_to_stop(self, worker_id: str, running: Sequence[str]) -> dict[str, bool]:
        """Of the tasks a worker runs, those it must stop, each with whether because its cancel was asked
        (else it is no longer the worker's)."""
        if not running:
            return {}
        rows = self._all("runs_to_stop", {"worker_id": worker_id, "task_ids": list(running)})
        return {str(r["id"]): r["cancel_asked"] for r in rows}

    def live_workers(self, ttl_s: float) -> list[LiveWorker]:
        rows = self._all("live_workers", {"ttl_s": ttl_s})
        return [
            LiveWorker(r["worker_id"], r["address"], r["takes"], r["running"],
                       frozenset(str(t) for t in r["active_task_ids"]))
            for r in rows
        ]

    def delete_stale_workers(self, ttl_s: float) -> list[dict[str, Any]]:
        return self._all("delete_stale_workers", {"ttl_s": ttl_s})

    def delete_worker(self, worker_id: str) -> bool:
        return self._one("delete_worker", {"worker_id": worker_id}) is not None

    def cancels_pending(self) -> list[tuple[uuid.UUID, str | None]]:
        return [(r["id"], r["worker_id"]) for r in self._all("cancels_pending")]


def any_requeued(statuses: dict[uuid.UUID, str]) -> bool:
    """Whether end_attempts put a task back in the queue (a retry). No NOTIFY announces that (the
    trigger is on INSERT), so whoever ended the attempts wakes the claim loop: it learns the retry's
    due time from its next claim."""
    return "queued" in statuses.values()


def delay_microseconds(delay_seconds: float) -> int:
    """A delay as the whole microseconds a task is stored due after its insert (PostgreSQL's timestamps
    count microseconds): the statement and the answer to the client use this one number."""
    return round(delay_seconds * 1_000_000)


def _fences(attempts: Sequence[Attempt]) -> dict[str, Any]:
    # Array literals: a report batch's statement is the coordinator's commonest, and psycopg would
    # dump each element of a list on its own (a quarter of the client's CPU per statement).
    return {
        "ids": uuid_array(a.task_id for a in attempts),
        "leases": number_array(a.lease for a in attempts),
        "worker_ids": text_array(a.worker_id for a in attempts),
    }


def _fence(attempt: Attempt) -> dict[str, Any]:
    return {"id": attempt.task_id, "lease": attempt.lease, "worker_id": attempt.worker_id}
