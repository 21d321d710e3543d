"""The seed's single run: submit COUNT tasks, wait for them, report counts, durations and latencies.

Submits COUNT tasks to `POST /schedule`, then polls `GET /status` for the unfinished ones until every
task is completed, failed or cancelled, or TIMEOUT seconds have passed since the last submission, and
reports counts, durations, throughput and latencies.

Latencies come from the server's own timestamps, which PostgreSQL takes with `now()`: `scheduled_at`
(submit time + delay), `picked_at`, `started_at` and `completed_at`/`failed_at`. The client's clock
never enters them, so they hold when the benchmark runs on another machine. A task that was retried
is measured from its last `scheduled_at`. Durations and throughput are measured on the client's
monotonic clock, so they are coarse to one poll interval (`-p`).

Concurrency model: threads. A ThreadPoolExecutor of `--concurrency` threads, each with its own
keep-alive `http.client` connection, submits and later polls. Only the standard library is used.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distrack.bench.client import ApiError, ClientPool, SchedulerClient, TransportError
from distrack.bench.config import FINISHED_STATUSES, BenchConfig
from distrack.bench.progress import Progress
from distrack.bench.stats import LatencyStats, durations, server_span, summarize

# Waits before each retry of a submission answered 503 (database away): about 4 s in all, enough to
# ride out a short database restart without stalling the benchmark for long.
SUBMIT_503_BACKOFF_S = (0.25, 0.5, 1.0, 2.0)


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
    end_to_end = durations(finished, "scheduled_at")
    pickup = durations(docs, "scheduled_at", "started_at")
    dispatch = durations(docs, "scheduled_at", "picked_at")
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


