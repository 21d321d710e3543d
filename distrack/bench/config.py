"""What a benchmark run is asked to do: the seed's single run (BenchConfig) or suites (SuiteConfig)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_URL = "http://localhost:8081"
DEFAULT_POLL_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_CONCURRENCY = 10
# The seed's single run: 50 tasks of `echo benchmark`, due at once.
DEFAULT_COUNT = 50
DEFAULT_DELAY_S = 0.0
DEFAULT_COMMAND = "echo benchmark"
# The seed's suites: NUM_TASKS 100, DELAY_SECONDS 1, WORKER_COUNT 3, and issue 4's `echo hello`.
SUITE_COUNT = 100
SUITE_DELAY_S = 1.0
SUITE_COMMAND = "echo hello"
SUITE_WORKERS = 3
# Issue 4 measures POST /schedule from 16 keep-alive clients; the suites use that many unless told.
SUITE_CONCURRENCY = 16
# End-to-end runs (latency, scaling, scale-rows): this many tasks, all due at once, sent in batches of
# POST /tasks so the load generator and the accept path take little of the machine they measure.
E2E_TASKS = 2000
# Pickup is measured on an idle stack: tasks 20 ms apart, so each finds the coordinator idle.
SUITE_INTERVAL_MS = 20.0
# The sustained run's default rate: well under what the stack finished end to end on 2 cores when
# this suite was written (about 220 tasks/s), so it measures steady state rather than a backlog.
SUSTAINED_RATE = 100.0
SUSTAINED_S = 30.0
# Each reference (bash -c, PostgreSQL) runs this long: at hundreds to thousands of operations a
# second, long enough for a rate stable to a few percent, short enough to keep the suite quick.
REFERENCE_S = 3.0
# Each throughput phase (POST /schedule, POST /tasks) runs this long: thousands of requests.
THROUGHPUT_S = 5.0

FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})

# What `--suite all` runs, in this order; scale-rows (1,000,000 rows) only runs when named.
ALL_SUITES = ("throughput", "latency", "sustained", "scaling")
OPTIONAL_SUITES = ("scale-rows",)
SUITE_NAMES = ALL_SUITES + OPTIONAL_SUITES


@dataclass(frozen=True)
class BenchConfig:
    """The seed's single run against a running stack."""

    url: str = DEFAULT_URL
    count: int = DEFAULT_COUNT
    delay_s: float = DEFAULT_DELAY_S
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    command: str = DEFAULT_COMMAND
    concurrency: int = DEFAULT_CONCURRENCY
    interval_ms: float = 0.0
    json_output: bool = False
    token: str | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return _settings(self)


@dataclass(frozen=True)
class SuiteConfig:
    """One or more suites; `url` None means they start their own stack."""

    suites: tuple[str, ...] = ALL_SUITES
    url: str | None = None
    count: int = SUITE_COUNT
    delay_s: float = SUITE_DELAY_S
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    command: str = SUITE_COMMAND
    concurrency: int = SUITE_CONCURRENCY
    interval_ms: float = SUITE_INTERVAL_MS
    workers: int = SUITE_WORKERS
    rate: float = SUSTAINED_RATE
    duration_s: float = SUSTAINED_S
    reference_s: float = REFERENCE_S
    throughput_s: float = THROUGHPUT_S
    e2e_count: int = E2E_TASKS
    json_output: bool = False
    token: str | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {**_settings(self), "suites": list(self.suites)}


def _settings(config: BenchConfig | SuiteConfig) -> dict[str, Any]:
    """The settings for a JSON report: no secret, no output switch."""
    doc = asdict(config)
    doc.pop("token")
    doc.pop("json_output")
    return doc


def expand_suites(text: str) -> tuple[str, ...]:
    """`latency,scaling` or `all` -> the suites to run, in canonical order; ValueError on a bad name."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names:
        raise ValueError("no suite named")
    unknown = names - set(SUITE_NAMES) - {"all"}
    if unknown:
        raise ValueError(f"unknown suite {', '.join(sorted(unknown))}; choose from all, {', '.join(SUITE_NAMES)}")
    if "all" in names:
        names |= set(ALL_SUITES)
    return tuple(name for name in SUITE_NAMES if name in names)
