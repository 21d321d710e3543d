"""Issue 4's targets, and the table's figures made from each suite's results and the references."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from distrack.bench.references import PostgresReference, RateResult
from distrack.bench.stats import LatencyStats
from distrack.bench.suites import (
    LatencyResult,
    ScaleRowsResult,
    ScalingResult,
    SustainedResult,
    TaskRun,
    ThroughputResult,
    plural,
)
from distrack.bench.table import Figure, Target

# Issue 4's targets, for 2 cores with the whole stack and PostgreSQL on one machine.
# The end-to-end ones are stated for 3 workers; with another count they are left out.
E2E_TARGET_WORKERS = 3
E2E_VS_BASH = Target(">=", 0.60, ">= 60% of bash (3 workers)", on_ratio=True)
E2E_CPU_PER_TASK_MS = Target("<=", 3.0, "<= 3 ms")
ALL_COMPLETED = Target(">=", 1.0, "all", on_ratio=True)
SCHEDULE_PER_S = Target(">=", 2000, ">= 2,000/s (16 clients)")
BATCH_PER_S = Target(">=", 50_000, ">= 50,000/s")
PICKUP_P50_MS = Target("<=", 3.0, "<= 3 ms")
PICKUP_P99_MS = Target("<=", 10.0, "<= 10 ms")
DELAYED_P99_MS = Target("<=", 10.0, "<= 10 ms")
NEVER_EARLY_MS = Target(">=", 0.0, ">= 0 (never negative)")
SCALE_ROWS_VS_EMPTY = Target(">=", 0.90, ">= 90% of empty", on_ratio=True)
# "No service grows once warm": the last third's mean RSS within 5% of the first third's. A Python
# process's RSS wobbles by a few percent as its allocator's arenas fill and empty; a leak under
# hundreds of tasks a second shows as steady growth well past that.
NO_GROWTH = Target("<=", 1.05, "no growth (<= +5%)", on_ratio=True)
# The load generator runs in one Python process, so its threads share one GIL: near a full core it
# could be what limits the rate, rather than the server.
CLIENT_CPU_PCT = Target("<=", 80.0, "<= 80% of a core")


@dataclass
class References:
    """The machine's limits measured in this run (empty or None when not measured). bash -c is measured
    at the start and at the end of the run, and compared with by its mean: this machine's speed can
    drift by tens of percent within minutes (a virtual machine's host is shared), and the two show it."""

    bash: list[RateResult] = field(default_factory=list)
    postgres: PostgresReference | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"bash": [run.to_dict() for run in self.bash], "bash_per_s": self.bash_rate,
                "bash_machine_cpu_ms": self.bash_ms, "postgres": self.postgres.to_dict() if self.postgres else None}

    @property
    def bash_rate(self) -> float | None:
        return statistics.fmean(run.per_s for run in self.bash) if self.bash else None

    @property
    def bash_ms(self) -> float | None:
        values = [ms for run in self.bash if (ms := run.machine_ms_per_op) is not None]
        return statistics.fmean(values) if values else None

    @property
    def bash_label(self) -> str:
        return "bash" if self.bash else ""


def _ms(stats: LatencyStats | None, name: str) -> float | None:
    return None if stats is None else getattr(stats, name) * 1000


def reference_figures(refs: References) -> list[Figure]:
    figures = []
    when = ["start of run", "end of run"] if len(refs.bash) == 2 else [f"run {i + 1}" for i in range(len(refs.bash))]
    for run, moment in zip(refs.bash, when, strict=True):
        figures.append(Figure("references", f"{run.name}, {moment}", run.per_s, "/s"))
    if len(refs.bash) > 1:
        figures.append(Figure("references", "bash -c, mean (the reference below)", refs.bash_rate, "/s"))
    if refs.bash:
        figures.append(Figure("references", "machine CPU per bare bash -c, mean", refs.bash_ms, "ms"))
    if refs.postgres:
        for result in (refs.postgres.single, refs.postgres.batch):
            figures.append(Figure("references", result.name, result.per_s, "/s"))
    return figures


def throughput_figures(result: ThroughputResult, refs: References, concurrency: int) -> list[Figure]:
    pg = refs.postgres
    schedule, batch = result.schedule, result.batch
    return [
        Figure("throughput", f"POST /schedule, {concurrency} keep-alive clients", schedule.tasks_per_s, "/s",
               pg.single.per_s if pg else None, "PostgreSQL 1-row" if pg else "", SCHEDULE_PER_S),
        Figure("throughput", "POST /schedule round trip p99", _ms(schedule.round_trip, "p99_s"), "ms"),
        Figure("throughput", "load generator CPU, POST /schedule", schedule.cpu.client_share * 100, "%",
               target=CLIENT_CPU_PCT),
        Figure("throughput", f"POST /tasks, batches of {result.batch_size:,}", batch.tasks_per_s, "/s",
               pg.batch.per_s if pg else None, "PostgreSQL unnest" if pg else "", BATCH_PER_S),
        Figure("throughput", "load generator CPU, POST /tasks", batch.cpu.client_share * 100, "%",
               target=CLIENT_CPU_PCT),
    ]


def end_to_end_figures(suite: str, run: TaskRun, refs: References, *, name: str, targets: bool) -> list[Figure]:
    """Throughput against bare bash, every task completed, machine CPU per task, latency; with issue 4's
    end-to-end targets when `targets`."""
    return [
        Figure(suite, name, run.throughput_per_s, "/s", refs.bash_rate, refs.bash_label,
               E2E_VS_BASH if targets else None),
        Figure(suite, "tasks completed", run.completed, "", run.submitted, "submitted", ALL_COMPLETED),
        Figure(suite, "machine CPU per task", run.machine_ms_per_task, "ms", refs.bash_ms,
               refs.bash_label, E2E_CPU_PER_TASK_MS if targets else None),
        *cpu_split_figures(suite, run),
        Figure(suite, "end-to-end latency p50 (scheduled_at -> completed_at)", _ms(run.end_to_end, "p50_s"), "ms"),
        Figure(suite, "end-to-end latency p99", _ms(run.end_to_end, "p99_s"), "ms"),
    ]


def cpu_split_figures(suite: str, run: TaskRun) -> list[Figure]:
    """Where the machine CPU per task went, by process (none when the services are not ours)."""
    return [Figure(suite, f"  of which {kind}", ms, "ms") for kind, ms in run.cpu_split_ms_per_task().items()]


def latency_figures(result: LatencyResult, refs: References, workers: int | None) -> list[Figure]:
    pickup, delayed = result.pickup.pickup, result.delayed.pickup
    spacing = f"{result.interval_ms:g} ms apart"
    workers_text = f", {plural(workers, 'worker')}" if workers else ""
    return [
        Figure("latency", f"pickup on an idle stack p50 ({spacing})", _ms(pickup, "p50_s"), "ms",
               target=PICKUP_P50_MS),
        Figure("latency", "pickup on an idle stack p99", _ms(pickup, "p99_s"), "ms", target=PICKUP_P99_MS),
        Figure("latency", f"delayed {result.delay_s:g} s: started_at - scheduled_at p99", _ms(delayed, "p99_s"),
               "ms", target=DELAYED_P99_MS),
        Figure("latency", "delayed: started_at - scheduled_at min", _ms(delayed, "min_s"), "ms",
               target=NEVER_EARLY_MS),
        *end_to_end_figures("latency", result.end_to_end, refs, name=f"end to end{workers_text}",
                            targets=workers in (None, E2E_TARGET_WORKERS)),
    ]


def sustained_figures(result: SustainedResult, refs: References) -> list[Figure]:
    run = result.run
    figures = [
        Figure("sustained", f"throughput at {result.rate:g}/s offered for {result.duration_s:g} s",
               run.throughput_per_s, "/s", result.rate, "offered"),
        Figure("sustained", "tasks completed", run.completed, "", run.submitted, "submitted", ALL_COMPLETED),
        Figure("sustained", "end-to-end latency p50", _ms(run.end_to_end, "p50_s"), "ms"),
        Figure("sustained", "end-to-end latency p99", _ms(run.end_to_end, "p99_s"), "ms"),
        Figure("sustained", "pickup p99", _ms(run.pickup, "p99_s"), "ms"),
        Figure("sustained", "machine CPU per task", run.machine_ms_per_task, "ms", refs.bash_ms,
               refs.bash_label),
        *cpu_split_figures("sustained", run),
        Figure("sustained", "load generator CPU", run.load.cpu.client_share * 100, "%", target=CLIENT_CPU_PCT),
    ]
    for growth in result.memory:
        figures.append(Figure("sustained", f"RSS {growth.service}, last third", growth.last_mib, "MiB",
                              growth.first_mib, "first third", NO_GROWTH))
    return figures


def scaling_figures(result: ScalingResult, refs: References) -> list[Figure]:
    figures = []
    for workers, run in result.steps:
        figures.append(Figure("scaling", f"end to end, {plural(workers, 'worker')}",
                              run.throughput_per_s, "/s", refs.bash_rate, refs.bash_label))
    return figures


def scale_rows_figures(result: ScaleRowsResult, refs: References) -> list[Figure]:
    return [
        Figure("scale-rows", f"end to end, {result.rows_before:,} rows in tasks", result.empty.throughput_per_s,
               "/s", refs.bash_rate, refs.bash_label),
        Figure("scale-rows", f"end to end, +{result.inserted:,} finished rows", result.full.throughput_per_s,
               "/s", result.empty.throughput_per_s, "empty", SCALE_ROWS_VS_EMPTY),
        Figure("scale-rows", "tasks completed", result.full.completed, "", result.full.submitted, "submitted",
               ALL_COMPLETED),
    ]
