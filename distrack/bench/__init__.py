"""Benchmarks of distrack, through its HTTP API, against this machine's limits.

    python -m distrack.bench [-u URL] [-n COUNT] [-d SEC] [-p SEC] [-t SEC] [-c CMD] [--json]
    python -m distrack.bench --suite all|throughput|latency|sustained|scaling|scale-rows [--json]
    scripts/benchmark.sh ...            (the same flags)

Without --suite it is the seed's single run (distrack.bench.single, standard library only). With
--suite it runs the suites of issue 4 (distrack.bench.run), each figure beside a reference measured in
the same run and issue 4's target. The modules:

    cli         flags and environment -> BenchConfig or SuiteConfig; main()
    config      the two configs, their defaults, the suite names
    client      keep-alive HTTP client of the scheduler
    load        the load generator: threads, keep-alive connections, ready-made request bodies
    watch       waiting for tasks to finish (from PostgreSQL, or over GET /status)
    stats       percentiles, summaries, timestamps, ratios
    machine     machine CPU from /proc/stat, the client's own CPU, services' RSS
    stack       `distrack up` on free ports with a temporary embedded PostgreSQL, stopped by PID
    references  bare `bash -c` and raw PostgreSQL insert rates
    suites      the measurements: throughput, latency, sustained, scaling, scale-rows
    figures     issue 4's targets and the table's figures
    table       Figure, Target, and the plain-text table
    run         the order of a suite run, the report and the JSON
    single      the seed's single run
    progress    the progress line on stderr (on a terminal only)
"""

from distrack.bench.cli import main, parse_args
from distrack.bench.client import ApiError, SchedulerClient, TransportError, normalize_url
from distrack.bench.config import BenchConfig, SuiteConfig
from distrack.bench.progress import Progress
from distrack.bench.single import build_result, format_latency, format_report, submit_with_retry
from distrack.bench.stats import parse_timestamp, percentile, summarize

__all__ = [
    "ApiError",
    "BenchConfig",
    "Progress",
    "SchedulerClient",
    "SuiteConfig",
    "TransportError",
    "build_result",
    "format_latency",
    "format_report",
    "main",
    "normalize_url",
    "parse_args",
    "parse_timestamp",
    "percentile",
    "submit_with_retry",
    "summarize",
]
