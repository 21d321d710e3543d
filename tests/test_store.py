"""TaskStore against a real PostgreSQL: claims, reports, retries and rescue."""

import threading
import uuid

import psycopg
import pytest

from distrack.db.pool import make_pool
from distrack.db.store import TaskStore
from distrack.errors import DatabaseUnavailable


def status_of(store: TaskStore, task_id) -> dict:
    return store.get_task(task_id)


def test_insert_and_get(store):
    row = store.insert_task("echo hi", 0, max_attempts=2, timeout_seconds=5)
    got = store.get_task(row["id"])
    assert (got["command"], got["status"], got["attempts"], got["max_attempts"]) == ("echo hi", "queued", 0, 2)
    assert got["timeout_seconds"] == 5
    assert got["picked_at"] is None and got["started_at"] is None
    assert store.get_task(uuid.uuid4()) is None


def test_claim_takes_due_tasks_in_order_up_to_the_limit(store):
    ids = [store.insert_task(f"echo {i}", 0)["id"] for i in range(5)]
    later = store.insert_task("echo later", 3600)["id"]
    claimed = store.claim_due(3)
    assert [t.id for t in claimed] == ids[:3]
    assert all(t.attempt == 1 for t in claimed)
    assert [t.id for t in store.claim_due(10)] == ids[3:]
    assert store.claim_due(10) == []
    assert store.get_task(later)["status"] == "queued"
    row = store.get_task(ids[0])
    assert row["status"] == "picked" and row["picked_at"] >= row["scheduled_at"]
    assert 3590 < store.seconds_until_next_due() <= 3600


def test_concurrent_claims_never_share_a_task(db_url):
    pool = make_pool(db_url, max_size=8)
    pool.wait(10)
    store = TaskStore(pool)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (id, command, scheduled_at) "
            "SELECT gen_random_uuid(), 'echo', now() FROM generate_series(1, 2000)"
        )
    claimed: list[list] = [[] for _ in range(6)]

    def claimer(i: int) -> None:
        while batch := store.claim_due(7):
            claimed[i].extend(t.id for t in batch)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    every = [task_id for part in claimed for task_id in part]
    assert len(every) == 2000
    assert len(set(every)) == 2000


def test_lifecycle_reports_and_stale_reports_are_refused(store):
    tid = store.insert_task("echo", 0)["id"]
    (task,) = store.claim_due(1)
    assert store.mark_running(tid, task.attempt + 1, "w1") is False  # wrong attempt
    assert store.mark_running(tid, task.attempt, "w1") is True
    assert store.mark_running(tid, task.attempt, "w1") is False  # not picked any more
    assert store.mark_completed(tid, task.attempt, "w1", 0) is True
    assert store.mark_failed(tid, task.attempt, "w1", 1, "late", 1.0) is None  # already final
    row = store.get_task(tid)
    assert (row["status"], row["exit_code"], row["worker_id"], row["error"]) == ("completed", 0, "w1", None)
    assert row["scheduled_at"] <= row["picked_at"] <= row["started_at"] <= row["completed_at"]
    assert row["failed_at"] is None


def test_failure_of_the_last_attempt_is_final(store):
    tid = store.insert_task("exit 3", 0)["id"]
    (task,) = store.claim_due(1)
    store.mark_running(tid, task.attempt, "w1")
    assert store.mark_failed(tid, task.attempt, "w1", 3, None, 1.0) == "failed"
    row = store.get_task(tid)
    assert (row["status"], row["exit_code"], row["attempts"]) == ("failed", 3, 1)
    assert row["failed_at"] >= row["started_at"] and row["completed_at"] is None


def test_failure_with_attempts_left_requeues_later(store):
    tid = store.insert_task("exit 1", 0, max_attempts=2)["id"]
    (task,) = store.claim_due(1)
    store.mark_running(tid, task.attempt, "w1")
    assert store.mark_failed(tid, task.attempt, "w1", 1, "boom", 30.0) == "queued"
    row = store.get_task(tid)
    assert (row["status"], row["attempts"], row["error"], row["failed_at"]) == ("queued", 1, "boom", None)
    assert store.claim_due(1) == []  # backed off
    assert 20 < store.seconds_until_next_due() <= 45  # 30 s with jitter (0.75 to 1.25)


def test_unclaim_returns_the_task_without_costing_an_attempt(store):
    tid = store.insert_task("echo", 0)["id"]
    (task,) = store.claim_due(1)
    assert store.unclaim(tid, task.attempt) is True
    assert store.unclaim(tid, task.attempt) is False
    row = store.get_task(tid)
    assert (row["status"], row["attempts"], row["picked_at"]) == ("queued", 0, None)


def test_lost_worker_tasks_are_requeued_or_failed(store):
    retry = store.insert_task("sleep 100", 0, max_attempts=2)["id"]
    last = store.insert_task("sleep 100", 0)["id"]
    other = store.insert_task("sleep 100", 0)["id"]
    tasks = {t.id: t for t in store.claim_due(3)}
    store.mark_running(retry, tasks[retry].attempt, "dead")
    store.mark_running(last, tasks[last].attempt, "dead")
    store.mark_running(other, tasks[other].attempt, "alive")
    rows = store.release_worker_tasks("dead", 9.5)
    assert {r["id"]: r["status"] for r in rows} == {retry: "queued", last: "failed"}
    failed = store.get_task(last)
    assert "worker dead was lost" in failed["error"] and failed["failed_at"] is not None
    assert store.get_task(other)["status"] == "running"


def test_unacknowledged_dispatches_go_back(store, sql_conn):
    retry = store.insert_task("echo", 0, max_attempts=2)["id"]
    last = store.insert_task("echo", 0)["id"]
    store.claim_due(2)
    assert store.requeue_unacknowledged(60) == []
    sql_conn.execute("UPDATE tasks SET picked_at = now() - interval '2 minutes'")
    rows = store.requeue_unacknowledged(60)
    assert {r["id"]: r["status"] for r in rows} == {retry: "queued", last: "failed"}
    assert "not acknowledged" in store.get_task(last)["error"]


def test_unreachable_database_raises_database_unavailable():
    # Nothing listens on port 1; the pool gives up within its short timeout.
    pool = make_pool("postgresql://nobody@127.0.0.1:1/none", max_size=1)
    try:
        with pytest.raises(DatabaseUnavailable):
            TaskStore(pool).insert_task("echo", 0)
    finally:
        pool.close()
