"""Figures with their references, ratios and targets, and the table that prints them."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distrack.bench.stats import ratio

_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    """`value >= bound` (or `<=`), or the same of the ratio to the reference when `on_ratio`."""

    op: str
    bound: float
    text: str
    on_ratio: bool = False

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"a target's op is >= or <=, not {self.op!r}")

    def met(self, value: float | None, value_ratio: float | None) -> bool | None:
        """True or False, or None when the figure it needs is unknown."""
        subject = value_ratio if self.on_ratio else value
        return None if subject is None else bool(_OPS[self.op](subject, self.bound))


@dataclass(frozen=True)
class Figure:
    """One line of the table: a distrack figure, what it is compared with, and issue 4's target."""

    suite: str
    name: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_name: str = ""
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.value, self.reference)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        def rounded(number: float | None) -> float | None:
            return None if number is None else round(number, 4)

        return {
            "suite": self.suite,
            "name": self.name,
            "value": rounded(self.value),
            "unit": self.unit,
            "reference": rounded(self.reference),
            "reference_name": self.reference_name or None,
            "ratio": rounded(self.ratio),
            "target": self.target.text if self.target else None,
            "met": self.met,
        }


def format_value(value: float | None, unit: str) -> str:
    """`1,234/s`, `2.35 ms`, `61.2 MiB`, `35%`, `100`; `n/a` when unknown."""
    if value is None:
        return "n/a"
    if unit == "/s":
        return f"{value:,.0f}/s" if value >= 100 else f"{value:,.1f}/s"
    if unit == "ms":
        return f"{value:,.2f} ms" if abs(value) < 100 else f"{value:,.0f} ms"
    if unit == "MiB":
        return f"{value:,.1f} MiB"
    if unit == "%":
        return f"{value:.0f}%"
    if unit == "":
        return f"{value:,.0f}"
    return f"{value:,.3g} {unit}"


def format_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: ""}[met]


COLUMNS = ("figure", "value", "reference", "ratio", "target", "met")


def table_rows(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    """The cells of each line, one row per figure, and a `[suite]` line before each suite's first."""
    rows: list[tuple[str, ...]] = []
    suite = None
    for fig in figures:
        if fig.suite != suite:
            suite = fig.suite
            rows.append((f"[{suite}]",))
        reference = ""
        if fig.reference is not None or fig.reference_name:
            reference = f"{format_value(fig.reference, fig.unit)} {fig.reference_name}".strip()
        rows.append((fig.name, format_value(fig.value, fig.unit), reference, format_ratio(fig.ratio),
                     fig.target.text if fig.target else "", format_met(fig.met)))
    return rows


def format_table(figures: Sequence[Figure]) -> str:
    """A plain-text table: figure, value, reference, ratio (value / reference), target, met."""
    rows = table_rows(figures)
    full = [row for row in rows if len(row) == len(COLUMNS)]
    widths = [max([len(COLUMNS[i])] + [len(row[i]) for row in full]) for i in range(len(COLUMNS))]
    right = {1, 3}  # numbers line up on the right

    def line(cells: Sequence[str]) -> str:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(COLUMNS), "  ".join("-" * width for width in widths)]
    out += [row[0] if len(row) == 1 else line(row) for row in rows]
    return "\n".join(out)
