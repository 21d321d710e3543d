"""Benchmark a running distrack stack through its HTTP API.

    python -m distrack.bench [-u URL] [-n COUNT] [-d SEC] [-p SEC] [-t SEC] [-c CMD] [--json]
    scripts/benchmark.sh ...            (the same flags)

Submits COUNT tasks to `POST /schedule`, then polls `GET /status` for the unfinished ones until every
task is completed, failed or cancelled, or TIMEOUT seconds have passed since the last submission, and
reports counts, durations, throughput and latencies.

Latencies come from the server's own timestamps, which PostgreSQL takes with `now()`: `scheduled_at`
(submit time + delay), `picked_at`, `started_at` and `completed_at`/`failed_at`. The client's clock
never enters them, so they hold when the benchmark runs on another machine. A task that was retried
is measured from its last `scheduled_at`. Durations and throughput are measured on the client's
monotonic clock, so they are coarse to one poll interval (`-p`).

Concurrency model: threads. A ThreadPoolExecutor of `--concurrency` threads, each with its own
keep-alive `http.client` connection, submits and later polls. Only the standard library is used, so
this runs under any Python 3.11+ that can import the `distrack` folder, with or without its
dependencies installed.

Exit status: 0 when every task completed; 1 when any was not submitted, failed, was cancelled or
timed out; 2 for usage errors, an unreachable scheduler, or a scheduler that rejects the task.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://localhost:8081"
DEFAULT_COUNT = 50
DEFAULT_DELAY_S = 0.0
DEFAULT_POLL_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_COMMAND = "echo benchmark"
DEFAULT_CONCURRENCY = 10

# One request should take milliseconds; anything near this means the scheduler is stuck or gone.
HTTP_TIMEOUT_S = 10.0
# Waits before each retry of a submission answered 503 (database away): about 4 s in all, enough to
# ride out a short database restart without stalling the benchmark for long.
SUBMIT_503_BACKOFF_S = (0.25, 0.5, 1.0, 2.0)
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})
# At most this many progress redraws per second on a terminal.
PROGRESS_MIN_GAP_S = 0.1


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
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


def normalize_url(text: str) -> str:
    """`host:8081` or `http://host:8081/` -> `http://host:8081`; raises ValueError when unusable."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: the scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"{text!r} has a malformed port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a query or fragment makes no sense here")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _url(text: str) -> str:
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(env: Mapping[str, str], prog: str | None = None) -> argparse.ArgumentParser:
    """The command line; the seed's environment variables, when set, replace the built-in defaults."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Submit tasks to a distrack scheduler, wait for them, and report throughput and "
        "latencies (from the server's timestamps).",
        epilog="Environment: SCHEDULER_URL, NUM_TASKS, DELAY_SECONDS and CONCURRENCY set the defaults of "
        "-u, -n, -d and --concurrency; DISTRACK_API_TOKEN, when set, is sent as a bearer token. "
        "Exit status: 0 all tasks completed, 1 some did not, 2 usage error or scheduler unreachable.",
    )
    # String defaults go through `type`, so a malformed environment value is reported like a flag.
    add = parser.add_argument
    add("-u", "--url", metavar="URL", type=_url, default=env.get("SCHEDULER_URL") or DEFAULT_URL,
        help=f"scheduler base URL (default: $SCHEDULER_URL or {DEFAULT_URL})")
    add("-n", "--count", metavar="COUNT", type=_positive_int, default=env.get("NUM_TASKS") or DEFAULT_COUNT,
        help=f"number of tasks (default: $NUM_TASKS or {DEFAULT_COUNT})")
    add("-d", "--delay", dest="delay_s", metavar="SEC", type=_non_negative_float,
        default=env.get("DELAY_SECONDS") or DEFAULT_DELAY_S,
        help=f"delay_seconds of each task (default: $DELAY_SECONDS or {DEFAULT_DELAY_S:g})")
    add("-p", "--poll", dest="poll_interval_s", metavar="SEC", type=_positive_float,
        default=DEFAULT_POLL_INTERVAL_S,
        help=f"seconds between status polls (default: {DEFAULT_POLL_INTERVAL_S:g})")
    add("-t", "--timeout", dest="timeout_s", metavar="SEC", type=_positive_float, default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait after the last submission before giving up (default: {DEFAULT_TIMEOUT_S:g})")
    add("-c", "--command", metavar="CMD", default=DEFAULT_COMMAND,
        help=f"shell command of each task (default: {DEFAULT_COMMAND!r})")
    add("--concurrency", metavar="N", type=_positive_int, default=env.get("CONCURRENCY") or DEFAULT_CONCURRENCY,
        help=f"concurrent HTTP clients for submitting and polling (default: $CONCURRENCY or {DEFAULT_CONCURRENCY})")
    add("-i", "--interval-ms", dest="interval_ms", metavar="MS", type=_non_negative_float, default=0.0,
        help="milliseconds between two submissions, e.g. 20 to measure pickup latency on an idle stack "
        "(default: 0, as fast as possible)")
    add("--json", dest="json_output", action="store_true", help="print one JSON object instead of the text report")
    return parser


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, prog: str | None = None
) -> BenchConfig:
    """Flags and environment -> BenchConfig. Exits with status 2 on a usage error (argparse's rule)."""
    env = os.environ if env is None else env
    parser = build_parser(env, prog)
    args = parser.parse_args(argv)
    if not args.command.strip():
        parser.error("argument -c/--command: the command must not be empty")
    return BenchConfig(token=env.get("DISTRACK_API_TOKEN") or None, **vars(args))


# --- HTTP client ---------------------------------------------------------------------------------


class TransportError(Exception):
    """The request did not get an HTTP answer (refused, reset, timed out, unknown host...)."""


class ApiError(Exception):
    """The scheduler answered with an error status."""

    def __init__(self, status: int, title: str, description: str) -> None:
        super().__init__(f"HTTP {status}" + "".join(f": {part}" for part in (title, description) if part))
        self.status = status
        self.title = title
        self.description = description


class SchedulerClient:
    """One keep-alive connection to the scheduler. Not thread-safe: give each thread its own."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = connection_class(parts.hostname, parts.port, timeout=timeout_s)
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def schedule(self, command: str, delay_s: float) -> dict[str, Any]:
        body = json.dumps({"command": command, "delay_seconds": delay_s}).encode()
        return self._request("POST", "/schedule", body)

    def status(self, task_id: str) -> dict[str, Any]:
        return self._request("GET", f"/status?task_id={quote(task_id)}")

    def close(self) -> None:
        self._conn.close()

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        # A kept-alive connection may have been closed by the server while idle; the request then
        # never reached it, so it is safe to send once more on a fresh connection.
        for attempt in (1, 2):
            reused = self._conn.sock is not None
            try:
                self._conn.request(method, self._prefix + path, body=body, headers=headers)
                response = self._conn.getresponse()
                status, data = response.status, response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._conn.close()
                if not reused or attempt == 2:
                    raise TransportError(_describe(exc)) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                raise TransportError(_describe(exc)) from exc
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if not 200 <= status < 300:
            raise ApiError(status, str(doc.get("title", "")), str(doc.get("description", "")))
        return doc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class ClientPool:
    """A SchedulerClient per thread, made on first use, all closed together at the end."""

    def __init__(self, factory: Callable[[], SchedulerClient]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[SchedulerClient] = []

    def get(self) -> SchedulerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory()
            with self._lock:
                self._clients.append(client)
        return client

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: Iterable[float], pct: float) -> float:
    """The nearest-rank percentile: the smallest value such that at least `pct` % of the values are
    less than or equal to it. It is always one of the values (no interpolation); pct 0 gives the minimum.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, not {pct}")
    # Rounding first keeps float noise (4.4 * 750 / 100 = 33.00000000000001) from skipping a rank.
    rank = math.ceil(round(pct * len(ordered) / 100, 9))
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class LatencyStats:
    """Summary of a set of durations, in seconds."""

    count: int
    min_s: float
    avg_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    max_s: float

    def to_ms_dict(self) -> dict[str, float | int]:
        doc: dict[str, float | int] = {"count": self.count}
        for name, value in asdict(self).items():
            if name.endswith("_s"):
                doc[name[:-2] + "_ms"] = round(value * 1000, 3)
        return doc


def summarize(values: Sequence[float]) -> LatencyStats | None:
    """min/avg/p50/p95/p99/max of `values` (nearest-rank percentiles); None when there are none."""
    if not values:
        return None
    return LatencyStats(
        count=len(values),
        min_s=min(values),
        avg_s=statistics.fmean(values),
        p50_s=percentile(values, 50),
        p95_s=percentile(values, 95),
        p99_s=percentile(values, 99),
        max_s=max(values),
    )


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp such as `2026-11-23T04:11:54.123456Z`; a zoneless one is taken as UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _seconds_between(doc: Mapping[str, Any], start: str, end: str) -> float | None:
    if not doc.get(start) or not doc.get(end):
        return None
    try:
        return (parse_timestamp(doc[end]) - parse_timestamp(doc[start])).total_seconds()
    except (TypeError, ValueError):
        return None


def finish_field(doc: Mapping[str, Any]) -> str:
    return "completed_at" if doc.get("completed_at") else "failed_at"


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    requested: int
    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    submit_503_retries: int
    poll_errors: int
    submit_duration_s: float
    total_duration_s: float
    # First scheduled_at to the last completed_at/failed_at, on the database clock.
    server_span_s: float | None
    # POST /schedule round trips as the client saw them, including any waits between 503 retries.
    submit_latency: LatencyStats | None
    # scheduled_at -> completed_at (or failed_at).
    end_to_end: LatencyStats | None
    # scheduled_at -> started_at: how long a due task waits before a worker runs it.
    pickup: LatencyStats | None
    # scheduled_at -> picked_at: how long before the coordinator claims and dispatches it.
    dispatch: LatencyStats | None
    # Tasks whose started_at is before their scheduled_at (would break guarantee 2).
    early_starts: int = 0

    @property
    def not_submitted(self) -> int:
        return self.requested - self.submitted

    @property
    def throughput_per_s(self) -> float:
        return self.completed / self.total_duration_s if self.total_duration_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.completed == self.requested else 1

    def to_dict(self) -> dict[str, Any]:
        def ms(stats: LatencyStats | None) -> dict[str, float | int] | None:
            return stats.to_ms_dict() if stats else None

        return {
            "requested": self.requested,
            "submitted": self.submitted,
            "not_submitted": self.not_submitted,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "submit_503_retries": self.submit_503_retries,
            "poll_errors": self.poll_errors,
            "submit_duration_s": round(self.submit_duration_s, 6),
            "total_duration_s": round(self.total_duration_s, 6),
            "throughput_per_s": round(self.throughput_per_s, 3),
            "server_span_s": None if self.server_span_s is None else round(self.server_span_s, 6),
            "early_starts": self.early_starts,
            "latency_ms": {
                "submit": ms(self.submit_latency),
                "end_to_end": ms(self.end_to_end),
                "pickup": ms(self.pickup),
                "dispatch": ms(self.dispatch),
            },
        }


def build_result(
    requested: int,
    docs: Sequence[Mapping[str, Any]],
    *,
    submit_round_trips_s: Sequence[float] = (),
    submit_duration_s: float,
    total_duration_s: float,
    submit_503_retries: int = 0,
    poll_errors: int = 0,
) -> BenchResult:
    """The figures from the last status seen of each submitted task (pure: no I/O)."""
    statuses = [doc.get("status") for doc in docs]
    finished = [doc for doc in docs if doc.get("status") in ("completed", "failed")]
    end_to_end = [v for doc in finished if (v := _seconds_between(doc, "scheduled_at", finish_field(doc))) is not None]
    pickup = [v for doc in docs if (v := _seconds_between(doc, "scheduled_at", "started_at")) is not None]
    dispatch = [v for doc in docs if (v := _seconds_between(doc, "scheduled_at", "picked_at")) is not None]
    return BenchResult(
        requested=requested,
        submitted=len(docs),
        completed=statuses.count("completed"),
        failed=statuses.count("failed"),
        cancelled=statuses.count("cancelled"),
        timed_out=sum(1 for status in statuses if status not in FINISHED_STATUSES),
        submit_503_retries=submit_503_retries,
        poll_errors=poll_errors,
        submit_duration_s=submit_duration_s,
        total_duration_s=total_duration_s,
        server_span_s=server_span(finished),
        submit_latency=summarize(submit_round_trips_s),
        end_to_end=summarize(end_to_end),
        pickup=summarize(pickup),
        dispatch=summarize(dispatch),
        early_starts=sum(1 for value in pickup if value < 0),
    )


def server_span(finished: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds from the earliest scheduled_at to the latest finish among finished tasks."""
    try:
        starts = [parse_timestamp(doc["scheduled_at"]) for doc in finished]
        ends = [parse_timestamp(doc[finish_field(doc)]) for doc in finished]
    except (KeyError, TypeError, ValueError):
        return None
    if not starts:
        return None
    return (max(ends) - min(starts)).total_seconds()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def format_latency(stats: LatencyStats | None, *, full: bool = False) -> str:
    """`min 1.0 ms, avg 2.0 ms, p95 3.0 ms, max 4.0 ms`; with full=True also p50 and p99."""
    if stats is None:
        return "n/a"
    names = ("min", "avg", "p50", "p95", "p99", "max") if full else ("min", "avg", "p95", "max")
    return ", ".join(f"{name} {_ms(getattr(stats, name + '_s'))}" for name in names)


def format_report(result: BenchResult) -> str:
    """The human-readable report, one figure per line."""
    lines = [
        f"Submitted:        {result.submitted}"
        + (f" of {result.requested} ({result.not_submitted} not submitted)" if result.not_submitted else ""),
        f"Completed:        {result.completed}",
        f"Failed:           {result.failed}",
    ]
    if result.cancelled:
        lines.append(f"Cancelled:        {result.cancelled}")
    lines += [
        f"Timed out:        {result.timed_out}",
        f"Submit duration:  {result.submit_duration_s:.2f} s",
        f"Total duration:   {result.total_duration_s:.2f} s",
        f"Throughput:       {result.throughput_per_s:.1f} tasks/s",
    ]
    if result.server_span_s is not None:
        lines.append(f"Server span:      {result.server_span_s:.2f} s (first scheduled_at -> last finish)")
    if result.submit_503_retries or result.poll_errors:
        lines.append(f"Retries:          {result.submit_503_retries} submissions retried after 503, "
                     f"{result.poll_errors} status polls failed")
    lines += [
        f"Submit latency (POST /schedule round trip): {format_latency(result.submit_latency)}",
        f"Latency (end-to-end, scheduled_at -> completed_at/failed_at): {format_latency(result.end_to_end)}",
        f"Pickup latency (scheduled_at -> started_at): {format_latency(result.pickup, full=True)}",
        f"Dispatch latency (scheduled_at -> picked_at): {format_latency(result.dispatch, full=True)}",
    ]
    if result.early_starts:
        lines.append(f"WARNING: {result.early_starts} tasks started before their scheduled_at")
    return "\n".join(lines)


# --- running -------------------------------------------------------------------------------------


class SubmitRejected(Exception):
    """The scheduler refused the task itself (4xx): every other copy would be refused too."""


class SchedulerUnreachable(Exception):
    """Not one task could be submitted because the scheduler did not answer."""


class Progress:
    """One self-overwriting status line on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._enabled = self._stream.isatty()
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, text: str, *, force: bool = False) -> None:
        if not self._enabled:
            return
        with self._lock:
            now = time.monotonic()
            if force or now - self._last >= PROGRESS_MIN_GAP_S:
                self._last = now
                self._stream.write(f"\r\x1b[K{text}")
                self._stream.flush()

    def clear(self) -> None:
        if self._enabled:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def submit_with_retry(
    client: SchedulerClient,
    command: str,
    delay_s: float,
    *,
    backoff_s: Sequence[float] = SUBMIT_503_BACKOFF_S,
    sleep: Callable[[float], object] = time.sleep,
) -> tuple[dict[str, Any], int]:
    """POST /schedule, retried after each wait in `backoff_s` while the answer is 503.

    Returns the task and how many retries it took; re-raises the last ApiError or TransportError.
    """
    retries = 0
    while True:
        try:
            return client.schedule(command, delay_s), retries
        except ApiError as exc:
            if exc.status != 503 or retries >= len(backoff_s):
                raise
        sleep(backoff_s[retries])
        retries += 1


@dataclass
class _Submission:
    doc: dict[str, Any] | None = None
    round_trip_s: float = 0.0
    retries_503: int = 0
    error: str | None = None
    # Set when no other submission can succeed either: SchedulerUnreachable or SubmitRejected.
    fatal: Exception | None = None


class Benchmark:
    """One run: submit, wait, measure. `run()` may raise SchedulerUnreachable or SubmitRejected."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or Progress()
        self._clients = ClientPool(lambda: SchedulerClient(config.url, token=config.token))
        self._stop = threading.Event()
        self._submitted = 0
        self._lock = threading.Lock()

    def run(self) -> BenchResult:
        config = self.config
        executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="bench")
        try:
            started = time.monotonic()
            submissions = self._submit_all(executor, started)
            submitted_at = time.monotonic()
            docs = [s.doc for s in submissions if s.doc is not None]
            poll_errors = self._wait(executor, docs, deadline=submitted_at + config.timeout_s)
            finished_at = time.monotonic()
        finally:
            self._stop.set()
            self.progress.clear()
            executor.shutdown(wait=True, cancel_futures=True)
            self._clients.close_all()
        return build_result(
            config.count,
            docs,
            submit_round_trips_s=[s.round_trip_s for s in submissions if s.doc is not None],
            submit_duration_s=submitted_at - started,
            total_duration_s=finished_at - started,
            submit_503_retries=sum(s.retries_503 for s in submissions),
            poll_errors=poll_errors,
        )

    def _submit_all(self, executor: ThreadPoolExecutor, started: float) -> list[_Submission]:
        interval_s = self.config.interval_ms / 1000
        submissions = list(executor.map(lambda i: self._submit_one(started + i * interval_s),
                                        range(self.config.count)))
        failed = [s for s in submissions if s.doc is None]
        if failed:
            first = next((s for s in failed if s.fatal is not None), failed[0])
            if first.fatal is not None and self._submitted == 0:
                raise first.fatal
            print(f"warning: {len(failed)} of {self.config.count} tasks not submitted: "
                  f"{first.fatal or first.error}", file=sys.stderr)
        return submissions

    def _submit_one(self, not_before: float) -> _Submission:
        # Pacing is global: task i leaves no earlier than start + i * interval, whichever thread sends it.
        if self._stop.wait(max(0.0, not_before - time.monotonic())):
            return _Submission(error="not sent: submission stopped after an earlier error")
        sent = time.monotonic()
        try:
            doc, retries = submit_with_retry(self._clients.get(), self.config.command, self.config.delay_s,
                                             sleep=self._stop.wait)
        except TransportError as exc:
            self._stop.set()  # the scheduler is gone: do not wait out one timeout per task
            return _Submission(fatal=SchedulerUnreachable(str(exc)))
        except ApiError as exc:
            if 400 <= exc.status < 500:
                self._stop.set()  # every task is the same, so every one would be refused
                return _Submission(fatal=SubmitRejected(f"the scheduler refused the task: {exc}"))
            exhausted = len(SUBMIT_503_BACKOFF_S) if exc.status == 503 else 0
            return _Submission(error=f"POST /schedule answered {exc}", retries_503=exhausted)
        if not doc.get("task_id"):
            return _Submission(error=f"the answer to POST /schedule has no task_id: {doc}")
        with self._lock:
            self._submitted += 1
            done = self._submitted
        self.progress.update(f"submitted {done}/{self.config.count}")
        return _Submission(doc=doc, round_trip_s=time.monotonic() - sent, retries_503=retries)

    def _wait(self, executor: ThreadPoolExecutor, docs: list[dict[str, Any]], *, deadline: float) -> int:
        """Refreshes `docs` in place until all are finished or the deadline passes; returns poll errors."""
        config = self.config
        poll_errors = 0
        while True:
            pending = [i for i, doc in enumerate(docs) if doc.get("status") not in FINISHED_STATUSES]
            if not pending:
                return poll_errors
            round_started = time.monotonic()
            for i, fresh in zip(pending, executor.map(self._poll_one, (docs[i] for i in pending)), strict=True):
                if fresh is None:
                    poll_errors += 1
                else:
                    docs[i] = fresh
            now = time.monotonic()
            finished = sum(1 for doc in docs if doc.get("status") in FINISHED_STATUSES)
            self.progress.update(f"finished {finished}/{len(docs)}, {max(0.0, deadline - now):.0f} s left",
                                 force=True)
            if finished == len(docs) or now >= deadline:
                return poll_errors
            if self._stop.wait(min(max(0.0, round_started + config.poll_interval_s - now), deadline - now)):
                return poll_errors

    def _poll_one(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        try:
            fresh = self._clients.get().status(str(doc["task_id"]))
        except (TransportError, ApiError):
            return None  # the scheduler or its database may be back by the next round
        return fresh if fresh.get("status") else None


# --- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    # scripts/benchmark.sh names itself so that usage messages show what the user typed.
    config = parse_args(argv, os.environ, prog=os.environ.get("DISTRACK_BENCH_PROG") or "python -m distrack.bench")
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
        _emit(json.dumps({"config": _config_summary(config), **result.to_dict()}, sort_keys=True))
    else:
        _emit(format_report(result))
    return result.exit_code


def _emit(text: str) -> None:
    """Prints to stdout, quietly when the reader went away (`... | head -3`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's own recipe: point stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _config_summary(config: BenchConfig) -> dict[str, Any]:
    doc = asdict(config)
    doc.pop("token")
    doc.pop("json_output")
    return doc


if __name__ == "__main__":
    sys.exit(main())
