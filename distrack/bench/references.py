"""The machine's limits, measured in the same run as distrack's figures.

- bash: how fast this machine runs `bash -c CMD` with its output to a file, from a pool of threads as
  large as the benchmark's concurrency, each spawning the command with the worker's own code (own
  session, stdin from /dev/null, stdout and stderr to one file, posix_spawn) and waiting for it. The
  limit for shell tasks.
- PostgreSQL: the same inserts as distrack's, into a scratch table shaped like `tasks` (LIKE tasks
  INCLUDING ALL: same columns, defaults, checks and indexes, no trigger) in the stack's own database:
  single-row INSERTs committed one by one from `concurrency` connections, and one
  INSERT ... SELECT FROM unnest per batch of 1,000. The driver talks libpq through psycopg's low-level
  `pgconn` with a prepared statement and parameters encoded once, so a Python client costs little
  beside the server; ids come from gen_random_uuid() and no row is returned. The table is dropped
  afterwards.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrack.bench.config import REFERENCE_S
from distrack.bench.machine import CpuMeter, CpuUsage
from distrack.bench.progress import Progress
from distrack.bench.stats import rate
from distrack.db.literals import text_array
from distrack.worker.runner import spawn

BATCH_SIZE = 1000
# The scratch rows are due in an hour, like the throughput suite's tasks (the value costs nothing).
SCRATCH_DELAY_S = 3600.0


@dataclass(frozen=True)
class RateResult:
    """Operations (bash runs, or rows inserted) over a timed window, and the CPU they cost."""

    name: str
    operations: int
    failures: int
    cpu: CpuUsage

    @property
    def per_s(self) -> float:
        return rate(self.operations, self.cpu.wall_s)

    @property
    def machine_ms_per_op(self) -> float | None:
        return self.cpu.machine_ms_per(self.operations)

    def to_dict(self) -> dict[str, Any]:
        ms = self.machine_ms_per_op
        return {"name": self.name, "operations": self.operations, "failures": self.failures,
                "per_s": round(self.per_s, 2), "machine_cpu_ms_per_op": None if ms is None else round(ms, 4),
                "client_cpu_share_of_a_core": round(self.cpu.client_share, 4), "cpu": self.cpu.to_dict()}


def _timed_threads(
    step: Callable[[int], int], *, threads: int, duration_s: float, progress: Progress, label: str,
    setup: Callable[[], Any] | None = None,
) -> tuple[int, int, CpuUsage]:
    """Runs `step(index) -> operations done` in `threads` threads until `duration_s` is over; returns
    (operations, failed steps, CPU). A step that raises counts as failed."""
    counter = itertools.count()
    totals = [0, 0]
    lock = threading.Lock()
    meter = CpuMeter()
    end = time.monotonic() + duration_s

    def loop() -> None:
        done = failed = 0
        while (now := time.monotonic()) < end:
            try:
                done += step(next(counter))
            except Exception:  # noqa: BLE001 - a failed run is counted, and the rate still means something
                failed += 1
            progress.elapsed(label, now - (end - duration_s), duration_s)
        with lock:
            totals[0] += done
            totals[1] += failed

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reference") as executor:
        for future in [executor.submit(loop) for _ in range(threads)]:
            future.result()
    progress.clear()
    return totals[0], totals[1], meter.stop()


def bash_reference(command: str, *, concurrency: int, duration_s: float = REFERENCE_S,
                   progress: Progress | None = None, out_dir: Path | None = None) -> RateResult:
    """`bash -c command` as fast as `concurrency` threads can run it, output to files in `out_dir`
    (made, and left for the caller to remove), or in a temporary folder removed afterwards.

    The benchmark passes a folder it removes only when the whole run is over: removing thousands of
    files can make creating files slow for the next minute or so (ext4 without a journal skips inodes
    deleted recently, and looks at each one to know), which would tax whatever the run measures next."""
    keep = out_dir is not None
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="distrack-bench-bash-"))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)

    def run_one(index: int) -> int:
        # Spawned and awaited exactly as a worker does it (the same code), so the ratio compares like
        # with like.
        code = spawn(command, out_dir / f"{index}.txt").wait()
        if code != 0:
            raise RuntimeError(f"exit {code}")
        return 1

    try:
        runs, failures, cpu = _timed_threads(run_one, threads=concurrency, duration_s=duration_s,
                                             progress=progress or Progress(), label="reference: bash -c")
    finally:
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    return RateResult(f"bash -c {command!r}, {concurrency} threads", runs, failures, cpu)


# --- PostgreSQL ----------------------------------------------------------------------------------

_INSERT_ONE = """
INSERT INTO {table} (id, command, scheduled_at, max_attempts, timeout_seconds)
VALUES (gen_random_uuid(), $1, now() + make_interval(secs => $2::float8), 1, NULL)
"""
_INSERT_BATCH = """
INSERT INTO {table} (id, command, scheduled_at, max_attempts, timeout_seconds)
SELECT gen_random_uuid(), b.command, now() + make_interval(secs => b.delay_seconds), 1, NULL
FROM unnest($1::text[], $2::float8[]) AS b (command, delay_seconds)
"""


@dataclass(frozen=True)
class PostgresReference:
    single: RateResult
    batch: RateResult

    def to_dict(self) -> dict[str, Any]:
        return {"single_row": self.single.to_dict(), "batch": self.batch.to_dict()}


def scratch_table_name() -> str:
    return f"distrack_bench_scratch_{os.getpid()}"


def postgres_reference(database_url: str, command: str, *, concurrency: int, duration_s: float = REFERENCE_S,
                       batch_size: int = BATCH_SIZE, progress: Progress | None = None) -> PostgresReference:
    """Single-row commits and unnest batches into a scratch copy of `tasks`, dropped afterwards."""
    import psycopg

    progress = progress or Progress()
    table = scratch_table_name()
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (LIKE tasks INCLUDING ALL)")
        try:
            single_params = [command.encode(), str(SCRATCH_DELAY_S).encode()]
            single = _pg_rate(database_url, _INSERT_ONE.format(table=table), single_params, rows=1,
                              concurrency=concurrency, duration_s=duration_s, progress=progress,
                              label="reference: PostgreSQL single-row INSERT")
            batch_params = [text_array([command] * batch_size).encode(),
                            ("{" + ",".join([str(SCRATCH_DELAY_S)] * batch_size) + "}").encode()]
            batch = _pg_rate(database_url, _INSERT_BATCH.format(table=table), batch_params, rows=batch_size,
                             concurrency=concurrency, duration_s=duration_s, progress=progress,
                             label=f"reference: PostgreSQL INSERT ... unnest x{batch_size}")
        finally:
            admin.execute(f"DROP TABLE IF EXISTS {table}")
    return PostgresReference(
        RateResult(f"PostgreSQL single-row INSERT commits, {concurrency} connections", *single),
        RateResult(f"PostgreSQL INSERT ... unnest, batches of {batch_size:,}", *batch),
    )


def _pg_rate(database_url: str, sql: str, params: list[bytes], *, rows: int, concurrency: int,
             duration_s: float, progress: Progress, label: str) -> tuple[int, int, CpuUsage]:
    """Rows inserted by running the prepared `sql` with `params` (autocommit) from each connection."""
    import psycopg
    from psycopg import pq

    connections = [psycopg.connect(database_url, autocommit=True) for _ in range(concurrency)]
    try:
        for conn in connections:
            result = conn.pgconn.prepare(b"bench_insert", sql.encode())
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise RuntimeError(f"cannot prepare the reference insert: {result.error_message.decode()}")
        local = threading.local()
        free = iter(connections)
        lock = threading.Lock()

        def insert(_index: int) -> int:
            pgconn = getattr(local, "pgconn", None)
            if pgconn is None:
                with lock:
                    pgconn = local.pgconn = next(free).pgconn
            result = pgconn.exec_prepared(b"bench_insert", params)
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise RuntimeError(result.error_message.decode())
            return rows

        return _timed_threads(insert, threads=concurrency, duration_s=duration_s, progress=progress, label=label)
    finally:
        for conn in connections:
            conn.close()
