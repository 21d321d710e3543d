"""Retries, timeouts, cancellation and graceful shutdown, with real processes."""

import signal
from datetime import datetime

import pytest
from helpers import Api, wait_for


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def stack(cluster):
    cluster.coordinator("--retry_delay_s=0.2")
    cluster.worker()
    cluster.worker()
    cluster.scheduler()
    cluster.wait_joined(2)
    return cluster


def test_a_failing_task_is_retried_with_backoff_until_it_succeeds(stack, tmp_path):
    counter = tmp_path / "tries"
    # Fails on its first two runs, succeeds on the third.
    command = f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}; [ $n -ge 2 ]"
    api = Api(stack.url)
    doc = api.wait_final(api.schedule(command, max_attempts=3)["task_id"], timeout=30)
    assert doc["status"] == "completed" and doc["attempts"] == 3 and doc["exit_code"] == 0
    assert counter.read_text() == "3\n"
    assert doc["error"] is None


def test_retries_stop_at_max_attempts_and_the_last_error_is_kept(stack):
    api = Api(stack.url)
    task = api.schedule("echo try $DISTRACK_ATTEMPT; exit 4", max_attempts=2)
    seen_retry = wait_for(lambda: (d := api.status(task["task_id"]))["status"] == "queued" and d["attempts"] == 1
                          and d, what="the first failure to be queued for a retry")
    assert seen_retry["error"] == "exited with code 4" and seen_retry["exit_code"] == 4
    # The retry waits for its backoff (0.2 s x2^0 with jitter): scheduled_at moved on.
    assert ts(seen_retry["scheduled_at"]) > ts(task["scheduled_at"])
    doc = api.wait_final(task["task_id"], timeout=30)
    assert (doc["status"], doc["attempts"], doc["exit_code"]) == ("failed", 2, 4)
    out = stack.output_dir / f"{doc['worker_id']}_{doc['task_id']}.txt"
    assert out.read_text() == "try 2\n"


def test_a_task_timeout_kills_it_and_says_so(stack, tmp_path):
    marker = tmp_path / "survived"
    api = Api(stack.url)
    task = api.schedule(f"(sleep 2; touch {marker}) & sleep 30", timeout_seconds=0.5, max_attempts=2)
    doc = api.wait_final(task["task_id"], timeout=30)
    assert doc["status"] == "failed" and doc["attempts"] == 2
    assert doc["error"] == "timed out after 0.5 s"
    # Measured from the command's start, not from any report.
    assert (ts(doc["failed_at"]) - ts(doc["started_at"])).total_seconds() < 2.5
    with pytest.raises(pytest.fail.Exception):
        wait_for(marker.exists, timeout=2.5)  # the whole process group died


def test_the_worker_default_timeout_applies_to_tasks_without_one(cluster):
    cluster.coordinator()
    cluster.worker("--task_timeout_s=0.3")
    cluster.scheduler()
    api = Api(cluster.url)
    doc = api.wait_final(api.schedule("sleep 20")["task_id"], timeout=15)
    assert doc["status"] == "failed" and doc["error"] == "timed out after 0.3 s"


def test_cancel_a_queued_task_and_it_never_runs(stack):
    api = Api(stack.url)
    task = api.schedule("echo never", delay_seconds=1)
    status, doc = api.request("POST", f"/tasks/{task['task_id']}/cancel")
    assert status == 200 and doc["status"] == "cancelled"
    # Past its scheduled_at, it is still cancelled and no worker ran it.
    wait_for(lambda: ts(api.status(task["task_id"])["scheduled_at"]).timestamp() < datetime.now().timestamp() - 0.5,
             what="the task's scheduled time to pass")
    assert api.status(task["task_id"])["status"] == "cancelled"
    assert not list(stack.output_dir.glob(f"*_{task['task_id']}.txt"))


def test_cancel_a_running_task_kills_its_process_group(stack, tmp_path):
    marker = tmp_path / "survived"
    api = Api(stack.url)
    task = api.schedule(f"(sleep 3; touch {marker}) & sleep 60", max_attempts=3)
    wait_for(lambda: api.status(task["task_id"])["status"] == "running", what="the task to start")
    status, doc = api.request("POST", f"/tasks/{task['task_id']}/cancel")
    assert status == 202 and "cancel_requested_at" in doc
    final = api.wait_final(task["task_id"], timeout=10)
    assert final["status"] == "cancelled" and final["attempts"] == 1 and final["error"] == "cancelled"
    assert "cancelled_at" in final
    status, again = api.request("POST", f"/tasks/{task['task_id']}/cancel")
    assert status == 200 and again["status"] == "cancelled"
    with pytest.raises(pytest.fail.Exception):
        wait_for(marker.exists, timeout=3.5)


def test_cancel_a_task_waiting_on_its_worker_for_a_slot_ends_it_cancelled_without_running(cluster, tmp_path):
    cluster.coordinator()
    cluster.worker("--prefetch=1", slots=1)
    cluster.scheduler()
    cluster.wait_joined(1)
    api = Api(cluster.url)
    first = api.schedule("sleep 5")["task_id"]
    wait_for(lambda: api.status(first)["status"] == "running", what="the first task to start")
    marker = tmp_path / "ran"
    waiting = api.schedule(f"touch {marker}")["task_id"]
    wait_for(lambda: api.status(waiting)["status"] == "picked", what="the second task taken, to wait for the slot")
    status, _ = api.request("POST", f"/tasks/{waiting}/cancel")
    assert status == 202
    final = api.wait_final(waiting, timeout=3)  # given back at once, and ended cancelled: no 30 s wait
    assert final["status"] == "cancelled" and final["attempts"] == 0 and "started_at" not in final
    assert api.status(first)["status"] == "running" and not marker.exists()


def test_cancel_a_finished_task_is_409(stack):
    api = Api(stack.url)
    task = api.schedule("true")
    api.wait_final(task["task_id"])
    status, doc = api.request("POST", f"/tasks/{task['task_id']}/cancel")
    assert status == 409 and doc["title"] == "Task already finished"


def test_a_worker_on_sigterm_finishes_its_task_and_leaves_the_registry(cluster):
    coordinator = cluster.coordinator()
    worker = cluster.worker()
    cluster.scheduler()
    api = Api(cluster.url)
    task = api.schedule("sleep 1; echo done")
    wait_for(lambda: api.status(task["task_id"])["status"] == "running", what="the task to start")
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0
    assert api.status(task["task_id"])["status"] == "completed"
    assert "left" in coordinator.log()


def test_a_worker_past_its_shutdown_grace_hands_the_task_back(cluster):
    cluster.coordinator("--retry_delay_s=0.1")
    leaving = cluster.worker("--shutdown_grace_s=0.5")
    cluster.scheduler()
    api = Api(cluster.url)
    task = api.schedule("sleep 4; echo finished", max_attempts=2)
    wait_for(lambda: api.status(task["task_id"])["status"] == "running", what="the task to start")
    leaving.signal(signal.SIGTERM)
    assert leaving.proc.wait(20) == 0
    doc = api.status(task["task_id"])
    assert doc["status"] == "queued" and "shut down" in doc["error"]
    cluster.worker()
    doc = api.wait_final(task["task_id"], timeout=20)
    assert doc["status"] == "completed" and doc["attempts"] == 2


def test_a_coordinator_on_sigterm_returns_claimed_tasks_it_had_not_dispatched(cluster):
    coordinator = cluster.coordinator(env_extra={"DISTRACK_FAULT_CLAIM_DELAY_S": "30"})
    cluster.worker()
    cluster.scheduler()
    cluster.wait_joined(1)
    api = Api(cluster.url)
    task = api.schedule("echo hello")
    wait_for(lambda: api.status(task["task_id"])["status"] == "picked", what="the claim")
    coordinator.signal(signal.SIGTERM)
    assert coordinator.proc.wait(20) == 0
    doc = api.status(task["task_id"])
    assert (doc["status"], doc["attempts"]) == ("queued", 0)
    cluster.coordinator(port=cluster.coordinator_port)
    assert api.wait_final(task["task_id"], timeout=20)["status"] == "completed"


def test_late_reports_of_a_rescued_attempt_are_refused(cluster):
    coordinator = cluster.coordinator("--retry_delay_s=0.1")
    stopped = cluster.worker()
    cluster.scheduler()
    cluster.wait_joined(1)
    api = Api(cluster.url)
    task = api.schedule("sleep 1.5; echo $DISTRACK_WORKER_ID", max_attempts=2)
    wait_for(lambda: api.status(task["task_id"])["status"] == "running", what="the task to start")
    stopped_id = cluster.worker_id(stopped)
    stopped.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: api.status(task["task_id"])["attempts"] == 1 and api.status(task["task_id"])["status"]
                 == "queued", timeout=10, what="the rescue")
        cluster.worker()
        doc = api.wait_final(task["task_id"], timeout=20)
    finally:
        stopped.signal(signal.SIGCONT)
    assert doc["status"] == "completed" and doc["attempts"] == 2 and doc["worker_id"] != stopped_id
    # The stopped worker's run ends and reports; the report is refused and changes nothing.
    wait_for(lambda: "refused" in coordinator.log(), timeout=15, what="the late report to be refused")
    assert api.status(task["task_id"]) == doc
