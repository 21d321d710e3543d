"""Unit tests of the seed's single run (distrack.bench.single) and the shared parts: flags, statistics,
the HTTP client. No scheduler and no sockets needed. The suites' parts: tests/test_bench_suites.py."""

from __future__ import annotations

import http.client
import io
import json

import pytest

from distrack import bench
from distrack.bench import (
    ApiError,
    BenchConfig,
    SchedulerClient,
    SuiteConfig,
    TransportError,
    build_result,
    format_latency,
    format_report,
    normalize_url,
    parse_args,
    percentile,
    submit_with_retry,
    summarize,
)

# --- argument parsing ----------------------------------------------------------------------------


def test_defaults_are_the_seeds():
    config = parse_args([], env={})
    assert config == BenchConfig(
        url="http://localhost:8081",
        count=50,
        delay_s=0.0,
        poll_interval_s=0.5,
        timeout_s=120.0,
        command="echo benchmark",
        concurrency=10,
        interval_ms=0.0,
        json_output=False,
        token=None,
    )


def test_seed_short_flags():
    config = parse_args(
        ["-u", "http://sched:9000", "-n", "200", "-d", "1.5", "-p", "0.1", "-t", "30", "-c", "sleep 1"], env={}
    )
    assert (config.url, config.count, config.delay_s) == ("http://sched:9000", 200, 1.5)
    assert (config.poll_interval_s, config.timeout_s, config.command) == (0.1, 30.0, "sleep 1")


def test_long_flags():
    config = parse_args(["--concurrency", "4", "--interval-ms", "20", "--json"], env={})
    assert (config.concurrency, config.interval_ms, config.json_output) == (4, 20.0, True)
    assert parse_args(["-i", "5"], env={}).interval_ms == 5.0


def test_environment_sets_defaults_and_flags_win():
    env = {"SCHEDULER_URL": "http://other:8081/", "NUM_TASKS": "100", "DELAY_SECONDS": "1", "CONCURRENCY": "3"}
    config = parse_args([], env=env)
    assert (config.url, config.count, config.delay_s, config.concurrency) == ("http://other:8081", 100, 1.0, 3)
    config = parse_args(["-u", "http://mine:1", "-n", "7"], env=env)
    assert (config.url, config.count) == ("http://mine:1", 7)


def test_suite_defaults_are_the_seeds_suite_variables():
    config = parse_args(["--suite", "all"], env={})
    assert config == SuiteConfig(
        suites=("throughput", "latency", "sustained", "scaling"),
        url=None,  # no -u: the suites start their own stack
        count=100,
        delay_s=1.0,
        poll_interval_s=0.5,
        timeout_s=120.0,
        command="echo hello",
        concurrency=16,  # issue 4's clients for POST /schedule
        interval_ms=20.0,
        workers=3,
        rate=100.0,
        duration_s=30.0,
        reference_s=3.0,
        throughput_s=5.0,
        e2e_count=2000,
    )
    assert parse_args(["--suite", "latency", "--e2e-count", "300"], env={}).e2e_count == 300


def test_suite_environment_and_flags():
    env = {"SCHEDULER_URL": "sched:9000", "NUM_TASKS": "300", "DELAY_SECONDS": "2", "CONCURRENCY": "16",
           "WORKER_COUNT": "5"}
    config = parse_args(["-s", "latency"], env=env)
    assert isinstance(config, SuiteConfig)
    assert (config.url, config.count, config.delay_s, config.concurrency, config.workers) == (
        "http://sched:9000", 300, 2.0, 16, 5)
    config = parse_args(["-s", "scaling", "-w", "2", "-n", "7", "--rate", "50", "--duration", "10", "-i", "5",
                         "-c", "true", "--reference-s", "1", "--throughput-s", "2"], env=env)
    assert (config.workers, config.count, config.rate, config.duration_s) == (2, 7, 50.0, 10.0)
    assert (config.interval_ms, config.command, config.reference_s, config.throughput_s) == (5.0, "true", 1.0, 2.0)


def test_worker_count_does_not_change_the_single_run():
    assert isinstance(parse_args([], env={"WORKER_COUNT": "5"}), BenchConfig)


@pytest.mark.parametrize(
    ("text", "suites"),
    [
        ("all", ("throughput", "latency", "sustained", "scaling")),
        ("scaling,latency", ("latency", "scaling")),  # canonical order
        ("all,scale-rows", ("throughput", "latency", "sustained", "scaling", "scale-rows")),
        ("scale-rows", ("scale-rows",)),
        ("latency, latency", ("latency",)),
    ],
)
def test_suite_names(text, suites):
    assert parse_args(["--suite", text], env={}).suites == suites


@pytest.mark.parametrize(
    "argv",
    [
        ["--suite", "speed"],
        ["--suite", ","],
        ["--workers", "2"],  # suite-only flags without --suite
        ["--rate", "10"],
        ["--duration", "5"],
        ["--reference-s", "1"],
        ["-s", "all", "-w", "0"],
        ["-s", "all", "--rate", "0"],
    ],
)
def test_suite_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env={}, prog="benchmark.sh")
    assert exc.value.code == 2
    assert "benchmark.sh: error:" in capsys.readouterr().err


def test_malformed_worker_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["-s", "scaling"], env={"WORKER_COUNT": "three"})
    assert "--workers: $WORKER_COUNT" in capsys.readouterr().err


def test_suite_summary_leaves_the_token_out():
    summary = parse_args(["-s", "latency"], env={"DISTRACK_API_TOKEN": "s3cret"}).summary()
    assert "s3cret" not in json.dumps(summary)
    assert summary["suites"] == ["latency"]


def test_token_comes_from_the_environment_and_is_not_shown():
    config = parse_args([], env={"DISTRACK_API_TOKEN": "s3cret"})
    assert config.token == "s3cret"
    assert "s3cret" not in repr(config)
    assert parse_args([], env={"DISTRACK_API_TOKEN": ""}).token is None


def test_token_comes_from_a_file_too(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert parse_args([], env={"DISTRACK_API_TOKEN_FILE": str(token_file)}).token == "s3cret"
    assert parse_args(["-s", "latency"], env={"DISTRACK_API_TOKEN_FILE": str(token_file)}).token == "s3cret"


@pytest.mark.parametrize("env", [{"DISTRACK_API_TOKEN": "a", "DISTRACK_API_TOKEN_FILE": "/x"},
                                 {"DISTRACK_API_TOKEN_FILE": "/nonexistent/token"}])
def test_an_unusable_token_setting_is_a_usage_error(env, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([], env=env)
    assert info.value.code == 2
    assert "DISTRACK_API_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["-n", "0"],
        ["-n", "1.5"],
        ["-n", "many"],
        ["-d", "-1"],
        ["-p", "0"],
        ["-t", "0"],
        ["-t", "nan"],
        ["-i", "-5"],
        ["--concurrency", "0"],
        ["-c", "   "],
        ["-u", "ftp://host"],
        ["-u", "http://host:port"],
        ["--no-such-flag"],
        ["extra"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env={}, prog="benchmark.sh")
    assert exc.value.code == 2
    assert "benchmark.sh: error:" in capsys.readouterr().err


def test_malformed_environment_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([], env={"NUM_TASKS": "lots"})
    assert exc.value.code == 2
    assert "-n/--count" in capsys.readouterr().err


def test_help_exits_0_and_shows_the_seed_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["-h"], env={}, prog="benchmark.sh")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: benchmark.sh")
    for flag in ("-u URL", "-n COUNT", "-d SEC", "-p SEC", "-t SEC", "-c CMD", "--json", "--concurrency"):
        assert flag in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://localhost:8081", "http://localhost:8081"),
        ("http://localhost:8081/", "http://localhost:8081"),
        ("localhost:8081", "http://localhost:8081"),
        ("https://example.com/distrack/", "https://example.com/distrack"),
        ("http://[::1]:8081", "http://[::1]:8081"),
    ],
)
def test_normalize_url(text, expected):
    assert normalize_url(text) == expected


@pytest.mark.parametrize("text", ["ftp://host", "http://", "http://host:x", "http://host/?a=1"])
def test_normalize_url_rejects(text):
    with pytest.raises(ValueError):
        normalize_url(text)


# --- statistics ----------------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100: the p-th percentile is p itself
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1


def test_percentile_picks_an_actual_value_without_interpolation():
    values = [40.0, 10.0, 30.0, 20.0]  # order does not matter
    assert percentile(values, 50) == 20.0  # rank ceil(0.5 * 4) = 2
    assert percentile(values, 51) == 30.0  # rank ceil(2.04) = 3
    assert percentile(values, 95) == 40.0
    assert percentile(values, 25) == 10.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_is_not_pushed_up_by_float_noise():
    # 4.4 * 750 / 100 is 33.00000000000001 in floating point; the exact rank is 33, not 34.
    assert percentile(list(range(1, 751)), 4.4) == 33
    assert percentile(list(range(1, 1001)), 99.9) == 999
    assert percentile(list(range(1, 21)), 95) == 19


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_summarize():
    stats = summarize([0.010, 0.030, 0.020, 0.040])
    assert stats is not None
    assert stats.count == 4
    assert (stats.min_s, stats.max_s) == (0.010, 0.040)
    assert stats.avg_s == pytest.approx(0.025)
    assert (stats.p50_s, stats.p95_s, stats.p99_s) == (0.020, 0.040, 0.040)
    assert summarize([]) is None


def test_parse_timestamp():
    moment = bench.parse_timestamp("2026-11-23T04:11:54.123456Z")
    assert moment.utcoffset().total_seconds() == 0
    assert moment.microsecond == 123456
    later = bench.parse_timestamp("2026-11-23T05:11:54.123456+01:00")
    assert later == moment
    assert bench.parse_timestamp("2026-11-23T04:11:54").utcoffset().total_seconds() == 0


# --- results -------------------------------------------------------------------------------------

SCHEDULED = "2026-11-23T04:11:54.000000Z"


def done(task_id, *, picked_ms, started_ms, finished_ms, status="completed", scheduled=SCHEDULED):
    def at(ms):
        return f"2026-11-23T04:11:54.{ms * 1000:06d}Z"

    doc = {
        "task_id": task_id,
        "status": status,
        "scheduled_at": scheduled,
        "picked_at": at(picked_ms),
        "started_at": at(started_ms),
    }
    doc["completed_at" if status == "completed" else "failed_at"] = at(finished_ms)
    return doc


def sample_docs():
    return [
        done("a", picked_ms=1, started_ms=2, finished_ms=10),
        done("b", picked_ms=2, started_ms=4, finished_ms=20),
        done("c", picked_ms=3, started_ms=6, finished_ms=30, status="failed"),
        {"task_id": "d", "status": "running", "scheduled_at": SCHEDULED, "picked_at": "2026-11-23T04:11:54.004Z",
         "started_at": "2026-11-23T04:11:54.008Z"},
        {"task_id": "e", "status": "queued", "scheduled_at": SCHEDULED},
        {"task_id": "f", "status": "cancelled", "scheduled_at": SCHEDULED},
    ]


def test_build_result_counts():
    result = build_result(7, sample_docs(), submit_duration_s=0.5, total_duration_s=2.0, submit_503_retries=3)
    assert (result.requested, result.submitted, result.not_submitted) == (7, 6, 1)
    assert (result.completed, result.failed, result.cancelled, result.timed_out) == (2, 1, 1, 2)
    assert result.submit_503_retries == 3
    assert result.throughput_per_s == pytest.approx(1.0)  # 2 completed in 2 s
    assert result.exit_code == 1


def test_build_result_latencies_come_from_server_timestamps():
    result = build_result(6, sample_docs(), submit_duration_s=0.5, total_duration_s=2.0)
    # End-to-end: scheduled_at -> completed_at or failed_at, finished tasks only.
    assert result.end_to_end is not None
    assert result.end_to_end.count == 3
    assert (result.end_to_end.min_s, result.end_to_end.max_s) == pytest.approx((0.010, 0.030))
    # Pickup: scheduled_at -> started_at, wherever a task has started (the running one too).
    assert result.pickup is not None
    assert result.pickup.count == 4
    assert (result.pickup.min_s, result.pickup.max_s) == pytest.approx((0.002, 0.008))
    assert result.pickup.avg_s == pytest.approx(0.005)
    assert result.dispatch is not None
    assert result.dispatch.max_s == pytest.approx(0.004)
    assert result.server_span_s == pytest.approx(0.030)
    assert result.early_starts == 0


def test_all_completed_exits_0():
    docs = [done(str(i), picked_ms=1, started_ms=2, finished_ms=3) for i in range(5)]
    result = build_result(5, docs, submit_duration_s=0.1, total_duration_s=0.5)
    assert (result.completed, result.timed_out, result.exit_code) == (5, 0, 0)


def test_nothing_finished():
    docs = [{"task_id": "a", "status": "queued", "scheduled_at": SCHEDULED}]
    result = build_result(1, docs, submit_duration_s=0.1, total_duration_s=0.0)
    assert (result.timed_out, result.exit_code, result.throughput_per_s) == (1, 1, 0.0)
    assert result.end_to_end is None and result.pickup is None and result.server_span_s is None


def test_a_start_before_scheduled_at_is_flagged():
    early = done("a", picked_ms=1, started_ms=2, finished_ms=3, scheduled="2026-11-23T04:11:54.500000Z")
    result = build_result(1, [early], submit_duration_s=0.1, total_duration_s=0.5)
    assert result.early_starts == 1
    assert "WARNING: 1 tasks started before their scheduled_at" in format_report(result)


def test_malformed_timestamps_are_skipped_not_fatal():
    doc = done("a", picked_ms=1, started_ms=2, finished_ms=3)
    doc["started_at"] = "yesterday"
    result = build_result(1, [doc], submit_duration_s=0.1, total_duration_s=0.5)
    assert result.pickup is None
    assert result.end_to_end is not None


# --- output --------------------------------------------------------------------------------------


def test_format_report_has_the_seed_figures():
    result = build_result(
        6, sample_docs(), submit_round_trips_s=[0.001, 0.003], submit_duration_s=0.41, total_duration_s=1.234
    )
    report = format_report(result)
    lines = report.splitlines()
    assert lines[:4] == ["Submitted:        6", "Completed:        2", "Failed:           1", "Cancelled:        1"]
    assert "Timed out:        2" in lines
    assert "Submit duration:  0.41 s" in lines
    assert "Total duration:   1.23 s" in lines
    assert "Throughput:       1.6 tasks/s" in lines
    assert (
        "Latency (end-to-end, scheduled_at -> completed_at/failed_at): "
        "min 10.0 ms, avg 20.0 ms, p95 30.0 ms, max 30.0 ms"
    ) in lines
    assert (
        "Pickup latency (scheduled_at -> started_at): "
        "min 2.0 ms, avg 5.0 ms, p50 4.0 ms, p95 8.0 ms, p99 8.0 ms, max 8.0 ms"
    ) in lines
    assert "Retries" not in report  # only shown when there were some


def test_format_report_mentions_unsubmitted_tasks_and_retries():
    result = build_result(10, sample_docs(), submit_duration_s=1, total_duration_s=2, submit_503_retries=4,
                          poll_errors=2)
    report = format_report(result)
    assert "Submitted:        6 of 10 (4 not submitted)" in report
    assert "Retries:          4 submissions retried after 503, 2 status polls failed" in report


def test_format_latency_without_values():
    assert format_latency(None) == "n/a"


def test_json_has_every_figure():
    result = build_result(6, sample_docs(), submit_round_trips_s=[0.002], submit_duration_s=0.5, total_duration_s=2)
    doc = json.loads(json.dumps(result.to_dict()))
    for key in ("requested", "submitted", "not_submitted", "completed", "failed", "cancelled", "timed_out",
                "submit_503_retries", "poll_errors", "submit_duration_s", "total_duration_s", "throughput_per_s",
                "server_span_s", "early_starts"):
        assert key in doc
    assert doc["timed_out"] == 2
    assert doc["latency_ms"]["end_to_end"] == {
        "count": 3, "min_ms": 10.0, "avg_ms": 20.0, "p50_ms": 20.0, "p95_ms": 30.0, "p99_ms": 30.0, "max_ms": 30.0
    }
    assert doc["latency_ms"]["pickup"]["p99_ms"] == 8.0
    assert doc["latency_ms"]["submit"]["max_ms"] == 2.0


def test_json_output_leaves_the_token_out():
    summary = parse_args(["--json"], env={"DISTRACK_API_TOKEN": "s3cret"}).summary()
    assert "token" not in summary and "s3cret" not in json.dumps(summary)
    assert summary["count"] == 50


# --- submission retries and the HTTP client (fake connections, no sockets) -----------------------


class FakeScheduler:
    """Answers schedule() from a script of results: a dict to return or an exception to raise."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0

    def schedule(self, command, delay_s):
        self.calls += 1
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def unavailable():
    return ApiError(503, "Database unavailable", "retry later")


def test_submit_retries_503_with_backoff():
    sleeps = []
    client = FakeScheduler(unavailable(), unavailable(), {"task_id": "t1"})
    doc, retries = submit_with_retry(client, "echo", 0, backoff_s=(0.1, 0.2, 0.4), sleep=sleeps.append)
    assert doc == {"task_id": "t1"}
    assert retries == 2
    assert sleeps == [0.1, 0.2]


def test_submit_gives_up_after_the_last_backoff():
    sleeps = []
    client = FakeScheduler(*[unavailable() for _ in range(3)])
    with pytest.raises(ApiError) as exc:
        submit_with_retry(client, "echo", 0, backoff_s=(0.1, 0.2), sleep=sleeps.append)
    assert exc.value.status == 503
    assert client.calls == 3 and sleeps == [0.1, 0.2]


def test_submit_does_not_retry_other_errors():
    client = FakeScheduler(ApiError(400, "Invalid input", "command is empty"))
    with pytest.raises(ApiError):
        submit_with_retry(client, "", 0, backoff_s=(0.1,), sleep=lambda s: None)
    assert client.calls == 1


class FakeResponse:
    def __init__(self, status, body):
        self.status = status
        self._body = body

    def read(self):
        return self._body


class FakeConnection:
    """Stands in for http.client.HTTPConnection: records requests, plays back responses or errors."""

    def __init__(self, *outcomes, open_socket=True):
        self.outcomes = list(outcomes)
        self.requests = []
        self.sock = object() if open_socket else None
        self.closed = 0

    def request(self, method, url, body=None, headers=None):
        self.requests.append((method, url, body, headers))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        self._response = outcome

    def getresponse(self):
        return self._response

    def close(self):
        self.closed += 1
        self.sock = None


def client_with(conn, url="http://localhost:8081", token=None):
    client = SchedulerClient(url, token=token)  # makes no connection until a request
    client._conn = conn
    return client


def test_client_schedule_request_and_token():
    conn = FakeConnection(FakeResponse(200, b'{"task_id": "t1", "status": "queued"}'))
    client = client_with(conn, url="http://host:1/prefix", token="s3cret")
    assert client.schedule("echo hi", 1.5) == {"task_id": "t1", "status": "queued"}
    method, url, body, headers = conn.requests[0]
    assert (method, url) == ("POST", "/prefix/schedule")
    assert json.loads(body) == {"command": "echo hi", "delay_seconds": 1.5}
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"] == "application/json"


def test_client_status_request_without_token():
    conn = FakeConnection(FakeResponse(200, b'{"task_id": "t1", "status": "running"}'))
    assert client_with(conn).status("t1")["status"] == "running"
    method, url, body, headers = conn.requests[0]
    assert (method, url, body) == ("GET", "/status?task_id=t1", None)
    assert "Authorization" not in headers


def test_client_error_status_raises_api_error_with_the_servers_words():
    conn = FakeConnection(FakeResponse(400, b'{"title": "Invalid input", "description": "command is empty"}'))
    with pytest.raises(ApiError) as exc:
        client_with(conn).schedule("", 0)
    assert exc.value.status == 400
    assert str(exc.value) == "HTTP 400: Invalid input: command is empty"


def test_client_error_without_json_body():
    conn = FakeConnection(FakeResponse(502, b"<html>Bad gateway</html>"))
    with pytest.raises(ApiError) as exc:
        client_with(conn).status("t1")
    assert str(exc.value) == "HTTP 502"


def test_client_resends_once_when_a_kept_alive_connection_was_closed_by_the_server():
    conn = FakeConnection(http.client.RemoteDisconnected("closed"), FakeResponse(200, b'{"task_id": "t1"}'))
    assert client_with(conn).schedule("echo", 0) == {"task_id": "t1"}
    assert len(conn.requests) == 2 and conn.closed == 1


def test_client_does_not_resend_on_a_fresh_connection():
    conn = FakeConnection(ConnectionResetError("reset"), FakeResponse(200, b"{}"), open_socket=False)
    with pytest.raises(TransportError):
        client_with(conn).schedule("echo", 0)
    assert len(conn.requests) == 1


def test_client_maps_refused_connections_to_transport_error():
    conn = FakeConnection(ConnectionRefusedError(111, "Connection refused"), open_socket=False)
    with pytest.raises(TransportError, match="Connection refused"):
        client_with(conn).status("t1")


def test_progress_is_silent_when_not_a_terminal():
    stream = io.StringIO()
    progress = bench.Progress(stream)
    progress.update("submitted 1/2", force=True)
    progress.clear()
    assert stream.getvalue() == ""


def test_the_single_run_needs_only_the_standard_library():
    """scripts/benchmark.sh may run it with a bare python3: reading the token must not import grpc."""
    import subprocess
    import sys

    code = ("import sys, distrack.bench.cli as c; c.parse_args([], env={'DISTRACK_API_TOKEN': 'x'}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'psycopg', 'falcon', 'gunicorn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
