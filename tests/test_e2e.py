"""The whole system as real processes over real sockets: scheduler, coordinator, workers, PostgreSQL."""

import http.client
import json
import os
import signal
from collections import Counter
from datetime import datetime

import psycopg
import pytest
from helpers import Api, wait_for


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def stack(cluster):
    """Coordinator, two workers and the scheduler."""
    cluster.coordinator()
    cluster.worker()
    cluster.worker()
    cluster.scheduler()
    return cluster


def test_a_task_completes_and_its_output_file_holds_stdout_and_stderr(stack):
    api = Api(stack.url)
    task = api.schedule("echo to-stdout; echo to-stderr >&2; printf 'no newline'")
    doc = api.wait_final(task["task_id"])
    assert doc["status"] == "completed", doc
    assert doc["exit_code"] == 0 and doc["attempts"] == 1 and doc["error"] is None
    assert ts(doc["scheduled_at"]) <= ts(doc["picked_at"]) <= ts(doc["started_at"]) <= ts(doc["completed_at"])
    assert "failed_at" not in doc
    out = stack.output_dir / f"{doc['worker_id']}_{doc['task_id']}.txt"
    assert out.read_text() == "to-stdout\nto-stderr\nno newline"


def test_a_failing_command_gets_failed_at_and_its_exit_code(stack):
    api = Api(stack.url)
    doc = api.wait_final(api.schedule("echo oops >&2; exit 7")["task_id"])
    assert doc["status"] == "failed", doc
    assert doc["exit_code"] == 7 and "failed_at" in doc and "completed_at" not in doc
    out = stack.output_dir / f"{doc['worker_id']}_{doc['task_id']}.txt"
    assert out.read_text() == "oops\n"


def test_a_delayed_task_never_starts_before_scheduled_at(stack):
    api = Api(stack.url)
    tasks = [api.schedule("date +%s.%N", delay_seconds=d) for d in (0.3, 0.6, 1.0, 1.0, 1.5)]
    for task in tasks:
        doc = api.wait_final(task["task_id"])
        assert doc["status"] == "completed"
        assert ts(doc["started_at"]) >= ts(doc["scheduled_at"])
        # The command itself ran after scheduled_at too (same machine, same clock).
        out = stack.output_dir / f"{doc['worker_id']}_{doc['task_id']}.txt"
        assert float(out.read_text()) >= ts(doc["scheduled_at"]).timestamp()


def test_tasks_spread_round_robin_over_the_workers(cluster):
    cluster.coordinator()
    workers = [cluster.worker(slots=10) for _ in range(3)]
    cluster.scheduler()
    api = Api(cluster.url)
    # All three workers must have joined before the tasks become due.
    wait_for(lambda: cluster.services[0].log().count("joined at") == 3, what="three workers to join")
    tasks = [api.schedule("true", delay_seconds=0) for _ in range(12)]
    docs = [api.wait_final(t["task_id"]) for t in tasks]
    assert all(d["status"] == "completed" for d in docs)
    per_worker = Counter(d["worker_id"] for d in docs)
    assert len(per_worker) == len(workers)
    assert sorted(per_worker.values()) == [4, 4, 4], per_worker


def test_a_task_scheduled_while_no_worker_is_up_runs_once_one_joins(cluster):
    cluster.coordinator()
    cluster.scheduler()
    api = Api(cluster.url)
    task = api.schedule("echo late")
    # Deliberately a fixed second: nothing may happen in it (there is no event to wait for).
    with pytest.raises(pytest.fail.Exception):
        api.wait_final(task["task_id"], timeout=1.0)
    assert api.status(task["task_id"])["status"] == "queued"
    cluster.worker()
    doc = api.wait_final(task["task_id"])
    assert doc["status"] == "completed" and doc["attempts"] == 1


def test_a_task_inserted_by_hand_with_sql_is_picked_up(stack):
    with psycopg.connect(stack.db_url, autocommit=True) as conn:
        (task_id,) = conn.execute(
            "INSERT INTO tasks (id, command, scheduled_at) VALUES (gen_random_uuid(), 'echo sql', now()) RETURNING id"
        ).fetchone()
    doc = Api(stack.url).wait_final(str(task_id))
    assert doc["status"] == "completed"


def test_more_tasks_than_slots_all_complete_and_no_worker_exceeds_its_slots(cluster):
    coordinator = cluster.coordinator()
    cluster.worker(slots=2)
    cluster.worker(slots=2)
    cluster.scheduler()
    api = Api(cluster.url)
    # Each command writes when it began and ended, on the machine's clock: the database's completed_at
    # is when the end was recorded, after the worker may already have started a prefetched task.
    command = 'echo "$(date +%s.%N)"; sleep 0.2; echo "$(date +%s.%N)"'
    tasks = [api.schedule(command) for _ in range(12)]
    docs = [api.wait_final(t["task_id"], timeout=30) for t in tasks]
    assert all(d["status"] == "completed" for d in docs)
    # At no moment did one worker run more than its 2 slots: check the commands' own [began, ended].
    for worker in {d["worker_id"] for d in docs}:
        spans = sorted(tuple(float(line) for line in (cluster.output_dir / f"{worker}_{d['task_id']}.txt")
                             .read_text().split()) for d in docs if d["worker_id"] == worker)
        for i, (start, _) in enumerate(spans):
            overlapping = sum(1 for s, e in spans[: i + 1] if s <= start < e)
            assert overlapping <= 2, (worker, spans)
    # The coordinator's own count of free room was right: no worker had to refuse a task.
    assert "refused" not in coordinator.log()


def test_a_lost_worker_is_removed_and_its_task_fails_with_a_clear_error(cluster):
    cluster.coordinator()
    worker = cluster.worker()
    cluster.scheduler()
    api = Api(cluster.url)
    task = api.schedule("sleep 5")
    wait_for(lambda: api.status(task["task_id"])["status"] == "running", what="the task to start")
    worker.signal(signal.SIGKILL)
    doc = api.wait_final(task["task_id"], timeout=15)
    assert doc["status"] == "failed"
    assert "was lost" in doc["error"]


def test_the_api_over_http_rejects_bad_input_with_json(stack):
    api = Api(stack.url)
    status, doc = api.request("POST", "/schedule", "{broken")
    assert status == 400 and "not valid JSON" in doc["description"]
    status, doc = api.request("GET", "/status?task_id=123")
    assert status == 400 and "not a UUID" in doc["description"]
    status, doc = api.request("GET", "/status?task_id=00000000-0000-0000-0000-000000000000")
    assert status == 404
    status, doc = api.request("PUT", "/schedule", "{}")
    assert status == 405 and doc["title"]
    status, doc = api.request("POST", "/schedule", '{"command": "' + "x" * (1024 * 1024) + '"}')
    assert status == 413 and "limit" in doc["description"]


def test_a_chunked_body_over_the_limit_is_413(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack.scheduler_port, timeout=10)
    chunk = b"x" * 65536
    body = iter([b'{"command": "'] + [chunk] * 20 + [b'"}'])  # 1.25 MiB, no Content-Length
    conn.request("POST", "/schedule", body=body, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    assert "over" in json.loads(resp.read())["description"]
    conn.close()
    # And a small chunked body is read whole.
    conn = http.client.HTTPConnection("127.0.0.1", stack.scheduler_port, timeout=10)
    conn.request("POST", "/schedule", body=iter([b'{"command": ', b'"echo chunked"}']), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    conn.close()


def test_services_without_a_database_say_so_and_exit_non_zero(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("POSTGRES_")}
    for service in ("scheduler", "coordinator", "migrate"):
        out = subprocess.run(
            [sys.executable, "-m", "distrack", service],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
        assert out.returncode != 0
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "no database configured" in lines[0], out.stderr


def test_notify_wakes_the_coordinator_long_before_its_poll(cluster):
    # A 60 s poll: only the NOTIFY from the insert can get the task running within seconds.
    cluster.coordinator("--poll_interval_s=60")
    cluster.worker()
    cluster.scheduler()
    api = Api(cluster.url)
    wait_for(lambda: "joined at" in cluster.services[0].log(), what="the worker to join")
    for _ in range(3):
        doc = api.wait_final(api.schedule("true")["task_id"], timeout=5)
        assert doc["status"] == "completed"
        assert (ts(doc["started_at"]) - ts(doc["scheduled_at"])).total_seconds() < 1


def test_a_dispatch_refused_by_a_dead_worker_goes_to_the_next_without_costing_an_attempt(cluster):
    # Many allowed misses: the dead worker stays registered, so dispatches to it are refused.
    coordinator = cluster.coordinator("--heartbeat_misses=100")
    dead = cluster.worker()
    cluster.worker()
    cluster.scheduler()
    wait_for(lambda: coordinator.log().count("joined at") == 2, what="two workers to join")
    dead.signal(signal.SIGKILL)
    dead.proc.wait()
    api = Api(cluster.url)
    docs = [api.wait_final(api.schedule("true")["task_id"]) for _ in range(6)]
    assert all(d["status"] == "completed" and d["attempts"] == 1 for d in docs), docs
    assert "refused" in coordinator.log()
