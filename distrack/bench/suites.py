"""The measurements of each suite, against a stack under test. Figures come from here; printing and
the order of the run from distrack.bench.run.

Every latency comes from the tasks' own timestamps (PostgreSQL's `now()`), and every end-to-end rate is
tasks completed over the server's span (first scheduled_at to last completed_at), so neither depends
on how quickly the benchmark notices a task has finished.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrack.bench.client import ApiError, ClientPool, SchedulerClient, TransportError, batch_body, schedule_body
from distrack.bench.config import SuiteConfig
from distrack.bench.load import LoadResult, batch_sender, run_load, schedule_sender
from distrack.bench.machine import (
    CpuMeter,
    CpuUsage,
    MemoryGrowth,
    RssSampler,
    machine_busy_fraction,
    memory_growth,
)
from distrack.bench.progress import Progress
from distrack.bench.stack import OwnStack
from distrack.bench.stats import LatencyStats, durations, rate, server_span, summarize
from distrack.bench.watch import DbTasks, HttpTasks, TaskSource, wait_finished

BATCH_SIZE = 1000
# Throughput tasks are due in an hour, so no worker runs them while the accept path is measured;
# they are deleted (or cancelled over HTTP) right after.
THROUGHPUT_DELAY_S = 3600.0
# A fresh stack first runs a few tasks, so connection pools and lazy imports are not measured.
WARMUP_TASKS = 20
# "Idle" means the machine's cores are less than 15% busy (a stack at rest heartbeats and polls;
# autovacuum after a big delete does not count as rest). Waiting for it gives up after 15 s.
QUIET_BUSY_FRACTION = 0.15
QUIET_MAX_S = 15.0
QUIET_WINDOW_S = 0.5
SCALE_ROWS = 1_000_000
# Marks the rows the scale-rows suite inserts, so they can be removed from a database it does not own.
SCALE_ROWS_WORKER_ID = "distrack-bench-rows"
POSTGRES_PROCESS = "PostgreSQL"


def note(text: str) -> None:
    """A line for the person watching, on stderr (stdout is for the report or the JSON)."""
    print(text, file=sys.stderr, flush=True)


@dataclass
class StackUnderTest:
    """Where the suites send tasks, and what they may know of the stack behind it."""

    url: str
    database_url: str | None = None
    # Service name -> PID, for memory; empty for a stack the benchmark did not start.
    services: dict[str, int] = field(default_factory=dict)
    workers: int | None = None
    token: str | None = None
    own: bool = False
    # The embedded PostgreSQL's postmaster, for CPU; None for a database the benchmark did not start.
    postgres_pid: int | None = None

    @property
    def processes(self) -> dict[str, int]:
        """Whose CPU is counted one by one: the services, and PostgreSQL when it is ours."""
        return {**self.services, **({POSTGRES_PROCESS: self.postgres_pid} if self.postgres_pid else {})}

    def describe(self) -> str:
        who = f"own stack, {plural(self.workers or 0, 'worker')}" if self.own else "a running stack"
        db = "database: " + ("reachable" if self.database_url else "not given (tasks read over HTTP)")
        return f"{who} at {self.url}; {db}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def open_source(sut: StackUnderTest, config: SuiteConfig) -> DbTasks | HttpTasks:
    if sut.database_url:
        return DbTasks(sut.database_url)
    return HttpTasks(sut.url, concurrency=config.concurrency, poll_s=config.poll_interval_s, token=sut.token)


def settle(progress: Progress | None = None) -> float | None:
    """Waits (at most QUIET_MAX_S) until the machine is quiet; returns its last busy fraction."""
    deadline = time.monotonic() + QUIET_MAX_S
    while True:
        busy = machine_busy_fraction(QUIET_WINDOW_S)
        if busy is None or busy < QUIET_BUSY_FRACTION:
            return busy
        if time.monotonic() >= deadline:
            note(f"  the machine is still {busy:.0%} busy after {QUIET_MAX_S:g} s; measuring anyway")
            return busy
        if progress is not None:
            progress.update(f"waiting for the machine to be idle ({busy:.0%} busy)", force=True)


# --- a run of tasks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRun:
    """Tasks submitted through POST /schedule, waited for, and measured on the server's clock."""

    label: str
    load: LoadResult
    completed: int
    failed: int
    unfinished: int
    # From the first submission to the last task seen finished.
    cpu: CpuUsage
    server_span_s: float | None
    # scheduled_at -> completed_at (or failed_at).
    end_to_end: LatencyStats | None
    # scheduled_at -> started_at. For delayed tasks: how late after its due time a task started.
    pickup: LatencyStats | None
    # Tasks whose started_at is before their scheduled_at (would break guarantee 2).
    early_starts: int

    @property
    def submitted(self) -> int:
        return self.load.tasks

    @property
    def throughput_per_s(self) -> float:
        return rate(self.completed, self.server_span_s)

    @property
    def machine_ms_per_task(self) -> float | None:
        return self.cpu.machine_ms_per(self.completed)

    def cpu_split_ms_per_task(self) -> dict[str, float]:
        """Machine CPU per completed task by who spent it: each kind of service (the workers with the
        commands they ran), PostgreSQL, this benchmark, and the rest of the machine. Empty when the
        services' CPU is unknown (a stack the benchmark did not start)."""
        if not self.cpu.by_process_s or self.completed <= 0:
            return {}
        grouped: dict[str, float] = {}
        for name, seconds in self.cpu.by_process_s.items():
            kind = "workers, with their commands" if name.startswith("worker") else name
            grouped[kind] = grouped.get(kind, 0.0) + seconds
        grouped["this benchmark"] = self.cpu.client_s
        if self.cpu.machine_busy_s is not None:
            grouped["the rest of the machine"] = max(self.cpu.machine_busy_s - sum(grouped.values()), 0.0)
        return {kind: seconds * 1000 / self.completed for kind, seconds in grouped.items()}

    @property
    def all_completed(self) -> bool:
        return self.submitted > 0 and self.completed == self.submitted and self.load.errors == 0

    def to_dict(self) -> dict[str, Any]:
        def ms(stats: LatencyStats | None) -> dict[str, float | int] | None:
            return stats.to_ms_dict() if stats else None

        per_task = self.machine_ms_per_task
        return {
            "label": self.label,
            "submitted": self.submitted,
            "completed": self.completed,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "submit": self.load.to_dict(),
            "server_span_s": None if self.server_span_s is None else round(self.server_span_s, 6),
            "throughput_per_s": round(self.throughput_per_s, 2),
            "machine_cpu_ms_per_task": None if per_task is None else round(per_task, 4),
            "cpu": self.cpu.to_dict(),
            "early_starts": self.early_starts,
            "latency_ms": {"end_to_end": ms(self.end_to_end), "pickup": ms(self.pickup)},
        }


def measure_run(label: str, load: LoadResult, docs: Sequence[dict[str, Any]], unfinished: int,
                cpu: CpuUsage) -> TaskRun:
    """The figures of a run from its finished tasks' timestamps (pure: no I/O)."""
    finished = [doc for doc in docs if doc.get("status") in ("completed", "failed")]
    pickup = durations(docs, "scheduled_at", "started_at")
    return TaskRun(
        label=label,
        load=load,
        completed=sum(1 for doc in docs if doc.get("status") == "completed"),
        failed=sum(1 for doc in docs if doc.get("status") == "failed"),
        unfinished=unfinished,
        cpu=cpu,
        server_span_s=server_span(finished),
        end_to_end=summarize(durations(finished, "scheduled_at")),
        pickup=summarize(pickup),
        early_starts=sum(1 for value in pickup if value < 0),
    )


def run_tasks(
    sut: StackUnderTest,
    source: TaskSource,
    config: SuiteConfig,
    *,
    label: str,
    delay_s: float = 0.0,
    count: int | None = None,
    duration_s: float | None = None,
    interval_s: float = 0.0,
    batched: bool = False,
    progress: Progress | None = None,
    sampler: RssSampler | None = None,
) -> TaskRun:
    """Submits tasks of config.command (count, or for duration_s), waits for them, measures them.
    `batched`: `count` tasks in POST /tasks batches of up to BATCH_SIZE from one client, rather than one
    POST /schedule each from config.concurrency clients. A `sampler` runs while the tasks are being
    submitted."""
    progress = progress or Progress()
    meter = CpuMeter(sut.processes)
    if sampler:
        sampler.start()
    try:
        if batched:
            assert count is not None, "a batched run has a count"
            size = min(count, BATCH_SIZE)
            load = run_load(sut.url, batch_sender(batch_body(config.command, delay_s, size)), concurrency=1,
                            count=-(-count // size), token=sut.token, progress=progress,
                            label=f"{label}: submitting")
        else:
            load = run_load(sut.url, schedule_sender(schedule_body(config.command, delay_s)),
                            concurrency=config.concurrency, count=count, duration_s=duration_s,
                            interval_s=interval_s, token=sut.token, progress=progress,
                            label=f"{label}: submitting")
    finally:
        if sampler:
            sampler.stop()
    if load.first_error:
        note(f"  {label}: {load.errors} submissions failed, first: {load.first_error}")
    waited = wait_finished(source, load.task_ids, timeout_s=config.timeout_s + delay_s, progress=progress,
                           label=f"{label}: finished")
    cpu = meter.stop()
    run = measure_run(label, load, waited.docs, waited.unfinished, cpu)
    if not run.all_completed:
        note(f"  {label}: {run.completed} of {run.submitted} submitted tasks completed, {run.failed} failed, "
             f"{run.unfinished} unfinished after {config.timeout_s:g} s")
    return run


def warm_up(sut: StackUnderTest, source: TaskSource, config: SuiteConfig) -> None:
    run_tasks(sut, source, config, label="warm-up", count=WARMUP_TASKS)


# --- throughput ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputResult:
    schedule: LoadResult
    batch: LoadResult
    batch_size: int
    removed: int

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "batch": self.batch.to_dict(), "batch_size": self.batch_size,
                "tasks_removed_afterwards": self.removed}


def throughput_suite(sut: StackUnderTest, config: SuiteConfig, progress: Progress) -> ThroughputResult:
    """POST /schedule, then POST /tasks batches, each from config.concurrency clients for config.throughput_s."""
    note(f"[throughput] POST /schedule from {config.concurrency} keep-alive clients for {config.throughput_s:g} s")
    schedule = run_load(sut.url, schedule_sender(schedule_body(config.command, THROUGHPUT_DELAY_S)),
                        concurrency=config.concurrency, duration_s=config.throughput_s, token=sut.token,
                        progress=progress, label="POST /schedule")
    note(f"[throughput] POST /tasks, batches of {BATCH_SIZE:,}, from {config.concurrency} clients "
         f"for {config.throughput_s:g} s")
    batch = run_load(sut.url, batch_sender(batch_body(config.command, THROUGHPUT_DELAY_S, BATCH_SIZE)),
                     concurrency=config.concurrency, duration_s=config.throughput_s, token=sut.token,
                     progress=progress, label="POST /tasks")
    for load in (schedule, batch):
        if load.first_error:
            note(f"  {load.errors} requests failed, first: {load.first_error}")
    removed = remove_tasks(sut, schedule.task_ids + batch.task_ids, config, progress)
    return ThroughputResult(schedule, batch, BATCH_SIZE, removed)


def remove_tasks(sut: StackUnderTest, task_ids: Sequence[str], config: SuiteConfig, progress: Progress) -> int:
    """Deletes the not-yet-due throughput tasks (one statement), or cancels them over HTTP."""
    if not task_ids:
        return 0
    if sut.database_url:
        import psycopg

        with psycopg.connect(sut.database_url, autocommit=True) as conn:
            cursor = conn.execute("DELETE FROM tasks WHERE id = ANY(%s::uuid[]) AND status = 'queued'",
                                  (list(task_ids),))
            # The suites that follow measure an idle stack: the dead rows' vacuum and the dirty pages'
            # write-out happen now, not in autovacuum and the checkpointer while they measure.
            conn.execute("VACUUM ANALYZE tasks")
            checkpoint(conn)
            return cursor.rowcount
    note(f"[throughput] cancelling {len(task_ids):,} tasks over HTTP (give DATABASE_URL to delete them at once)")
    pool = ClientPool(lambda: SchedulerClient(sut.url, token=sut.token))

    def cancel(task_id: str) -> bool:
        try:
            pool.get().cancel(task_id)
            return True
        except (ApiError, TransportError):
            return False

    try:
        with ThreadPoolExecutor(max_workers=config.concurrency) as executor:
            cancelled = 0
            for done, ok in enumerate(executor.map(cancel, task_ids), 1):
                cancelled += ok
                progress.step("cancelling", done, len(task_ids))
    finally:
        progress.clear()
        pool.close_all()
    return cancelled


# --- latency -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    pickup: TaskRun
    delayed: TaskRun
    delay_s: float
    interval_ms: float
    end_to_end: TaskRun

    def to_dict(self) -> dict[str, Any]:
        return {"pickup": self.pickup.to_dict(), "delayed": self.delayed.to_dict(), "delay_s": self.delay_s,
                "interval_ms": self.interval_ms, "end_to_end": self.end_to_end.to_dict()}


def latency_suite(sut: StackUnderTest, source: TaskSource, config: SuiteConfig, progress: Progress) -> LatencyResult:
    """Pickup on an idle stack, delayed tasks, then NUM_TASKS due at once (end to end)."""
    interval_s = config.interval_ms / 1000
    note(f"[latency] pickup on an idle stack: {config.count} tasks {config.interval_ms:g} ms apart")
    settle(progress)
    pickup = run_tasks(sut, source, config, label="pickup", count=config.count, interval_s=interval_s,
                       progress=progress)
    note(f"[latency] delayed: {config.count} tasks with delay_seconds {config.delay_s:g}, "
         f"{config.interval_ms:g} ms apart")
    settle(progress)
    delayed = run_tasks(sut, source, config, label="delayed", count=config.count, interval_s=interval_s,
                        delay_s=config.delay_s, progress=progress)
    end_to_end = end_to_end_run(sut, source, config, progress, label="end to end")
    return LatencyResult(pickup, delayed, config.delay_s, config.interval_ms, end_to_end)


def end_to_end_run(sut: StackUnderTest, source: TaskSource, config: SuiteConfig, progress: Progress, *,
                   label: str) -> TaskRun:
    note(f"[{label}] {config.e2e_count:,} tasks of {config.command!r} due at once, sent in batches of up to "
         f"{BATCH_SIZE:,}")
    settle(progress)
    return run_tasks(sut, source, config, label=label, count=config.e2e_count, batched=True, progress=progress)


# --- sustained -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SustainedResult:
    rate: float
    duration_s: float
    run: TaskRun
    memory: list[MemoryGrowth]

    def to_dict(self) -> dict[str, Any]:
        return {"rate_per_s": self.rate, "duration_s": self.duration_s, "run": self.run.to_dict(),
                "memory": [growth.to_dict() for growth in self.memory]}


def sustained_suite(sut: StackUnderTest, source: TaskSource, config: SuiteConfig,
                    progress: Progress) -> SustainedResult:
    """config.rate tasks a second for config.duration_s, sampling every service's RSS meanwhile."""
    note(f"[sustained] {config.rate:g} tasks/s for {config.duration_s:g} s"
         + ("" if sut.services else " (no service PIDs known: memory not sampled)"))
    settle(progress)
    sampler = RssSampler(sut.services) if sut.services else None
    run = run_tasks(sut, source, config, label="sustained", duration_s=config.duration_s,
                    interval_s=1 / config.rate, progress=progress, sampler=sampler)
    return SustainedResult(config.rate, config.duration_s, run, memory_growth(sampler.samples if sampler else []))


# --- scaling and scale-rows ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingResult:
    steps: list[tuple[int, TaskRun]]

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [{"workers": workers, **run.to_dict()} for workers, run in self.steps]}


@dataclass(frozen=True)
class ScaleRowsResult:
    rows_before: int
    empty: TaskRun
    inserted: int
    insert_s: float
    full: TaskRun

    def to_dict(self) -> dict[str, Any]:
        return {"rows_before": self.rows_before, "empty": self.empty.to_dict(), "rows_inserted": self.inserted,
                "insert_s": round(self.insert_s, 3), "full": self.full.to_dict()}


_INSERT_FINISHED_ROWS = """
INSERT INTO tasks (id, command, scheduled_at, picked_at, started_at, completed_at, status, attempts,
                   max_attempts, worker_id, exit_code)
SELECT gen_random_uuid(), %(command)s, s.at, s.at + interval '1 ms', s.at + interval '2 ms',
       s.at + interval '3 ms', 'completed', 1, 1, %(worker_id)s, 0
FROM generate_series(1, %(rows)s) AS g (i),
     LATERAL (SELECT now() - interval '30 days' + g.i * interval '1 ms') AS s (at)
"""


def scale_rows_suite(sut: StackUnderTest, source: TaskSource, config: SuiteConfig, progress: Progress, *,
                     keep_rows: bool) -> ScaleRowsResult:
    """End to end on the table as it is, then again with SCALE_ROWS finished rows added (one INSERT ...
    SELECT generate_series, then VACUUM ANALYZE as autovacuum would, and a CHECKPOINT). The rows are
    deleted afterwards unless `keep_rows` (a throwaway database)."""
    import psycopg

    assert sut.database_url, "scale-rows needs the database"
    with psycopg.connect(sut.database_url, autocommit=True) as conn:
        rows_before = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        empty = end_to_end_run(sut, source, config, progress, label=f"scale-rows: {rows_before:,} rows")
        note(f"[scale-rows] inserting {SCALE_ROWS:,} finished rows")
        started = time.monotonic()
        inserted = conn.execute(_INSERT_FINISHED_ROWS, {"command": config.command, "worker_id": SCALE_ROWS_WORKER_ID,
                                                        "rows": SCALE_ROWS}).rowcount
        conn.execute("VACUUM ANALYZE tasks")
        insert_s = time.monotonic() - started
        # The load left a few hundred megabytes of dirty pages, which PostgreSQL would otherwise write
        # out during the run that follows: that run measures a big table, not a checkpoint of it.
        checkpoint(conn)
        try:
            full = end_to_end_run(sut, source, config, progress, label=f"scale-rows: +{inserted:,} rows")
        finally:
            if not keep_rows:
                conn.execute("DELETE FROM tasks WHERE worker_id = %s", (SCALE_ROWS_WORKER_ID,))
    return ScaleRowsResult(rows_before, empty, inserted, insert_s, full)


def checkpoint(conn: Any) -> None:
    """CHECKPOINT, when the role may (a superuser, or pg_checkpoint); otherwise says why not."""
    import psycopg

    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        note("  (no CHECKPOINT: the role may not; the bulk load's pages are written out during the run)")


def own_stack_under_test(stack: OwnStack, config: SuiteConfig) -> StackUnderTest:
    return StackUnderTest(url=stack.url, database_url=stack.database_url, services=dict(stack.services),
                          workers=stack.workers, token=config.token, own=True, postgres_pid=stack.postgres_pid)


def scaling_suite(config: SuiteConfig, work_dir: Path, progress: Progress) -> ScalingResult:
    """End to end with 1, 2, ... config.workers workers, each on a stack of its own started for it
    (one after the other, on the same embedded database, so no two stacks share the cores)."""
    steps = []
    for workers in range(1, config.workers + 1):
        note(f"[scaling] starting a stack with {plural(workers, 'worker')}")
        with OwnStack(workers, work_dir) as stack:
            sut = own_stack_under_test(stack, config)
            with open_source(sut, config) as source:
                warm_up(sut, source, config)
                steps.append((workers, end_to_end_run(sut, source, config, progress,
                                                      label=f"scaling: {plural(workers, 'worker')}")))
    return ScalingResult(steps)
