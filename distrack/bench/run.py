"""`--suite`: runs the chosen suites in order, measures the references, prints the table (or JSON).

Order: the suites' own stack comes up (unless -u names one), the references are measured on the idle
machine, then throughput, latency, sustained and scale-rows run on that stack; it is stopped, and the
scaling suite starts one stack per worker count. Every stack is stopped by PID on the way out, on
Ctrl-C and SIGTERM too, and the temporary folder (embedded PostgreSQL included) is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distrack.bench import figures as fig
from distrack.bench.config import SuiteConfig
from distrack.bench.machine import read_cpu_times, steal_share
from distrack.bench.progress import Progress
from distrack.bench.references import bash_reference, postgres_reference
from distrack.bench.stack import OwnStack, StackError, configured_database_url
from distrack.bench.suites import (
    StackUnderTest,
    TaskRun,
    latency_suite,
    note,
    open_source,
    own_stack_under_test,
    scale_rows_suite,
    scaling_suite,
    settle,
    sustained_suite,
    throughput_suite,
    warm_up,
)
from distrack.bench.table import Figure, format_table
from distrack.config import DEFAULT_SLOTS

# Suites that run on the main stack (own or given); scaling starts stacks of its own.
MAIN_STACK_SUITES = ("throughput", "latency", "sustained", "scale-rows")
# Suites whose figures are compared with the bare bash rate.
BASH_SUITES = ("latency", "sustained", "scaling", "scale-rows")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every stack is stopped on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


@contextlib.contextmanager
def main_stack(config: SuiteConfig, work_dir: Path) -> Iterator[StackUnderTest]:
    """The stack given with -u (with DATABASE_URL when set), or one of our own, stopped afterwards."""
    if config.url:
        yield StackUnderTest(url=config.url, database_url=configured_database_url(os.environ), token=config.token)
        return
    note(f"starting `distrack up --workers {config.workers}` (files in {work_dir})")
    with OwnStack(config.workers, work_dir) as stack:
        yield own_stack_under_test(stack, config)


def run_suites(config: SuiteConfig, *, emit: Callable[[str], None]) -> int:
    """Runs config.suites; prints the table or JSON through `emit`. Exit status: 0 every task completed,
    1 some did not, 2 no stack, 130 interrupted."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    work_dir = Path(tempfile.mkdtemp(prefix="distrack-bench-"))
    started = time.monotonic()
    cpu_before = read_cpu_times()
    try:
        report = Report(config)
        _run_all(config, work_dir, report)
    except StackError as exc:
        print(f"the stack did not come up: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, _Terminated) else "interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work_dir, ignore_errors=True)
    report.duration_s = time.monotonic() - started
    report.steal = steal_share(cpu_before, read_cpu_times())
    emit(json.dumps(report.to_dict(), sort_keys=True) if config.json_output else report.format())
    return report.exit_code


def _run_all(config: SuiteConfig, work_dir: Path, report: Report) -> None:
    progress = Progress()
    main_suites = [name for name in config.suites if name in MAIN_STACK_SUITES]
    needs_bash = any(name in BASH_SUITES for name in config.suites)
    if main_suites:
        with main_stack(config, work_dir) as sut:
            report.stack = sut.describe()
            report.services = dict(sut.services)
            note(f"stack: {report.stack}")
            if needs_bash:
                _measure_bash(config, report, progress, work_dir)
            if "throughput" in main_suites and sut.database_url:
                note(f"[reference] PostgreSQL inserts into a scratch copy of tasks, {config.concurrency} connections")
                settle(progress)
                report.references.postgres = postgres_reference(
                    sut.database_url, config.command, concurrency=config.concurrency, duration_s=config.reference_s,
                    progress=progress)
            with open_source(sut, config) as source:
                warm_up(sut, source, config)
                for name in main_suites:
                    with report.guard(name):
                        _run_main_suite(name, sut, source, config, report, progress)
    elif needs_bash:
        _measure_bash(config, report, progress, work_dir)
    if "scaling" in config.suites:
        with report.guard("scaling"):
            scaling = scaling_suite(config, work_dir, progress)
            report.add("scaling", scaling, lambda refs: fig.scaling_figures(scaling, refs),
                       [run for _, run in scaling.steps])
    if needs_bash:
        _measure_bash(config, report, progress, work_dir)  # again at the end: the machine's speed drifts


def bash_concurrency(config: SuiteConfig) -> int:
    """As many threads as the stack has slots when the suites start it (workers x slots), so the
    reference runs at distrack's concurrency; CONCURRENCY for a stack of someone else's."""
    return config.workers * DEFAULT_SLOTS if config.url is None else config.concurrency


def _measure_bash(config: SuiteConfig, report: Report, progress: Progress, work_dir: Path) -> None:
    threads = bash_concurrency(config)
    note(f"[reference] bash -c {config.command!r} from {threads} threads")
    settle(progress)
    # Its files stay until the run ends, like the stacks' (see bash_reference).
    out_dir = work_dir / f"bash-reference-{len(report.references.bash) + 1}"
    report.references.bash.append(bash_reference(config.command, concurrency=threads,
                                                 duration_s=config.reference_s, progress=progress, out_dir=out_dir))


def _run_main_suite(name: str, sut: StackUnderTest, source: Any, config: SuiteConfig, report: Report,
                    progress: Progress) -> None:
    if name == "throughput":
        settle(progress)
        throughput = throughput_suite(sut, config, progress)
        report.add(name, throughput, lambda refs: fig.throughput_figures(throughput, refs, config.concurrency), [],
                   errors=throughput.schedule.errors + throughput.batch.errors)
    elif name == "latency":
        latency = latency_suite(sut, source, config, progress)
        report.add(name, latency, lambda refs: fig.latency_figures(latency, refs, sut.workers),
                   [latency.pickup, latency.delayed, latency.end_to_end])
    elif name == "sustained":
        sustained = sustained_suite(sut, source, config, progress)
        report.add(name, sustained, lambda refs: fig.sustained_figures(sustained, refs), [sustained.run])
    elif name == "scale-rows":
        if not sut.database_url:
            report.skip(name, "it needs the database (its own stack, or DATABASE_URL)")
            return
        throwaway = sut.own and configured_database_url(os.environ) is None
        rows = scale_rows_suite(sut, source, config, progress, keep_rows=throwaway)
        report.add(name, rows, lambda refs: fig.scale_rows_figures(rows, refs), [rows.empty, rows.full])


FigureBuilder = Callable[[fig.References], list[Figure]]


class Report:
    """Everything measured in one run: results by suite, the references, and the table's figures."""

    def __init__(self, config: SuiteConfig) -> None:
        self.config = config
        self.references = fig.References()
        self.results: dict[str, Any] = {}
        # Figures are made at the end, once every reference (bash -c is measured last too) is in.
        self._builders: list[FigureBuilder] = []
        self.runs: list[TaskRun] = []
        self.errors = 0
        self.failed_suites: list[str] = []
        self.skipped: dict[str, str] = {}
        self.stack = ""
        self.services: dict[str, int] = {}  # of the main stack, when it is our own
        self.duration_s = 0.0
        # The share of the cores' time the hypervisor gave to other machines during the run, and during
        # each suite: a host's neighbours come and go within one run, disturbing some figures only.
        self.steal: float | None = None
        self.steal_by_suite: dict[str, float] = {}

    def add(self, suite: str, result: Any, figures: FigureBuilder, runs: list[TaskRun], *, errors: int = 0) -> None:
        self.results[suite] = result
        self._builders.append(figures)
        self.runs += runs
        self.errors += errors

    @contextlib.contextmanager
    def guard(self, suite: str) -> Iterator[None]:
        """A suite that fails (a stack of its own that does not come up included) is reported and counted,
        and the others still run; Ctrl-C and SIGTERM (KeyboardInterrupt, not an Exception) still stop all.
        Notes the steal during the suite."""
        before = read_cpu_times()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any failure of one suite; the rest of the run still has value
            note(f"[{suite}] failed: {type(exc).__name__}: {exc}")
            self.failed_suites.append(suite)
            self.errors += 1
        finally:
            share = steal_share(before, read_cpu_times())
            if share is not None:
                self.steal_by_suite[suite] = share

    def skip(self, suite: str, why: str) -> None:
        note(f"[{suite}] skipped: {why}")
        self.skipped[suite] = why

    @property
    def all_figures(self) -> list[Figure]:
        figures = fig.reference_figures(self.references)
        for build in self._builders:
            figures += build(self.references)
        return figures

    @property
    def exit_code(self) -> int:
        return 0 if self.errors == 0 and all(run.all_completed for run in self.runs) else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.summary(),
            "machine": machine_summary(),
            "stack": self.stack,
            "services": self.services,
            "duration_s": round(self.duration_s, 3),
            "steal": None if self.steal is None else round(self.steal, 4),
            "steal_by_suite": {suite: round(share, 4) for suite, share in self.steal_by_suite.items()},
            "references": self.references.to_dict(),
            "suites": {name: result.to_dict() for name, result in self.results.items()},
            "figures": [figure.to_dict() for figure in self.all_figures],
            "failed_suites": self.failed_suites,
            "skipped_suites": self.skipped,
            "exit_code": self.exit_code,
        }

    def format(self) -> str:
        config = self.config
        figures = self.all_figures
        missed = [f for f in figures if f.met is False]
        head = [
            f"distrack benchmark: {', '.join(config.suites)} on {machine_summary()['description']}",
            f"stack: {self.stack or 'own stacks only'}",
            f"tasks: {config.command!r}, NUM_TASKS {config.count}, CONCURRENCY {config.concurrency}, "
            f"WORKER_COUNT {config.workers}, delayed by {config.delay_s:g} s, end-to-end runs of "
            f"{config.e2e_count:,} tasks"
            + (f", sustained {config.rate:g}/s for {config.duration_s:g} s" if "sustained" in config.suites else ""),
            "ratio = value / reference; latencies from the server's timestamps; machine CPU from /proc/stat",
            "",
            format_table(figures),
            "",
            f"{len(missed)} of {sum(1 for f in figures if f.target)} targets missed"
            + (": " + "; ".join(f.name for f in missed) if missed else ""),
            f"run took {self.duration_s:.0f} s"
            + ("" if self.steal is None else f"; the hypervisor took {self.steal:.1%} of the cores' time for other "
                                             "machines (steal: a noisy host slows every figure)"),
        ]
        if self.steal_by_suite:
            head.append("steal by suite: " + ", ".join(f"{suite} {share:.1%}"
                                                       for suite, share in self.steal_by_suite.items()))
        head += [f"skipped {suite}: {why}" for suite, why in self.skipped.items()]
        if self.failed_suites:
            head.append(f"FAILED suites (see stderr): {', '.join(self.failed_suites)}")
        return "\n".join(head)


def machine_summary() -> dict[str, Any]:
    cores = os.cpu_count() or 0
    return {"cores": cores, "system": platform.system(), "python": platform.python_version(),
            "description": f"{cores} cores, {platform.system()} {platform.release()}, Python "
                           f"{platform.python_version()}"}
