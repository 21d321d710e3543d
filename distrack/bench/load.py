"""The load generator: keep-alive connections on one event loop, sending ready-made bodies.

A request's body is built once and sent as the same bytes every time; the only per-request work on
the client is framing it and parsing the answer for its task ids. Each of `concurrency` clients has
its own connection and one request in flight, as a thread with a blocking client would, for a
fraction of the CPU (see AsyncSchedulerClient). Requests are paced globally (request i leaves no
earlier than start + i * interval, whichever client sends it), or sent back to back when the interval
is 0. The process's own CPU over the run is reported, so a reader can tell whether the client, not
the server, was the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distrack.bench.client import ApiError, AsyncSchedulerClient, TransportError
from distrack.bench.machine import CpuMeter, CpuUsage
from distrack.bench.progress import Progress
from distrack.bench.stats import LatencyStats, rate, summarize

Send = Callable[[AsyncSchedulerClient], Awaitable[Sequence[str]]]


def schedule_sender(body: bytes) -> Send:
    """POST /schedule with `body`; the new task's id."""

    async def send(client: AsyncSchedulerClient) -> Sequence[str]:
        return (str((await client.post("/schedule", body))["task_id"]),)

    return send


def batch_sender(body: bytes) -> Send:
    """POST /tasks with `body`; the new tasks' ids."""

    async def send(client: AsyncSchedulerClient) -> Sequence[str]:
        return [str(task["task_id"]) for task in (await client.post("/tasks", body))["tasks"]]

    return send


@dataclass
class _ClientLog:
    requests: int = 0
    errors: int = 0
    first_error: str | None = None
    task_ids: list[str] = field(default_factory=list)
    round_trips_s: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LoadResult:
    """What one load run sent and what it cost the client."""

    requests: int
    errors: int
    first_error: str | None
    task_ids: list[str]
    round_trip: LatencyStats | None
    cpu: CpuUsage
    # True when a refusal (4xx) or an unreachable scheduler stopped the run early.
    aborted: bool = False

    @property
    def tasks(self) -> int:
        return len(self.task_ids)

    @property
    def tasks_per_s(self) -> float:
        """Tasks accepted per second of the client's wall clock over the run."""
        return rate(self.tasks, self.cpu.wall_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tasks": self.tasks,
            "errors": self.errors,
            "first_error": self.first_error,
            "aborted": self.aborted,
            "tasks_per_s": round(self.tasks_per_s, 2),
            "round_trip_ms": self.round_trip.to_ms_dict() if self.round_trip else None,
            "client_cpu_share_of_a_core": round(self.cpu.client_share, 4),
            "cpu": self.cpu.to_dict(),
        }


def run_load(
    url: str,
    send: Send,
    *,
    concurrency: int,
    count: int | None = None,
    duration_s: float | None = None,
    interval_s: float = 0.0,
    token: str | None = None,
    progress: Progress | None = None,
    label: str = "load",
) -> LoadResult:
    """Sends `count` requests, or as many as fit in `duration_s`, from `concurrency` clients."""
    if count is None and duration_s is None:
        raise ValueError("give a count or a duration")
    progress = progress or Progress()
    meter = CpuMeter()
    try:
        logs, aborted = asyncio.run(_load(url, send, concurrency, count, duration_s, interval_s, token, progress,
                                          label))
    finally:
        progress.clear()
    cpu = meter.stop()
    return LoadResult(
        requests=sum(log.requests for log in logs),
        errors=sum(log.errors for log in logs),
        first_error=next((log.first_error for log in logs if log.first_error), None),
        task_ids=[task_id for log in logs for task_id in log.task_ids],
        round_trip=summarize([value for log in logs for value in log.round_trips_s]),
        cpu=cpu,
        aborted=aborted,
    )


async def _load(url: str, send: Send, concurrency: int, count: int | None, duration_s: float | None,
                interval_s: float, token: str | None, progress: Progress,
                label: str) -> tuple[list[_ClientLog], bool]:
    clients = [AsyncSchedulerClient(url, token=token) for _ in range(concurrency)]
    stopped = False
    aborted = False
    next_index = itertools.count()
    done = itertools.count(1)
    start = time.monotonic()
    end = None if duration_s is None else start + duration_s

    def report() -> None:
        n = next(done)
        if count is not None:
            progress.step(label, n, count)
        else:
            progress.elapsed(f"{label} ({n:,} requests)", time.monotonic() - start, duration_s or 0.0)

    async def one_client(client: AsyncSchedulerClient) -> _ClientLog:
        nonlocal stopped, aborted
        log = _ClientLog()
        while not stopped:
            index = next(next_index)
            due = start + index * interval_s
            if (count is not None and index >= count) or (end is not None and max(due, time.monotonic()) >= end):
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                if stopped:
                    break
            sent = time.monotonic()
            try:
                ids = await send(client)
            except (ApiError, TransportError) as exc:
                log.errors += 1
                log.first_error = log.first_error or str(exc)
                # A refusal would be repeated for every copy of the same request, and an unreachable
                # scheduler would cost one timeout per request: stop everyone.
                if isinstance(exc, TransportError) or 400 <= exc.status < 500:
                    aborted = stopped = True
                continue
            log.round_trips_s.append(time.monotonic() - sent)
            log.requests += 1
            log.task_ids.extend(ids)
            report()
        return log

    try:
        logs = await asyncio.gather(*(one_client(client) for client in clients))
    finally:
        stopped = True  # on Ctrl-C too
        for client in clients:
            await client.close()
    return list(logs), aborted
