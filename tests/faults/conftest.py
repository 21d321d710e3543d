"""The fault-injection suite: real processes, real faults, and a table of what came of each.

Every scenario records a FaultRow (tasks submitted, completed, failed, re-run, lost, duplicated
outside a crash window, recovery time); the table is printed at the end of the run, and written as
JSON to $DISTRACK_FAULT_REPORT when that is set. The shared pieces are in faultlib.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from faultlib import ROWS, FaultRow


@pytest.fixture
def fault_report():
    def make(name: str) -> FaultRow:
        row = FaultRow(name)
        ROWS.append(row)
        return row

    return make


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's TerminalReporter
    if not ROWS:
        return
    header = f"{'fault':<58} {'sub':>5} {'done':>5} {'fail':>5} {'rerun':>5} {'lost':>4} {'dup':>4} {'recovery':>9}"
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write_line(header)
    for r in ROWS:
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f} s"
        terminalreporter.write_line(
            f"{r.fault:<58} {r.submitted:>5} {r.completed:>5} {r.failed:>5} {r.rerun:>5} {r.lost:>4} "
            f"{r.duplicated:>4} {recovery:>9}"
        )
        for note in r.notes:
            terminalreporter.write_line(f"    {note}")
    path = os.environ.get("DISTRACK_FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps([asdict(r) for r in ROWS], indent=2))
