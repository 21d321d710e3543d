"""Unit tests of the suites' pure parts: statistics, ratios, targets, the table, /proc parsing, memory
growth, `distrack up` output, the load generator's pacing (with a fake sender). No stack, no sockets."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from helpers import wait_for

from distrack.bench import figures as fig
from distrack.bench.client import ApiError, TransportError, batch_body, schedule_body
from distrack.bench.config import SuiteConfig, expand_suites
from distrack.bench.load import run_load
from distrack.bench.machine import (
    CLOCK_TICKS,
    CpuMeter,
    CpuTimes,
    CpuUsage,
    MemoryGrowth,
    RssSampler,
    memory_growth,
    parse_proc_stat,
    parse_process_stat,
    service_rss,
    steal_share,
    tree_cpu_s,
)
from distrack.bench.progress import Progress, bar
from distrack.bench.references import PostgresReference, RateResult, bash_reference
from distrack.bench.run import Report
from distrack.bench.stack import parse_service_pids, postgres_url_from_pid_file
from distrack.bench.stats import durations, ratio, seconds_between, server_span, thirds
from distrack.bench.suites import LatencyResult, TaskRun, measure_run
from distrack.bench.table import Figure, Target, format_table, format_value, table_rows

T0 = datetime(2026, 11, 23, 4, 0, 0, tzinfo=UTC)


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def task(task_id, *, scheduled=0.0, started=None, completed=None, failed=None, status="completed"):
    doc = {"task_id": task_id, "status": status, "scheduled_at": at(scheduled)}
    for name, value in (("started_at", started), ("completed_at", completed), ("failed_at", failed)):
        if value is not None:
            doc[name] = at(value)
    return doc


# --- statistics ----------------------------------------------------------------------------------


def test_seconds_between_takes_datetimes_from_the_database_and_text_from_the_api():
    assert seconds_between({"a": at(0), "b": at(250)}, "a", "b") == pytest.approx(0.25)
    text = {"a": "2026-11-23T04:00:00.000000Z", "b": "2026-11-23T04:00:00.003000Z"}
    assert seconds_between(text, "a", "b") == pytest.approx(0.003)
    assert seconds_between({"a": at(0)}, "a", "b") is None
    assert seconds_between({"a": at(0), "b": "soon"}, "a", "b") is None


def test_durations_and_server_span():
    docs = [task("a", started=2, completed=10), task("b", scheduled=5, started=9, failed=30, status="failed")]
    assert durations(docs, "scheduled_at") == pytest.approx([0.010, 0.025])  # to completed_at or failed_at
    assert durations(docs, "scheduled_at", "started_at") == pytest.approx([0.002, 0.004])
    assert server_span(docs) == pytest.approx(0.030)
    assert server_span([]) is None


def test_ratio():
    assert ratio(600, 1000) == pytest.approx(0.6)
    assert ratio(None, 1000) is None
    assert ratio(5, None) is None
    assert ratio(5, 0) is None


def test_thirds():
    assert thirds([1, 1, 1, 5, 5, 5, 9, 9, 9]) == (1, 9)
    assert thirds([10, 20, 30, 40]) == (10, 40)  # a third of 4 is 1 sample
    assert thirds([1, 2]) is None


# --- targets and the table -----------------------------------------------------------------------


def test_target_on_value_and_on_ratio():
    at_least = Target(">=", 2000, ">= 2,000/s")
    assert at_least.met(2000, None) is True
    assert at_least.met(1999.9, None) is False
    assert at_least.met(None, None) is None
    share = Target(">=", 0.6, ">= 60% of bash", on_ratio=True)
    assert share.met(10, 0.61) is True
    assert share.met(10_000, 0.59) is False
    assert share.met(10, None) is None
    with pytest.raises(ValueError):
        Target(">", 1, "strictly more")


def test_figure_ratio_and_met():
    figure = Figure("latency", "end to end", 650.0, "/s", 1000.0, "bash", fig.E2E_VS_BASH)
    assert figure.ratio == pytest.approx(0.65)
    assert figure.met is True
    assert Figure("latency", "end to end", 500.0, "/s", 1000.0, "bash", fig.E2E_VS_BASH).met is False
    assert Figure("latency", "no reference", 500.0, "/s", target=fig.E2E_VS_BASH).met is None
    assert Figure("latency", "no target", 1.0, "ms").met is None
    doc = figure.to_dict()
    assert doc == {"suite": "latency", "name": "end to end", "value": 650.0, "unit": "/s", "reference": 1000.0,
                   "reference_name": "bash", "ratio": 0.65, "target": ">= 60% of bash (3 workers)", "met": True}


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (1234.4, "/s", "1,234/s"),
        (20.55, "/s", "20.6/s"),
        (2.345, "ms", "2.35 ms"),
        (1234.0, "ms", "1,234 ms"),
        (-0.5, "ms", "-0.50 ms"),
        (61.25, "MiB", "61.2 MiB"),
        (35.4, "%", "35%"),
        (100, "", "100"),
        (None, "ms", "n/a"),
    ],
)
def test_format_value(value, unit, text):
    assert format_value(value, unit) == text


def test_table_has_a_line_per_figure_and_a_heading_per_suite():
    figures = [
        Figure("references", "bash -c", 1000.0, "/s"),
        Figure("latency", "end to end", 650.0, "/s", 1000.0, "bash", fig.E2E_VS_BASH),
        Figure("latency", "pickup p50", 4.2, "ms", target=fig.PICKUP_P50_MS),
    ]
    rows = table_rows(figures)
    assert rows[0] == ("[references]",)
    assert rows[2] == ("[latency]",)
    assert rows[3] == ("end to end", "650/s", "1,000/s bash", "0.65", ">= 60% of bash (3 workers)", "yes")
    assert rows[4] == ("pickup p50", "4.20 ms", "", "", "<= 3 ms", "NO")
    text = format_table(figures)
    lines = text.splitlines()
    assert lines[0].split() == ["figure", "value", "reference", "ratio", "target", "met"]
    assert set(lines[1]) <= {"-", " "}
    assert any(line.startswith("end to end") and line.endswith("yes") for line in lines)
    # Values are right-aligned in one column.
    value_ends = {line.index(cell) + len(cell) for line, cell in ((lines[3], "1,000/s"), (lines[5], "650/s"))}
    assert len(value_ends) == 1


# --- the machine ---------------------------------------------------------------------------------


def test_parse_proc_stat_counts_busy_and_total_without_steal_or_guest():
    text = "cpu  100 5 50 1000 20 3 2 7 40 0\ncpu0 50 2 25 500 10 1 1 3 20 0\nintr 12345\n"
    times = parse_proc_stat(text)
    assert times.busy_s == pytest.approx((100 + 5 + 50 + 3 + 2) / CLOCK_TICKS)
    assert times.total_s == pytest.approx((100 + 5 + 50 + 3 + 2 + 1000 + 20) / CLOCK_TICKS)
    assert times.steal_s == pytest.approx(7 / CLOCK_TICKS)
    # An old kernel with only four fields.
    assert parse_proc_stat("cpu 10 0 10 80\n").busy_s == pytest.approx(20 / CLOCK_TICKS)
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1\n")


def test_steal_share_is_the_hypervisors_part_of_the_cores_time():
    before = parse_proc_stat("cpu 100 0 0 100 0 0 0 10\n")
    after = parse_proc_stat("cpu 150 0 0 130 0 0 0 30\n")  # 50 busy, 30 idle, 20 stolen
    assert steal_share(before, after) == pytest.approx(20 / 100)
    assert steal_share(before, before) is None and steal_share(None, after) is None


def test_cpu_usage():
    usage = CpuUsage(wall_s=2.0, machine_busy_s=0.3, client_s=0.5)
    assert usage.machine_ms_per(100) == pytest.approx(3.0)
    assert usage.client_share == pytest.approx(0.25)
    assert CpuUsage(1.0, None, 0.1).machine_ms_per(10) is None
    assert usage.machine_ms_per(0) is None


def test_parse_process_stat_reads_past_a_name_with_spaces_and_parentheses():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    text = "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 10 0 0 0 150 50 30 20 20 0 1 0 100\n"
    own, reaped = parse_process_stat(text)
    assert own == pytest.approx(200 / CLOCK_TICKS)
    assert reaped == pytest.approx(50 / CLOCK_TICKS)


BURN_IN_CHILD = """
import subprocess, sys, time
burn = "import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"
child = subprocess.Popen([sys.executable, "-c", burn])
child.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""


def test_a_process_tree_counts_the_cpu_of_children_it_has_reaped():
    """A parent that only waits is charged with what its child burned, as a worker is with its tasks."""
    parent = subprocess.Popen([sys.executable, "-c", BURN_IN_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        meter = CpuMeter({"parent": parent.pid, "gone": 2**22 + 1})
        assert parent.stdout.readline() == "reaped\n"
        usage = meter.stop()
        assert usage.by_process_s["parent"] >= 0.25
        assert "gone" not in usage.by_process_s  # no such process: left out, not zero
        assert tree_cpu_s(2**22 + 1) is None
    finally:
        parent.kill()
        parent.wait()


def test_cpu_split_per_task_groups_the_workers_and_names_the_rest():
    usage = CpuUsage(1.0, machine_busy_s=0.5, client_s=0.02,
                     by_process_s={"coordinator": 0.05, "worker 1": 0.1, "worker 2": 0.12, "PostgreSQL": 0.03})
    run = measure_run("e2e", load_result(100), [task(f"t{i}", completed=1) for i in range(100)], 0, usage)
    assert run.cpu_split_ms_per_task() == pytest.approx({
        "coordinator": 0.5, "workers, with their commands": 2.2, "PostgreSQL": 0.3, "this benchmark": 0.2,
        "the rest of the machine": 1.8})
    unknown = measure_run("e2e", load_result(1), [task("a", completed=1)], 0, CpuUsage(1.0, 0.5, 0.02))
    assert unknown.cpu_split_ms_per_task() == {}


def test_only_the_scheduler_counts_its_children_running_the_same_program(tmp_path):
    # A worker's children are its commands: one caught between its spawn and its exec runs the worker's
    # own program, and counting it would add the worker's RSS again. gunicorn's workers are the
    # scheduler's children and part of it. Here one process stands for both: it forks a copy of itself.
    ready = tmp_path / "ready"
    script = ("import os, sys, time\n"
              "ballast = bytearray(64 * 1024 * 1024)\n"  # touched, so a forked copy has it in its RSS too
              "if os.fork() == 0:\n    time.sleep(60); os._exit(0)\n"
              f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(ready.exists, 20, what="the parent and its child")
        alone, with_children = service_rss(parent.pid), service_rss(parent.pid, with_children=True)
        assert alone is not None and with_children is not None
        assert with_children > alone + 32 * 1024 * 1024
        sampler = RssSampler({"scheduler": parent.pid, "worker 1": parent.pid}, interval_s=60).start()
        wait_for(lambda: sampler.samples, 10, what="a sample")
        (sample,) = sampler.stop()
        assert sample["scheduler"] > sample["worker 1"] + 32 * 1024 * 1024
    finally:
        import psutil

        for child in psutil.Process(parent.pid).children():
            child.kill()
        parent.kill()
        parent.wait()


def test_memory_growth_compares_the_first_and_last_thirds():
    mib = 1024 * 1024
    samples = [{"scheduler": 100 * mib, "worker 1": 50 * mib} for _ in range(3)]
    samples += [{"scheduler": 100 * mib, "worker 1": 55 * mib} for _ in range(3)]
    samples += [{"scheduler": 100 * mib, "worker 1": 60 * mib} for _ in range(2)] + [{"scheduler": 100 * mib}]
    growth = {g.service: g for g in memory_growth(samples)}
    assert growth["scheduler"].growth_mib == pytest.approx(0)
    # 8 samples of worker 1 (it vanished from the last): thirds of 2, [50, 50] and [60, 60].
    assert (growth["worker 1"].first_mib, growth["worker 1"].last_mib) == pytest.approx((50, 60))
    assert growth["worker 1"].samples == 8
    assert memory_growth([{"gone": mib}]) == []


def test_memory_growth_figures_use_the_no_growth_target():
    result = type("Sustained", (), {})()
    result.rate, result.duration_s = 100.0, 30.0
    result.run = measure_run("sustained", load_result(2), [task("a", started=1, completed=3)] * 2, 0,
                             CpuUsage(30, 3, 0.3))
    result.memory = [MemoryGrowth("worker 1", 50.0, 52.0, 60), MemoryGrowth("scheduler", 100.0, 110.0, 60)]
    rows = {f.name: f for f in fig.sustained_figures(result, fig.References())}
    assert rows["RSS worker 1, last third"].met is True  # +4%
    assert rows["RSS scheduler, last third"].met is False  # +10%
    assert rows["RSS scheduler, last third"].reference == 100.0


def test_the_sustained_figures_split_the_machine_cpu_by_process():
    result = type("Sustained", (), {})()
    result.rate, result.duration_s, result.memory = 100.0, 30.0, []
    usage = CpuUsage(30, machine_busy_s=1.0, client_s=0.01, by_process_s={"coordinator": 0.2, "worker 1": 0.3})
    result.run = measure_run("sustained", load_result(100), [task(f"t{i}", completed=1) for i in range(100)], 0, usage)
    rows = {f.name: f.value for f in fig.sustained_figures(result, fig.References())}
    assert rows["  of which coordinator"] == pytest.approx(2.0)
    assert rows["  of which workers, with their commands"] == pytest.approx(3.0)
    assert rows["  of which the rest of the machine"] == pytest.approx(4.9)


# --- the stack -----------------------------------------------------------------------------------

UP_OUTPUT = """\
2026-11-23 05:33:31,923 coordinator[13796] INFO distrack.coordinator.server: coordinator listening
distrack is up:
  postgres     embedded PostgreSQL, data in /tmp/x/pgdata
  coordinator  grpc 127.0.0.1:18080  (pid 13796)
  worker 1     grpc (free port)  (pid 13812)
  worker 2     grpc (free port)  (pid 13813)
  scheduler    http://127.0.0.1:18081  (pid 13815)
  output       /tmp/x/output
Try: curl -X POST http://127.0.0.1:18081/schedule -d '{"command": "echo hello", "delay_seconds": 0}'
Ctrl-C stops everything.
"""


def test_parse_service_pids_from_distrack_up():
    assert parse_service_pids(UP_OUTPUT) == {"coordinator": 13796, "worker 1": 13812, "worker 2": 13813,
                                             "scheduler": 13815}


def test_postgres_url_from_pid_file():
    text = "4242\n/tmp/x/pgdata\n1795412011\n5432\n/tmp/x/pgdata\n\n  2199719    294944\nready   \n"
    assert postgres_url_from_pid_file(text) == "postgresql://postgres:@/postgres?host=/tmp/x/pgdata&port=5432"
    with pytest.raises(ValueError):
        postgres_url_from_pid_file("4242\n/tmp/x/pgdata\n")


# --- references, request bodies, progress ------------------------------------------------------


def test_request_bodies():
    assert schedule_body("echo hello", 0) == b'{"command": "echo hello", "delay_seconds": 0}'
    body = batch_body("true", 3600.0, 3)
    assert body == b'{"tasks": [' + b", ".join([b'{"command": "true", "delay_seconds": 3600.0}'] * 3) + b"]}"


def test_bar():
    assert bar(0, 10, width=10) == "[..........]  0/10"
    assert bar(5, 10, width=10) == "[#####.....]  5/10"
    assert bar(12, 10, width=10) == "[##########] 12/10"
    assert bar(1, 0, width=4) == "[....] 1/0"


def test_progress_draws_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    Progress(quiet).step("x", 1, 2)
    assert quiet.getvalue() == ""
    screen = Terminal()
    progress = Progress(screen)
    progress.step("submitting", 2, 2)
    progress.clear()
    assert "submitting [" in screen.getvalue() and screen.getvalue().endswith("\r\x1b[K")


def test_expand_suites_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown suite"):
        expand_suites("latency,fast")


# --- the load generator (fake sender: no sockets) -----------------------------------------------


def returning(ids):
    async def send(client):
        return ids

    return send


def test_run_load_sends_count_requests_from_every_client():
    sent = iter(range(1000))

    async def send(client):
        await asyncio.sleep(0)  # let the other clients in
        return [f"t{next(sent)}"]

    result = run_load("http://127.0.0.1:9", send, concurrency=4, count=25)
    assert (result.requests, result.tasks, result.errors, result.aborted) == (25, 25, 0, False)
    assert len(set(result.task_ids)) == 25
    assert result.round_trip is not None and result.round_trip.count == 25


def test_run_load_paces_requests_globally():
    started = time.monotonic()
    result = run_load("http://127.0.0.1:9", returning(["t"]), concurrency=3, count=6, interval_s=0.02)
    assert result.requests == 6
    assert time.monotonic() - started >= 0.1  # the 6th leaves 5 intervals after the first


def test_run_load_for_a_duration():
    result = run_load("http://127.0.0.1:9", returning(["a", "b"]), concurrency=2, duration_s=0.2,
                      interval_s=0.01)
    assert 10 <= result.requests <= 21
    assert result.tasks == 2 * result.requests
    assert result.tasks_per_s > 0


def test_run_load_stops_everyone_on_a_refusal():
    async def refuse(client):
        raise ApiError(400, "Invalid input", "command is empty")

    result = run_load("http://127.0.0.1:9", refuse, concurrency=3, count=100)
    assert result.aborted and result.requests == 0
    assert 1 <= result.errors <= 3  # each client stops after at most one
    assert result.first_error == "HTTP 400: Invalid input: command is empty"


def test_run_load_keeps_going_on_503_but_not_when_unreachable():
    calls = iter(range(100))

    async def flaky(client):
        if next(calls) % 2:
            raise ApiError(503, "Database unavailable", "")
        return ["t"]

    result = run_load("http://127.0.0.1:9", flaky, concurrency=1, count=10)
    assert (result.requests, result.errors, result.aborted) == (5, 5, False)

    async def gone(client):
        raise TransportError("Connection refused")

    assert run_load("http://127.0.0.1:9", gone, concurrency=2, count=50).aborted


def test_run_load_needs_a_count_or_a_duration():
    with pytest.raises(ValueError):
        run_load("http://127.0.0.1:9", returning([]), concurrency=1)


# --- a run's figures -----------------------------------------------------------------------------


def load_result(tasks: int, errors: int = 0):
    from distrack.bench.load import LoadResult

    return LoadResult(requests=tasks, errors=errors, first_error=None, task_ids=[f"t{i}" for i in range(tasks)],
                      round_trip=None, cpu=CpuUsage(1.0, 0.5, 0.1))


def test_measure_run_uses_the_servers_timestamps():
    docs = [
        task("a", started=2, completed=10),
        task("b", scheduled=5, started=8, completed=25),
        task("c", scheduled=10, started=14, failed=30, status="failed"),
    ]
    run = measure_run("e2e", load_result(4), docs, unfinished=1, cpu=CpuUsage(0.5, 0.03, 0.01))
    assert (run.submitted, run.completed, run.failed, run.unfinished) == (4, 2, 1, 1)
    assert run.server_span_s == pytest.approx(0.030)
    assert run.throughput_per_s == pytest.approx(2 / 0.030)
    assert run.machine_ms_per_task == pytest.approx(15.0)  # 30 ms of machine CPU over 2 completed
    assert run.pickup.p50_s == pytest.approx(0.003)
    assert run.end_to_end.max_s == pytest.approx(0.020)
    assert run.early_starts == 0
    assert not run.all_completed
    doc = run.to_dict()
    assert doc["latency_ms"]["pickup"]["max_ms"] == 4.0 and doc["unfinished"] == 1


def test_measure_run_counts_early_starts():
    run = measure_run("delayed", load_result(1), [task("a", scheduled=10, started=9, completed=12)], 0,
                      CpuUsage(1, 0.01, 0))
    assert run.early_starts == 1
    assert run.pickup.min_s == pytest.approx(-0.001)
    assert run.all_completed


def bash_run(per_s: float, ms: float) -> RateResult:
    ops = int(per_s * 2)
    return RateResult("bash -c 'echo hello', 10 threads", ops, 0, CpuUsage(2.0, ops * ms / 1000, 1.0))


def test_references_use_the_mean_of_the_bash_runs():
    refs = fig.References(bash=[bash_run(1000, 2.0), bash_run(800, 2.5)])
    assert refs.bash_rate == pytest.approx(900)
    assert refs.bash_ms == pytest.approx(2.25)
    names = [f.name for f in fig.reference_figures(refs)]
    assert names[:2] == ["bash -c 'echo hello', 10 threads, start of run",
                         "bash -c 'echo hello', 10 threads, end of run"]
    assert fig.References().bash_rate is None and fig.reference_figures(fig.References()) == []


def fake_run(label: str, *, completed: int, span_ms: float, pickup_ms=(2.0, 9.0)) -> TaskRun:
    docs = []
    for i in range(completed):
        started = pickup_ms[0] if i < completed - 1 else pickup_ms[1]
        docs.append(task(f"{label}{i}", scheduled=0, started=started, completed=span_ms))
    return measure_run(label, load_result(completed), docs, 0, CpuUsage(1.0, completed * 0.0025, 0.1))


def test_latency_figures_against_issue_4s_targets():
    latency = LatencyResult(
        pickup=fake_run("p", completed=100, span_ms=20, pickup_ms=(2.5, 12.0)),
        delayed=fake_run("d", completed=100, span_ms=20, pickup_ms=(1.0, 4.0)),
        delay_s=1.0,
        interval_ms=20.0,
        end_to_end=fake_run("e", completed=100, span_ms=150),  # 100 tasks in 0.15 s: 667/s
    )
    refs = fig.References(bash=[bash_run(1000, 2.0)])
    rows = {f.name: f for f in fig.latency_figures(latency, refs, workers=3)}
    assert rows["pickup on an idle stack p50 (20 ms apart)"].met is True  # 2.5 ms
    assert rows["pickup on an idle stack p99"].met is True  # the 99th of 100 is still 2.5 ms
    assert rows["delayed: started_at - scheduled_at min"].met is True
    e2e = rows["end to end, 3 workers"]
    assert e2e.ratio == pytest.approx(0.667, abs=0.001) and e2e.met is True
    assert rows["machine CPU per task"].value == pytest.approx(2.5) and rows["machine CPU per task"].met is True
    assert rows["tasks completed"].met is True
    # Issue 4's end-to-end targets are for 3 workers: with another count they are left out.
    other = {f.name: f for f in fig.latency_figures(latency, refs, workers=1)}
    assert other["end to end, 1 worker"].target is None and other["machine CPU per task"].target is None


def test_throughput_figures_compare_with_postgres():
    from distrack.bench.suites import ThroughputResult

    def load(tasks, wall_s, client_s):
        result = load_result(tasks)
        return type(result)(result.requests, 0, None, result.task_ids, None, CpuUsage(wall_s, 1.0, client_s))

    pg = PostgresReference(RateResult("single", 20_000, 0, CpuUsage(1.0, 1.0, 0.2)),
                           RateResult("batch", 200_000, 0, CpuUsage(1.0, 1.0, 0.1)))
    result = ThroughputResult(load(2500, 1.0, 0.3), load(60_000, 1.0, 0.9), 1000, 62_500)
    rows = fig.throughput_figures(result, fig.References(postgres=pg), concurrency=16)
    by_name = {f.name: f for f in rows}
    schedule = by_name["POST /schedule, 16 keep-alive clients"]
    assert (schedule.value, schedule.ratio, schedule.met) == (2500, pytest.approx(0.125), True)
    assert by_name["POST /tasks, batches of 1,000"].ratio == pytest.approx(0.3)
    assert by_name["load generator CPU, POST /tasks"].met is False  # 90% of a core: the client may be the limit


def test_report_exit_code_and_text():
    report = Report(SuiteConfig(suites=("latency",)))
    report.references.bash.append(bash_run(1000, 2.0))
    good = fake_run("e", completed=10, span_ms=10)
    report.add("latency", good, lambda refs: fig.end_to_end_figures("latency", good, refs, name="end to end",
                                                                     targets=True), [good])
    assert report.exit_code == 0
    text = report.format()
    assert "end to end" in text and "targets missed" in text and "steal" not in text
    doc = report.to_dict()
    assert doc["exit_code"] == 0 and doc["figures"][0]["suite"] == "references" and doc["steal"] is None
    report.steal = 0.044
    assert "the hypervisor took 4.4% of the cores' time" in report.format() and report.to_dict()["steal"] == 0.044
    report.steal_by_suite = {"throughput": 0.012, "latency": 0.15}
    assert "steal by suite: throughput 1.2%, latency 15.0%" in report.format()
    assert report.to_dict()["steal_by_suite"] == {"throughput": 0.012, "latency": 0.15}
    unfinished = measure_run("e", load_result(3), [task("a", completed=1)], 2, CpuUsage(1, 0.1, 0.1))
    report.add("sustained", unfinished, lambda refs: [], [unfinished])
    assert report.exit_code == 1


def test_a_guarded_suite_notes_its_steal_whether_it_fails_or_not(monkeypatch):
    from distrack.bench import run

    times = iter([CpuTimes(0.0, 10.0, 0.0), CpuTimes(8.0, 18.0, 2.0), CpuTimes(8.0, 18.0, 2.0),
                  CpuTimes(10.0, 20.0, 2.0)])
    monkeypatch.setattr(run, "read_cpu_times", lambda: next(times))
    report = Report(SuiteConfig(suites=("latency",)))
    with report.guard("latency"):
        pass
    with report.guard("scaling"):
        raise RuntimeError("its stack did not come up")
    assert report.steal_by_suite == {"latency": pytest.approx(0.2), "scaling": 0.0}
    assert report.failed_suites == ["scaling"]


def test_the_bash_reference_keeps_its_files_in_the_folder_it_is_given(tmp_path):
    kept = tmp_path / "bash-reference-1"
    result = bash_reference("echo hi", concurrency=2, duration_s=0.2, out_dir=kept)
    assert result.operations > 0 and result.failures == 0
    files = sorted(kept.iterdir())
    assert len(files) == result.operations and files[0].read_text() == "hi\n"


def test_the_bash_reference_removes_its_own_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = bash_reference("echo hi", concurrency=1, duration_s=0.1)
    assert result.operations > 0 and list(tmp_path.iterdir()) == []


def test_checkpoint_runs_for_a_superuser_and_is_skipped_with_a_note_otherwise(sql_conn, capsys):
    from distrack.bench.suites import checkpoint

    checkpoint(sql_conn)  # the test server's role may
    role = f"bench_nopriv_{uuid.uuid4().hex[:8]}"
    sql_conn.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        sql_conn.execute(f"SET ROLE {role}")
        checkpoint(sql_conn)
        assert "no CHECKPOINT" in capsys.readouterr().err
        assert sql_conn.execute("SELECT 1").fetchone()  # the connection is still usable
    finally:
        sql_conn.execute("RESET ROLE")
        sql_conn.execute(f"DROP ROLE {role}")


def test_removing_the_throughput_tasks_deletes_only_queued_ones_and_leaves_the_table_vacuumed(db_url, sql_conn):
    from distrack.bench.suites import StackUnderTest, remove_tasks

    ids = [r["id"] for r in sql_conn.execute(
        "INSERT INTO tasks (id, command, scheduled_at) SELECT gen_random_uuid(), 'echo', now() + interval '1 day' "
        "FROM generate_series(1, 500) RETURNING id::text").fetchall()]
    sql_conn.execute("UPDATE tasks SET status = 'running' WHERE id = %s", (ids[0],))
    before = sql_conn.execute("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks'").fetchone()
    removed = remove_tasks(StackUnderTest(url="http://127.0.0.1:9", database_url=db_url), ids, SuiteConfig(),
                           Progress())
    assert removed == 499
    assert sql_conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 1
    # The statistics collector reports the VACUUM a moment later.
    wait_for(lambda: sql_conn.execute("SELECT pg_stat_clear_snapshot()") and sql_conn.execute(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks'").fetchone()["vacuum_count"]
        > before["vacuum_count"], what="the VACUUM on record")
