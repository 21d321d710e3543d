"""Shared pieces of the fault-injection suite: the report row, execution counting, the tally.

Executions are counted from an append-only log that every task command writes to when it starts
(`record_command`).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

ROWS: list[FaultRow] = []


@dataclass
class FaultRow:
    fault: str
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rerun: int = 0  # tasks that started more than once
    lost: int = 0  # accepted tasks not in a terminal state at the end
    duplicated: int = 0  # started twice or more outside crash windows (must be 0)
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)


class BackgroundLoop:
    """A daemon thread running `_run` until `stop()`; `_run` loops while `self._stop` is not set."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        raise NotImplementedError


def record_command(log: Path, then: str = "true") -> str:
    """A command that appends `task attempt worker` to `log` as it starts, then runs `then`."""
    return f'echo "$DISTRACK_TASK_ID $DISTRACK_ATTEMPT $DISTRACK_WORKER_ID" >> {log}; {then}'


def executions(log: Path) -> dict[str, list[tuple[int, str]]]:
    """{task_id: [(attempt, worker_id), ...]} in start order."""
    runs: dict[str, list[tuple[int, str]]] = defaultdict(list)
    if log.exists():
        for line in log.read_text().splitlines():
            task_id, attempt, worker_id = line.split()
            runs[task_id].append((int(attempt), worker_id))
    return runs


def final_rows(db_url: str, task_ids: list[str]) -> dict[str, dict]:
    with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        rows = conn.execute(
            "SELECT id::text AS id, status, attempts, worker_id, error FROM tasks WHERE id = ANY(%s::uuid[])",
            (task_ids,),
        ).fetchall()
    return {r["id"]: r for r in rows}


def wait_all_final(db_url: str, task_ids: list[str], timeout: float) -> float:
    """Waits until every task is completed, failed or cancelled; returns when that was (monotonic)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            (open_count,) = conn.execute(
                "SELECT count(*) FROM tasks WHERE id = ANY(%s::uuid[]) "
                "AND status NOT IN ('completed', 'failed', 'cancelled')",
                (task_ids,),
            ).fetchone()
            if open_count == 0:
                return time.monotonic()
            if time.monotonic() > deadline:
                pytest.fail(f"{open_count} of {len(task_ids)} tasks not finished after {timeout:.0f} s")
            time.sleep(0.05)


def tally(row: FaultRow, db_url: str, task_ids: list[str], log: Path, crashed_workers: set[str]) -> dict:
    """Fills the row's counts from the database and the execution log; returns the final rows.

    A start counts as in a crash window when it happened on a worker that the scenario killed,
    stopped or cut off. A task started twice or more outside such windows is a duplicate.
    """
    finals = final_rows(db_url, task_ids)
    runs = executions(log)
    row.submitted = len(task_ids)
    row.completed = sum(1 for r in finals.values() if r["status"] == "completed")
    row.failed = sum(1 for r in finals.values() if r["status"] == "failed")
    row.cancelled = sum(1 for r in finals.values() if r["status"] == "cancelled")
    row.lost = len(task_ids) - row.completed - row.failed - row.cancelled
    row.rerun = sum(1 for t in task_ids if len(runs.get(t, [])) > 1)
    row.duplicated = sum(
        1 for t in task_ids if sum(1 for _, worker in runs.get(t, []) if worker not in crashed_workers) > 1
    )
    stray = set(runs) - set(task_ids)
    assert not stray, f"executions of tasks nobody submitted: {sorted(stray)[:5]}"
    return finals
