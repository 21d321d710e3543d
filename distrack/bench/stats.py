"""Statistics of durations and samples: nearest-rank percentiles, summaries, server timestamps."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any


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


def as_moment(value: object) -> datetime | None:
    """A timestamp from the API (RFC 3339 text) or from the database (a datetime); None if absent or bad."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            return parse_timestamp(value)
        except ValueError:
            return None
    return None


def seconds_between(doc: Mapping[str, Any], start: str, end: str) -> float | None:
    """`doc[end] - doc[start]` in seconds, or None when either is missing or malformed."""
    first, last = as_moment(doc.get(start)), as_moment(doc.get(end))
    if first is None or last is None:
        return None
    return (last - first).total_seconds()


def finish_field(doc: Mapping[str, Any]) -> str:
    return "completed_at" if doc.get("completed_at") else "failed_at"


def durations(docs: Iterable[Mapping[str, Any]], start: str, end: str | None = None) -> list[float]:
    """`end - start` of every doc that has both; `end` None means completed_at or failed_at."""
    values = (seconds_between(doc, start, end or finish_field(doc)) for doc in docs)
    return [value for value in values if value is not None]


def server_span(finished: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds from the earliest scheduled_at to the latest finish among finished tasks."""
    starts, ends = [], []
    for doc in finished:
        start, end = as_moment(doc.get("scheduled_at")), as_moment(doc.get(finish_field(doc)))
        if start is None or end is None:
            return None
        starts.append(start)
        ends.append(end)
    if not starts:
        return None
    return (max(ends) - min(starts)).total_seconds()


def rate(count: float, seconds: float | None) -> float:
    """count / seconds, and 0 when there is no time to divide by."""
    return count / seconds if seconds and seconds > 0 else 0.0


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is unknown or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def thirds(samples: Sequence[float]) -> tuple[float, float] | None:
    """The means of the first and the last third of `samples` (at least 3 of them, else None)."""
    third = len(samples) // 3
    if third == 0:
        return None
    return statistics.fmean(samples[:third]), statistics.fmean(samples[-third:])
