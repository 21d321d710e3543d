"""The command line of `python -m distrack.bench` and scripts/benchmark.sh: the seed's single run or suites."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distrack.apitoken import api_token_from_env
from distrack.bench import config as cfg
from distrack.bench.client import normalize_url
from distrack.bench.config import BenchConfig, SuiteConfig, expand_suites
from distrack.errors import ConfigError

EPILOG = """\
Without --suite: the seed's single run against a running scheduler (-u). Exit status: 0 all tasks
completed, 1 some did not, 2 usage error or scheduler unreachable.

With --suite: throughput (POST /schedule and POST /tasks), latency (pickup on an idle stack, delayed
tasks, end to end), sustained (a steady rate for --duration seconds, with every service's memory),
scaling (end to end with 1..WORKER_COUNT workers), scale-rows (end to end with 1,000,000 finished rows
in the table, only when named), or all (the first four); several can be named: --suite latency,scaling.
Each figure is printed beside its reference measured in the same run (bash -c on this machine, raw
PostgreSQL inserts) and issue 4's target. Without -u (or $SCHEDULER_URL) the suites start their own
stack with `distrack up` on free ports and a temporary embedded PostgreSQL (or $DATABASE_URL), and
stop it afterwards; the scaling suite always does. Exit status: 0 every task completed, 1 some did
not, 2 usage error or no stack.

Environment: SCHEDULER_URL (-u), NUM_TASKS (-n; default 50, 100 for suites), DELAY_SECONDS (-d; default
0, 1 for suites), CONCURRENCY (--concurrency), WORKER_COUNT (--workers); DATABASE_URL or POSTGRES_*
lets the suites read tasks and insert reference rows directly; DISTRACK_API_TOKEN (or the contents of
the file DISTRACK_API_TOKEN_FILE names) is sent as a bearer token."""


def _number(kind: type, *, minimum: float, inclusive: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            relation = "at least" if inclusive else "greater than"
            raise argparse.ArgumentTypeError(f"{text!r} must be {relation} {minimum:g}")
        return value

    return parse


_positive_int = _number(int, minimum=1, inclusive=True)
_positive_float = _number(float, minimum=0, inclusive=False)
_non_negative_float = _number(float, minimum=0, inclusive=True)


def _url(text: str) -> str:
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _suites(text: str) -> tuple[str, ...]:
    try:
        return expand_suites(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line. Settings that depend on the mode (single run or suites) default to None."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark distrack through its HTTP API: the seed's single run, or suites measured\n"
        "against this machine's limits (latencies from the server's timestamps).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("-u", "--url", metavar="URL", type=_url, default=None,
        help=f"scheduler base URL (default: $SCHEDULER_URL or {cfg.DEFAULT_URL})")
    add("-n", "--count", metavar="COUNT", type=_positive_int, default=None,
        help=f"number of tasks (default: $NUM_TASKS or {cfg.DEFAULT_COUNT}; {cfg.SUITE_COUNT} for suites)")
    add("-d", "--delay", dest="delay_s", metavar="SEC", type=_non_negative_float, default=None,
        help=f"delay_seconds of each task; for suites, of the delayed tasks (default: $DELAY_SECONDS or "
        f"{cfg.DEFAULT_DELAY_S:g}; {cfg.SUITE_DELAY_S:g} for suites)")
    add("-p", "--poll", dest="poll_interval_s", metavar="SEC", type=_positive_float,
        default=cfg.DEFAULT_POLL_INTERVAL_S,
        help=f"seconds between status polls over HTTP (default: {cfg.DEFAULT_POLL_INTERVAL_S:g})")
    add("-t", "--timeout", dest="timeout_s", metavar="SEC", type=_positive_float, default=cfg.DEFAULT_TIMEOUT_S,
        help=f"seconds to wait after the last submission before giving up (default: {cfg.DEFAULT_TIMEOUT_S:g})")
    add("-c", "--command", metavar="CMD", default=None,
        help=f"shell command of each task (default: {cfg.DEFAULT_COMMAND!r}; {cfg.SUITE_COMMAND!r} for suites)")
    add("--concurrency", metavar="N", type=_positive_int, default=None,
        help=f"concurrent keep-alive HTTP clients (default: $CONCURRENCY or {cfg.DEFAULT_CONCURRENCY}; "
             f"{cfg.SUITE_CONCURRENCY} for suites)")
    add("-i", "--interval-ms", dest="interval_ms", metavar="MS", type=_non_negative_float, default=None,
        help="milliseconds between two submissions (default: 0, as fast as possible; for suites, the "
        f"spacing of the pickup tasks, {cfg.SUITE_INTERVAL_MS:g})")
    add("--json", dest="json_output", action="store_true", help="print one JSON object instead of the text report")
    suite = parser.add_argument_group("suites")
    suite.add_argument("-s", "--suite", metavar="NAME[,NAME]", type=_suites, default=None,
                       help=f"run suites: all, {', '.join(cfg.SUITE_NAMES)}")
    suite.add_argument("-w", "--workers", metavar="N", type=_positive_int, default=None,
                       help=f"workers of the suites' own stack, and the most the scaling suite tries "
                       f"(default: $WORKER_COUNT or {cfg.SUITE_WORKERS})")
    suite.add_argument("--rate", metavar="TASKS_PER_S", type=_positive_float, default=None,
                       help=f"submission rate of the sustained suite (default: {cfg.SUSTAINED_RATE:g})")
    suite.add_argument("--duration", dest="duration_s", metavar="SEC", type=_positive_float, default=None,
                       help=f"length of the sustained suite (default: {cfg.SUSTAINED_S:g})")
    suite.add_argument("--reference-s", dest="reference_s", metavar="SEC", type=_positive_float, default=None,
                       help=f"how long each reference runs (default: {cfg.REFERENCE_S:g})")
    suite.add_argument("--throughput-s", dest="throughput_s", metavar="SEC", type=_positive_float, default=None,
                       help=f"how long each throughput phase runs (default: {cfg.THROUGHPUT_S:g})")
    suite.add_argument("--e2e-count", dest="e2e_count", metavar="N", type=_positive_int, default=None,
                       help=f"tasks of each end-to-end run, all due at once, sent in batches "
                            f"(default: {cfg.E2E_TASKS:,})")
    return parser


def _from_env(
    parser: argparse.ArgumentParser, env: Mapping[str, str], name: str, parse: Callable[[str], Any], flag: str
) -> Any:
    """The value of $name parsed like its flag, None when unset; a malformed one is a usage error."""
    text = env.get(name)
    if not text:
        return None
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument {flag}: ${name}: {exc}")


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, prog: str | None = None
) -> BenchConfig | SuiteConfig:
    """Flags and environment -> BenchConfig (no --suite) or SuiteConfig. Exits with status 2 on a usage
    error (argparse's rule). A flag wins over its environment variable, which wins over the default."""
    env = os.environ if env is None else env
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def pick(value: Any, name: str, parse: Callable[[str], Any], flag: str, default: Any) -> Any:
        if value is not None:
            return value
        from_env = _from_env(parser, env, name, parse, flag)
        return default if from_env is None else from_env

    if args.command is not None and not args.command.strip():
        parser.error("argument -c/--command: the command must not be empty")
    url = pick(args.url, "SCHEDULER_URL", _url, "-u/--url", None)
    suite = args.suite is not None
    concurrency = pick(args.concurrency, "CONCURRENCY", _positive_int, "--concurrency",
                       cfg.SUITE_CONCURRENCY if suite else cfg.DEFAULT_CONCURRENCY)
    try:
        token = api_token_from_env(env)
    except ConfigError as exc:
        parser.error(str(exc))
    common = {
        "poll_interval_s": args.poll_interval_s,
        "timeout_s": args.timeout_s,
        "concurrency": concurrency,
        "json_output": args.json_output,
        "token": token,
        "count": pick(args.count, "NUM_TASKS", _positive_int, "-n/--count",
                      cfg.SUITE_COUNT if suite else cfg.DEFAULT_COUNT),
        "delay_s": pick(args.delay_s, "DELAY_SECONDS", _non_negative_float, "-d/--delay",
                        cfg.SUITE_DELAY_S if suite else cfg.DEFAULT_DELAY_S),
    }
    if not suite:
        suite_only = (("--workers", args.workers), ("--rate", args.rate), ("--duration", args.duration_s),
                      ("--reference-s", args.reference_s), ("--throughput-s", args.throughput_s),
                      ("--e2e-count", args.e2e_count))
        for flag, value in suite_only:
            if value is not None:
                parser.error(f"argument {flag}: only used with --suite")
        return BenchConfig(url=url or cfg.DEFAULT_URL, command=args.command or cfg.DEFAULT_COMMAND,
                           interval_ms=args.interval_ms or 0.0, **common)
    return SuiteConfig(
        suites=args.suite,
        url=url,
        command=args.command or cfg.SUITE_COMMAND,
        interval_ms=cfg.SUITE_INTERVAL_MS if args.interval_ms is None else args.interval_ms,
        workers=pick(args.workers, "WORKER_COUNT", _positive_int, "--workers", cfg.SUITE_WORKERS),
        rate=args.rate or cfg.SUSTAINED_RATE,
        duration_s=args.duration_s or cfg.SUSTAINED_S,
        reference_s=args.reference_s or cfg.REFERENCE_S,
        throughput_s=args.throughput_s or cfg.THROUGHPUT_S,
        e2e_count=args.e2e_count or cfg.E2E_TASKS,
        **common,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # scripts/benchmark.sh names itself so that usage messages show what the user typed.
    prog = os.environ.get("DISTRACK_BENCH_PROG") or "python -m distrack.bench"
    config = parse_args(argv, os.environ, prog=prog)
    if isinstance(config, SuiteConfig):
        try:  # the suites need distrack's dependencies (psycopg, psutil, and the services); the seed run does not
            import psutil  # noqa: F401
            import psycopg  # noqa: F401
        except ImportError as exc:
            print(f"{prog}: the suites need distrack installed in this Python ({sys.executable}): {exc}; "
                  "set DISTRACK_PYTHON, or make .venv with scripts/test.sh", file=sys.stderr)
            return 2
        from distrack.bench.run import run_suites

        return run_suites(config, emit=emit)
    return run_single(config)


def run_single(config: BenchConfig) -> int:
    """The seed's single run; its exit status."""
    from distrack.bench.single import Benchmark, SchedulerUnreachable, SubmitRejected, format_report

    try:
        result = Benchmark(config).run()
    except SchedulerUnreachable as exc:
        print(f"cannot reach the scheduler at {config.url}: {exc}", file=sys.stderr)
        return 2
    except SubmitRejected as exc:
        print(f"{exc} (at {config.url})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if config.json_output:
        emit(json.dumps({"config": config.summary(), **result.to_dict()}, sort_keys=True))
    else:
        emit(format_report(result))
    return result.exit_code


def emit(text: str) -> None:
    """Prints to stdout, quietly when the reader went away (`... | head -3`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's own recipe: point stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
