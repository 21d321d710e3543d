"""scripts/benchmark.sh --suite all, tiny: its own stack comes up, every suite runs, the JSON has the
expected shape, and nothing is left behind (processes, temporary folder)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pid_alive

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow



def test_tiny_suite_run_prints_json_and_cleans_up(tmp_path):
    # No DATABASE_URL: the suite's own stack embeds PostgreSQL in a temporary folder.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("POSTGRES_")}
    env.update(DISTRACK_PYTHON=sys.executable, TMPDIR=str(tmp_path), NUM_TASKS="5", CONCURRENCY="2",
               WORKER_COUNT="1", DELAY_SECONDS="0.2")
    proc = subprocess.run(
        [str(REPO / "scripts" / "benchmark.sh"), "--suite", "all", "--json", "--rate", "20", "--duration", "1.5",
         "--reference-s", "0.3", "--throughput-s", "0.3", "--e2e-count", "7"],
        env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)

    assert doc["config"]["suites"] == ["throughput", "latency", "sustained", "scaling"]
    assert (doc["config"]["count"], doc["config"]["workers"], doc["config"]["concurrency"]) == (5, 1, 2)
    assert set(doc["suites"]) == {"throughput", "latency", "sustained", "scaling"}
    assert doc["exit_code"] == 0 and doc["failed_suites"] == []
    assert len(doc["references"]["bash"]) == 2 and doc["references"]["bash_per_s"] > 0
    assert doc["references"]["postgres"]["single_row"]["per_s"] > 0
    assert doc["references"]["postgres"]["batch"]["per_s"] > 0

    latency = doc["suites"]["latency"]
    for part, count in (("pickup", 5), ("delayed", 5), ("end_to_end", 7)):
        assert latency[part]["completed"] == count, latency[part]
        assert latency[part]["latency_ms"]["pickup"]["count"] == count
    assert latency["delayed"]["early_starts"] == 0
    assert doc["suites"]["throughput"]["schedule"]["tasks"] > 0
    assert doc["suites"]["throughput"]["batch"]["tasks"] % 1000 == 0
    sustained = doc["suites"]["sustained"]
    assert sustained["run"]["completed"] == sustained["run"]["submitted"] > 0
    assert {m["service"] for m in sustained["memory"]} == {"coordinator", "worker 1", "scheduler"}
    assert [step["workers"] for step in doc["suites"]["scaling"]["steps"]] == [1]

    figures = doc["figures"]
    assert {f["suite"] for f in figures} == {"references", "throughput", "latency", "sustained", "scaling"}
    for figure in figures:
        assert set(figure) == {"suite", "name", "value", "unit", "reference", "reference_name", "ratio", "target",
                               "met"}
    e2e = next(f for f in figures if f["name"].startswith("end to end, 1 worker") and f["suite"] == "latency")
    assert e2e["reference_name"] == "bash" and e2e["ratio"] == pytest.approx(e2e["value"] / e2e["reference"],
                                                                            rel=1e-3)

    # Everything it started is stopped, and its temporary folder is gone.
    assert set(doc["services"]) == {"coordinator", "worker 1", "scheduler"}
    assert not [pid for pid in doc["services"].values() if pid_alive(pid)]
    work_dir = re.search(r"files in (\S+)\)", proc.stderr).group(1)
    assert not Path(work_dir).exists()
