"""TaskStore against a real PostgreSQL: claims, fenced reports, retries, rescue, workers, cancel."""

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from helpers import wait_for
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from distrack.db.pool import make_pool
from distrack.db.queries import queries
from distrack.db.store import Attempt, EndedAttempt, TaskStore
from distrack.errors import DatabaseUnavailable, DataRejected
from distrack.tasks import TaskSpec


def claim_one(store: TaskStore, worker_id: str = "w1") -> Attempt:
    (task,) = store.claim_due([worker_id])
    assert task.worker_id == worker_id
    return Attempt(task.id, task.lease, task.worker_id)


def test_insert_and_get(store):
    row = store.insert_task("echo hi", 0, max_attempts=2, timeout_seconds=5)
    got = store.get_task(row["id"])
    assert (got["command"], got["status"], got["attempts"], got["max_attempts"]) == ("echo hi", "queued", 0, 2)
    assert got["timeout_seconds"] == 5
    assert got["picked_at"] is None and got["started_at"] is None
    assert store.get_task(uuid.uuid4()) is None


def test_a_batch_is_due_as_stored_whatever_the_sessions_time_zone(db_url):
    # insert_tasks computes each scheduled_at from the statement's now() instead of reading the rows
    # back. In a time zone with daylight saving, delays that cross a change (spring and autumn within
    # these 330 days) would be an hour off if that sum were taken on local time.
    pool = make_pool(make_conninfo(db_url, options="-c TimeZone=Europe/Berlin"), max_size=1)
    try:
        store = TaskStore(pool)
        specs = [TaskSpec("echo", delay_seconds=days * 86400) for days in range(0, 331, 15)]
        specs.append(TaskSpec("echo", delay_seconds=0.123456789))
        inserted = store.insert_tasks(specs)
        assert {at.utcoffset() for at in inserted.scheduled_ats} == {timedelta(0)}
        for task_id, at in zip(inserted.ids, inserted.scheduled_ats, strict=True):
            assert store.get_task(uuid.UUID(task_id))["scheduled_at"] == at
    finally:
        pool.close()


def test_claim_takes_due_tasks_in_order_one_per_reserved_worker(store):
    ids = [store.insert_task(f"echo {i}", 0)["id"] for i in range(5)]
    later = store.insert_task("echo later", 3600)["id"]
    claimed = store.claim_due(["a", "b", "a"])
    assert [t.id for t in claimed] == ids[:3]
    assert [t.worker_id for t in claimed] == ["a", "b", "a"]
    assert all(t.attempt == 1 and t.lease == 1 for t in claimed)
    assert [t.id for t in store.claim_due(["c"] * 10)] == ids[3:]
    assert store.claim_due(["c"]) == []
    assert store.claim_due([]) == []
    assert store.get_task(later)["status"] == "queued"
    row = store.get_task(ids[0])
    assert row["status"] == "picked" and row["worker_id"] == "a" and row["picked_at"] >= row["scheduled_at"]
    assert 3590 < store.seconds_until_next_due() <= 3600


def test_concurrent_claims_never_share_a_task(db_url, sql_conn):
    pool = make_pool(db_url, max_size=8)
    pool.wait(10)
    store = TaskStore(pool)
    sql_conn.execute("INSERT INTO tasks (id, command, scheduled_at) "
                     "SELECT gen_random_uuid(), 'echo', now() FROM generate_series(1, 2000)")
    claimed: list[list] = [[] for _ in range(6)]

    def claimer(i: int) -> None:
        while batch := store.claim_due([f"w{i}"] * 7):
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


def test_reports_are_fenced_by_lease_and_worker(store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim_one(store, "w1")
    assert store.get_task(tid)["attempts"] == 0  # claimed is not started
    assert store.mark_running(Attempt(tid, a.lease + 1, "w1")) is False  # wrong lease
    assert store.mark_running(Attempt(tid, a.lease, "w2")) is False  # wrong worker
    assert store.mark_running(a) is True
    assert store.mark_running(a) is True  # idempotent for its owner
    assert store.get_task(tid)["attempts"] == 1
    assert store.mark_completed(Attempt(tid, a.lease, "w2"), 0) is False
    assert store.mark_completed(a, 0) is True
    assert store.mark_running(a) is False  # finished
    assert store.end_attempts([EndedAttempt(a, "late")], 1.0) == {}  # already final
    row = store.get_task(tid)
    assert (row["status"], row["exit_code"], row["worker_id"], row["error"]) == ("completed", 0, "w1", None)
    assert row["scheduled_at"] <= row["picked_at"] <= row["started_at"] <= row["completed_at"]
    assert row["failed_at"] is None


def test_leases_are_never_reused(store):
    store.insert_task("echo", 0)
    first = claim_one(store, "w1")
    assert store.unclaim(first) is True
    second = claim_one(store, "w1")
    assert second.lease == first.lease + 1
    assert store.mark_running(first) is False  # the old dispatch is told to stop
    assert store.mark_running(second) is True


def test_failure_of_the_last_attempt_is_final(store):
    tid = store.insert_task("exit 3", 0)["id"]
    a = claim_one(store)
    store.mark_running(a)
    assert store.end_attempts([EndedAttempt(a, "exited with code 3", 3)], 1.0) == {tid: "failed"}
    row = store.get_task(tid)
    assert (row["status"], row["exit_code"], row["attempts"]) == ("failed", 3, 1)
    assert row["failed_at"] >= row["started_at"] and row["completed_at"] is None


def test_failure_with_attempts_left_is_retried_after_a_backoff(store):
    tid = store.insert_task("exit 1", 0, max_attempts=3)["id"]
    a = claim_one(store)
    store.mark_running(a)
    assert store.end_attempts([EndedAttempt(a, "boom", 1)], 30.0) == {tid: "queued"}
    row = store.get_task(tid)
    assert (row["status"], row["attempts"], row["error"], row["failed_at"], row["started_at"]) == (
        "queued", 1, "boom", None, None)
    assert store.claim_due(["w1"]) == []  # backed off
    assert 20 < store.seconds_until_next_due() <= 38  # 30 s with jitter (x0.75 to x1.25)


def test_the_retry_delay_doubles_and_is_capped(db_url, sql_conn):
    pool = make_pool(db_url, max_size=2)
    store = TaskStore(pool, max_retry_delay_s=100.0)
    try:
        tid = store.insert_task("exit 1", 0, max_attempts=100)["id"]
        # The 60th attempt: 1 s * 2^59 would overflow any timestamp; the cap holds it to 100 s.
        sql_conn.execute("UPDATE tasks SET attempts = 59 WHERE id = %s", (tid,))
        a = claim_one(store)
        store.mark_running(a)
        assert store.get_task(tid)["attempts"] == 60
        assert store.end_attempts([EndedAttempt(a, "boom", 1)], 1.0) == {tid: "queued"}
        assert 99 < store.seconds_until_next_due() <= 100
    finally:
        pool.close()


def test_unclaim_returns_the_task_without_costing_an_attempt(store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim_one(store)
    assert store.unclaim(Attempt(tid, a.lease, "someone-else")) is False
    assert store.unclaim(a) is True
    assert store.unclaim(a) is False
    row = store.get_task(tid)
    assert (row["status"], row["attempts"], row["picked_at"], row["worker_id"]) == ("queued", 0, None, None)


def test_reassign_moves_a_refused_attempt_to_another_worker(store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim_one(store, "w1")
    assert store.reassign(a, "w2") is True
    assert store.reassign(a, "w3") is False  # w1 no longer owns it
    assert store.mark_running(a) is False
    assert store.mark_running(Attempt(tid, a.lease, "w2")) is True


def test_orphaned_attempts_of_silent_or_unknown_workers_are_found_and_ended(store, sql_conn):
    retry = store.insert_task("sleep 100", 0, max_attempts=2)["id"]
    last = store.insert_task("sleep 100", 0)["id"]
    alive = store.insert_task("sleep 100", 0)["id"]
    store.record_heartbeat("dead", "dead:1", 5, [])
    store.record_heartbeat("alive", "alive:1", 5, [])
    tasks = {t.id: t for t in store.claim_due(["dead", "dead", "alive"])}
    assert {t.worker_id for t in tasks.values()} == {"dead", "alive"}
    for t in tasks.values():
        store.mark_running(Attempt(t.id, t.lease, t.worker_id))
    sql_conn.execute("UPDATE workers SET last_seen_at = now() - interval '20 seconds' WHERE worker_id = 'dead'")
    orphans = store.orphaned_attempts(9.0)
    assert {a.task_id for a, _, _ in orphans} == {retry, last}
    assert all(started and 19 < silent <= 25 for _, started, silent in orphans)
    ended = store.end_attempts([EndedAttempt(a, "lost") for a, _, _ in orphans], 1.0)
    assert ended == {retry: "queued", last: "failed"}
    assert store.get_task(alive)["status"] == "running"
    assert store.end_attempts([EndedAttempt(a, "again") for a, _, _ in orphans], 1.0) == {}  # fenced
    assert [r["worker_id"] for r in store.delete_stale_workers(9.0)] == ["dead"]


def test_attempts_of_a_worker_never_registered_are_orphans_that_had_not_started(store):
    tid = store.insert_task("echo", 0)["id"]
    claim_one(store, "phantom")
    ((attempt, started, silent),) = store.orphaned_attempts(9.0)
    assert (attempt.task_id, started, silent) == (tid, False, None)


def test_a_start_is_recorded_at_the_workers_time_kept_between_the_claim_and_now(store, sql_conn):
    tid = store.insert_task("echo", 0)["id"]
    a = claim_one(store, "w1")
    picked_at = store.get_task(tid)["picked_at"]
    # The start reported is 2 ms after the claim: once the database's clock has passed it, it is kept
    # as it is (sooner, it would be clamped to now(), rightly).
    wait_for(lambda: sql_conn.execute("SELECT now() > %s AS past", (picked_at + timedelta(milliseconds=2),)
                                      ).fetchone()["past"], what="2 ms on the database's clock")
    assert store.mark_running(a, picked_at.timestamp() + 0.002) is True
    assert store.get_task(tid)["started_at"] == picked_at + timedelta(milliseconds=2)
    assert store.mark_running(a, picked_at.timestamp() + 0.5) is True  # a retried report: the first stands
    assert store.get_task(tid)["started_at"] == picked_at + timedelta(milliseconds=2)
    for reported in (picked_at.timestamp() - 3600, time.time() + 3600):  # worker clocks far off
        sql_conn.execute("UPDATE tasks SET status = 'picked', started_at = NULL, attempts = 0 WHERE id = %s", (tid,))
        assert store.mark_running(a, reported) is True
        row = sql_conn.execute("SELECT started_at, picked_at, scheduled_at, now() AS now FROM tasks WHERE id = %s",
                               (tid,)).fetchone()
        assert row["scheduled_at"] <= row["picked_at"] <= row["started_at"] <= row["now"]


def test_a_final_report_records_a_start_whose_report_was_lost(store):
    done, failed, never = (store.insert_task(c, 0, max_attempts=2)["id"] for c in ("a", "b", "c"))
    attempts = {a.task_id: a for a in (claim_one(store, f"w{i}") for i in range(3))}
    started_at = time.time()
    assert store.mark_completed(attempts[done], 0, started_at) is True
    ended = store.end_attempts([EndedAttempt(attempts[failed], "boom", 1, started_at),
                                EndedAttempt(attempts[never], "stopped before it began", 143)], 1.0)
    assert ended == {failed: "queued"}  # the one that never started is not ended: nothing ran
    row = store.get_task(done)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert row["picked_at"] <= row["started_at"] <= row["completed_at"]
    row = store.get_task(failed)
    assert (row["status"], row["attempts"], row["error"]) == ("queued", 1, "boom")
    assert (store.get_task(never)["status"], store.get_task(never)["attempts"]) == ("picked", 0)


def test_unacknowledged_dispatches_are_those_a_later_heartbeat_does_not_list(store, sql_conn):
    store.insert_task("echo", 0)
    store.insert_task("echo", 0)
    store.record_heartbeat("w1", "h:1", 2, [])
    held, lost = claim_one(store, "w1"), claim_one(store, "w1")
    assert store.unacknowledged_attempts(60) == []
    sql_conn.execute("UPDATE tasks SET picked_at = now() - interval '2 minutes'")
    # The heartbeat on record may predate the dispatch: it proves nothing yet.
    sql_conn.execute("UPDATE workers SET last_seen_at = now() - interval '90 seconds'")
    assert store.unacknowledged_attempts(60) == []
    store.record_heartbeat("w1", "h:1", 2, [], [str(held.task_id)])  # a bound after the claim
    assert store.unacknowledged_attempts(60) == [lost]
    store.record_heartbeat("w1", "h:1", 2, [], [str(held.task_id), str(lost.task_id)])
    assert store.unacknowledged_attempts(60) == []


def test_live_workers_with_the_tasks_each_holds(store):
    assert store.record_heartbeat("w1", "h1:1", 3, []) is True
    assert store.record_heartbeat("w1", "h1:2", 4, ["x"]) is False
    store.record_heartbeat("w2", "h2:1", 2, [])
    store.insert_task("echo", 0)
    a = claim_one(store, "w2")
    workers = {w.worker_id: w for w in store.live_workers(9.0)}
    assert (workers["w1"].address, workers["w1"].takes, workers["w1"].running) == ("h1:2", 4, 1)
    assert workers["w2"].active_task_ids == {str(a.task_id)}
    assert store.delete_worker("w1") and not store.delete_worker("w1")
    assert [w.worker_id for w in store.live_workers(9.0)] == ["w2"]


def test_runs_to_stop_are_those_a_worker_no_longer_owns(store):
    mine = store.insert_task("echo", 0)["id"]
    a = claim_one(store, "w1")
    gone = uuid.uuid4()
    assert store.runs_to_stop("w1", [str(mine), str(gone)]) == {str(gone): False}
    assert store.runs_to_stop("w2", [str(mine)]) == {str(mine): False}
    store.cancel_task(mine)
    # Still its own, to stop as cancelled; another worker's copy is simply not its own.
    assert store.runs_to_stop("w1", [str(a.task_id)]) == {str(mine): True}
    assert store.runs_to_stop("w2", [str(mine)]) == {str(mine): False}


def test_cancel_a_queued_task_at_once_and_a_running_one_through_its_worker(store):
    queued = store.insert_task("echo", 3600)["id"]
    assert store.cancel_task(queued) == "cancelled"
    row = store.get_task(queued)
    assert row["status"] == "cancelled" and row["cancelled_at"] is not None
    assert store.cancel_task(queued) is None  # already cancelled: nothing changes

    running = store.insert_task("sleep 100", 0, max_attempts=5)["id"]
    a = claim_one(store)
    store.mark_running(a)
    assert store.cancel_task(running) == "running"
    assert store.cancels_pending() == [(running, "w1")]
    # The worker stops it and reports the attempt ended: cancelled, not retried.
    assert store.end_attempts([EndedAttempt(a, "cancelled", 143)], 1.0) == {running: "cancelled"}
    assert store.cancels_pending() == []


def test_a_picked_task_cancelled_before_it_starts(store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim_one(store)
    assert store.cancel_task(tid) == "picked"
    assert store.mark_running(a) is False  # the worker is told to stop it
    assert store.unclaim(a) is True  # or the dispatch never happened
    assert store.get_task(tid)["status"] == "cancelled"


def test_finished_tasks_cannot_be_cancelled(store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim_one(store)
    store.mark_running(a)
    store.mark_completed(a, 0)
    assert store.cancel_task(tid) is None
    assert store.get_task(tid)["status"] == "completed"


def test_unreachable_database_raises_database_unavailable():
    # Nothing listens on port 1; the pool gives up within its short timeout.
    pool = make_pool("postgresql://nobody@127.0.0.1:1/none", max_size=1)
    try:
        with pytest.raises(DatabaseUnavailable):
            TaskStore(pool).insert_task("echo", 0)
    finally:
        pool.close()


def test_data_the_database_cannot_hold_is_rejected_not_an_outage(server_url, tmp_path):
    # A LATIN1 database cannot store a snowman: DataRejected (a 400), not a 500 or a 503.
    import psycopg
    from helpers import with_database

    from distrack.db.migrate import migrate

    name = f"distrack_latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    url = with_database(server_url, name)
    try:
        migrate(url)
        pool = make_pool(url, max_size=1)
        try:
            with pytest.raises(DataRejected):
                TaskStore(pool).insert_task("echo \u2603", 0)
            with pytest.raises(DataRejected):
                TaskStore(pool).insert_tasks([TaskSpec("echo caf\u00e9"), TaskSpec("echo \u2603")])
            assert TaskStore(pool).insert_task("echo caf\u00e9", 0)["command"] == "echo caf\u00e9"
        finally:
            pool.close()
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_claim_also_says_when_the_next_unclaimed_task_is_due(store):
    assert store.claim(["w1"]) == ([], None)  # nothing queued
    now_id = store.insert_task("echo now")["id"]
    store.insert_task("echo later", 60)
    claimed, next_due_s = store.claim(["w1"])
    assert [t.id for t in claimed] == [now_id]
    assert 59 < next_due_s <= 60  # the claimed one does not count
    store.insert_task("echo due")
    claimed, next_due_s = store.claim([])  # no slot: nothing claimed, and something is due already
    assert claimed == [] and next_due_s <= 0


def test_a_claim_tells_a_task_left_behind_from_one_that_fell_due_while_it_ran(store, db_url):
    """The claim takes what is due at its transaction's start (now()) and measures the next due time at
    its end (clock_timestamp()). A task due in between used to look left behind (held by another
    coordinator), and the loop waited LOCKED_ROWS_RETRY_S for it instead of claiming it at once."""
    sql = queries()["claim_due"]
    with psycopg.connect(db_url, row_factory=dict_row) as conn:  # a transaction: now() stays put
        started = conn.execute("SELECT now() AS t").fetchone()["t"]
        due = started + timedelta(milliseconds=5)
        # Inserted on another connection, due just after the claim's now().
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("INSERT INTO tasks (id, command, scheduled_at) VALUES (gen_random_uuid(), 'echo', %s)",
                          (due,))
        wait_for(lambda: datetime.now(UTC) > due + timedelta(milliseconds=5), what="the task to fall due")
        rows = conn.execute(sql, {"worker_ids": "{w1}"}).fetchall()
        conn.rollback()
    [summary] = rows  # nothing claimed
    assert summary["next_due_s"] < 0 and summary["left_due"] is False
    # Through the store: claimed now, since it is due by now.
    assert len(store.claim_due(["w1"])) == 1

    # Left behind: a due row another transaction holds.
    held_id = store.insert_task("echo held")["id"]
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (held_id,))
        claimed, next_due_s = store.claim(["w1"])
        assert claimed == [] and next_due_s < 0
        holder.rollback()
    # Nothing left behind and nothing queued after the claim takes it.
    claimed, next_due_s = store.claim(["w1"])
    assert [t.id for t in claimed] == [held_id] and next_due_s is None


def test_a_claim_that_finds_a_task_falling_due_as_it_runs_says_claim_again_at_once(store, monkeypatch):
    # The store's side of the above: the summary row's "due already, nothing left" becomes 0.0.
    real_all = store._all

    def fell_due_meanwhile(name, params=None):
        rows = real_all(name, params)
        if name == "claim_due":
            rows[-1] = {**rows[-1], "next_due_s": -0.0004, "left_due": False}
        return rows

    monkeypatch.setattr(store, "_all", fell_due_meanwhile)
    store.insert_task("echo later", 60)
    assert store.claim(["w1"]) == ([], 0.0)


def test_a_claim_waits_for_the_disk_and_a_start_does_not_and_neither_changes_the_session(db_url):
    """A worker runs what it is dispatched at once, so the claim must be durable. A start report need
    not be (a lost one leaves the task picked by the same worker, whose final report records the start
    too): it turns synchronous_commit off for its own transaction only."""
    pool = make_pool(db_url, max_size=1, name="test")
    try:
        store = TaskStore(pool)
        store.insert_task("echo", 0)
        with pool.connection() as conn:  # the one connection every statement runs on
            with conn.transaction():
                conn.execute(store._sql["claim_due"], {"worker_ids": ["w1"]}).fetchall()
                assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
        assert store.claim_due(["w2"]) == []  # claimed above already
        with pool.connection() as conn:
            [row] = conn.execute("SELECT id, lease FROM tasks").fetchall()
            attempt = Attempt(row["id"], row["lease"], "w1")
            with conn.transaction():
                conn.execute(store._sql["mark_running"], {"ids": [attempt.task_id], "leases": [attempt.lease],
                                                          "worker_ids": ["w1"], "started_ats": [None]}).fetchall()
                assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "off"
            assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
        assert store.mark_completed(attempt, 0)
    finally:
        pool.close()


