"""Fault scenarios a to e: worker kill, coordinator kill, PostgreSQL restart, a stopped worker, two
coordinators. Real processes, real signals; see conftest.py for how executions are counted."""

import os
import signal
import time

import psycopg
import pytest
from faultlib import BackgroundLoop, executions, final_rows, record_command, tally, wait_all_final
from helpers import Api, Cluster, wait_for

from distrack.coordinator.dispatcher import IDLE_CLAIM_LIMIT
from distrack.db.embedded import EmbeddedPostgres
from distrack.db.migrate import migrate

pytestmark = pytest.mark.slow


def tasks_on(db_url: str, worker_id: str, status: str = "running") -> set[str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id::text FROM tasks WHERE worker_id = %s AND status = %s",
                            (worker_id, status)).fetchall()
    return {r[0] for r in rows}


def insert_tasks(db_url: str, command: str, count: int, max_attempts: int = 1) -> list[str]:
    """Inserts `count` due tasks in one statement (one NOTIFY), as a client of the SQL could."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO tasks (id, command, scheduled_at, max_attempts) "
            "SELECT gen_random_uuid(), %s, now(), %s FROM generate_series(1, %s) RETURNING id::text",
            (command, max_attempts, count),
        ).fetchall()
    return [r[0] for r in rows]


def test_a_kill_9_a_worker_mid_task(cluster: Cluster, fault_report, tmp_path):
    row = fault_report("a. kill -9 a worker mid-task (attempts left)")
    log = tmp_path / "exec.log"
    cluster.coordinator("--retry_delay_s=0.1")
    victim = cluster.worker(slots=5)
    cluster.worker(slots=5)
    cluster.scheduler()
    cluster.wait_joined(2)
    api = Api(cluster.url)
    task_ids = [api.schedule(record_command(log, "sleep 1.5"), max_attempts=2)["task_id"] for _ in range(10)]
    victim_id = cluster.worker_id(victim)
    # Killed once every task it took is on record as running: one whose start report had not arrived
    # yet goes back at no cost, though it may have begun (at-least-once), and would blur the count.
    on_victim = wait_for(lambda: (tasks_on(cluster.db_url, victim_id)
                                  if not tasks_on(cluster.db_url, victim_id, "picked") else None) or None,
                         what="tasks running on the victim")
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: all(api.status(t)["status"] == "completed" for t in on_victim), timeout=30,
             what="the victim's tasks to complete elsewhere")
    row.recovery_s = time.monotonic() - killed_at
    wait_all_final(cluster.db_url, task_ids, 60)
    finals = tally(row, cluster.db_url, task_ids, log, crashed_workers={victim_id})
    assert row.lost == 0 and row.duplicated == 0 and row.completed == 10
    for task_id in on_victim:
        assert finals[task_id]["worker_id"] != victim_id and finals[task_id]["attempts"] == 2
    assert row.rerun == len(on_victim)
    row.notes.append(f"{len(on_victim)} task(s) were running on the killed worker; ttl 0.6 s")


def test_a_kill_9_a_worker_on_the_last_attempt_fails_with_worker_lost(cluster: Cluster, fault_report, tmp_path):
    row = fault_report("a. kill -9 a worker mid-task (no attempt left)")
    log = tmp_path / "exec.log"
    cluster.coordinator()
    victim = cluster.worker()
    cluster.scheduler()
    cluster.wait_joined(1)
    api = Api(cluster.url)
    task_ids = [api.schedule(record_command(log, "sleep 5"))["task_id"] for _ in range(3)]
    victim_id = cluster.worker_id(victim)
    wait_for(lambda: len(tasks_on(cluster.db_url, victim_id)) == 3, what="the tasks to start")
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    done_at = wait_all_final(cluster.db_url, task_ids, 30)
    row.recovery_s = done_at - killed_at
    finals = tally(row, cluster.db_url, task_ids, log, crashed_workers={victim_id})
    assert row.failed == 3 and row.lost == 0 and row.rerun == 0
    assert all(f"worker {victim_id} was lost" in r["error"] for r in finals.values())


def test_b_kill_9_the_coordinator_between_claim_and_dispatch(cluster: Cluster, fault_report, tmp_path):
    row = fault_report("b. kill -9 the coordinator between claim and dispatch")
    log = tmp_path / "exec.log"
    # This coordinator pauses for a minute after each claim commits: it is killed inside that window.
    doomed = cluster.coordinator(env_extra={"DISTRACK_FAULT_CLAIM_DELAY_S": "60"})
    cluster.worker(slots=5)
    cluster.worker(slots=5)
    cluster.wait_joined(2)
    task_ids = insert_tasks(cluster.db_url, record_command(log), 6)
    # One claim commits, then the pause: all 6, or IDLE_CLAIM_LIMIT of them if the coordinator had
    # found the queue drained before they came (the rest stay queued for the next coordinator).
    wait_for(lambda: "pausing" in doomed.log(), what="the claim")
    with psycopg.connect(cluster.db_url, autocommit=True) as conn:
        (picked,) = conn.execute("SELECT count(*) FROM tasks WHERE status = 'picked'").fetchone()
    assert picked in (IDLE_CLAIM_LIMIT, 6), picked
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait()
    restarted_at = time.monotonic()
    cluster.coordinator("--ack_timeout_s=1", port=cluster.coordinator_port)
    done_at = wait_all_final(cluster.db_url, task_ids, 30)
    row.recovery_s = done_at - restarted_at
    finals = tally(row, cluster.db_url, task_ids, log, crashed_workers=set())
    assert row.completed == 6 and row.lost == 0 and row.rerun == 0 and row.duplicated == 0
    assert all(r["attempts"] == 1 for r in finals.values())  # never started before: no attempt lost
    row.notes.append(f"{picked} claimed-but-undispatched tasks go back after the acknowledgement deadline (1 s here)")


class Load(BackgroundLoop):
    """Submits tasks from a thread until stopped, retrying each through 503s; counts what happened."""

    def __init__(self, api: Api, command: str, interval_s: float = 0.02) -> None:
        super().__init__()
        self.api = api
        self.command = command
        self.interval_s = interval_s
        self.accepted: list[str] = []
        self.unavailable = 0
        self.refused_other = 0
        self.first_accept_after_outage: float | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            status, doc = self.api.request("POST", "/schedule", {"command": self.command}, timeout=15)
            if status == 200:
                self.accepted.append(doc["task_id"])
                if self.unavailable and self.first_accept_after_outage is None:
                    self.first_accept_after_outage = time.monotonic()
            elif status == 503:
                self.unavailable += 1
            else:
                self.refused_other += 1
            self._stop.wait(self.interval_s)


def test_c_restart_postgresql_under_load(tmp_path, fault_report):
    row = fault_report("c. restart PostgreSQL under load")
    log = tmp_path / "exec.log"
    pg = EmbeddedPostgres(tmp_path / "pgdata")
    url = pg.start()
    cluster = Cluster(url, tmp_path)
    load = None
    try:
        migrate(url)
        cluster.coordinator()
        cluster.worker(slots=4)
        cluster.worker(slots=4)
        cluster.scheduler()
        cluster.wait_joined(2)
        load = Load(Api(cluster.url), record_command(log, "sleep 0.3"))
        load.start()
        wait_for(lambda: len(load.accepted) >= 30, what="some load before the restart")
        pg.stop()
        stopped_at = time.monotonic()
        wait_for(lambda: load.unavailable >= 5, timeout=30, what="the API to answer 503")
        pg.start()
        restarted_at = time.monotonic()
        accepted_before = len(load.accepted)
        wait_for(lambda: len(load.accepted) >= accepted_before + 30, timeout=60, what="the load to get through again")
        load.stop()
        done_at = wait_all_final(url, load.accepted, 60)
        row.recovery_s = load.first_accept_after_outage - restarted_at
        tally(row, url, load.accepted, log, crashed_workers=set())
        assert load.refused_other == 0
        assert row.lost == 0 and row.failed == 0 and row.duplicated == 0 and row.rerun == 0
        assert row.completed == len(load.accepted)
        row.notes.append(f"database down {restarted_at - stopped_at:.1f} s; {load.unavailable} submissions got 503 "
                         f"and were retried; all accepted tasks done {done_at - restarted_at:.1f} s after the restart")
    finally:
        if load is not None:
            load.stop()
        cluster.stop_all()
        pg.stop()


def test_d_sigstop_a_worker_then_sigcont(cluster: Cluster, fault_report, tmp_path):
    row = fault_report("d. SIGSTOP a worker (alive, silent), then SIGCONT")
    log = tmp_path / "exec.log"
    coordinator = cluster.coordinator("--retry_delay_s=0.1")
    frozen = cluster.worker(slots=3)
    cluster.worker(slots=3)
    cluster.scheduler()
    cluster.wait_joined(2)
    api = Api(cluster.url)
    task_ids = [api.schedule(record_command(log, "sleep 1"), max_attempts=2)["task_id"] for _ in range(6)]
    frozen_id = cluster.worker_id(frozen)
    on_frozen = wait_for(lambda: tasks_on(cluster.db_url, frozen_id) or None, what="tasks on the worker to stop")
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        done_at = wait_all_final(cluster.db_url, task_ids, 30)
        row.recovery_s = done_at - stopped_at
    finally:
        frozen.signal(signal.SIGCONT)
    finals = tally(row, cluster.db_url, task_ids, log, crashed_workers={frozen_id})
    assert row.completed == 6 and row.lost == 0 and row.duplicated == 0
    assert all(finals[t]["worker_id"] != frozen_id for t in on_frozen)
    # Back from SIGSTOP, the worker reports its old attempts: refused, and the rows do not change.
    wait_for(lambda: "refused" in coordinator.log(), timeout=15, what="the late reports to be refused")
    assert final_snapshot(cluster.db_url, task_ids) == {t: (r["status"], r["worker_id"]) for t, r in finals.items()}
    row.notes.append(f"{len(on_frozen)} task(s) rescued from the stopped worker; its late reports refused")


def final_snapshot(db_url: str, task_ids: list[str]) -> dict:
    return {t: (r["status"], r["worker_id"]) for t, r in final_rows(db_url, task_ids).items()}


def test_e_two_coordinators_under_load_dispatch_each_task_once(cluster: Cluster, fault_report, tmp_path):
    row = fault_report("e. two coordinators under load")
    log = tmp_path / "exec.log"
    from helpers import free_port

    first = cluster.coordinator()
    second_port = free_port()
    second = cluster.coordinator(port=second_port)
    # Two workers heartbeat to the first coordinator, one to the second: each coordinator must still
    # use all three (the registry is shared through PostgreSQL).
    cluster.worker(slots=4)
    cluster.worker(slots=4)
    cluster.worker(slots=4, coordinator_port=second_port)
    cluster.wait_joined(3)
    started = time.monotonic()
    task_ids = insert_tasks(cluster.db_url, record_command(log), 600)
    done_at = wait_all_final(cluster.db_url, task_ids, 120)
    first.stop()
    second.stop()
    counts = [int(s.log().rsplit("dispatched ", 1)[1].split()[0]) for s in (first, second)]
    tally(row, cluster.db_url, task_ids, log, crashed_workers=set())
    assert row.completed == 600 and row.lost == 0 and row.rerun == 0 and row.duplicated == 0
    assert sum(counts) == 600, counts  # every task accepted by a worker exactly once
    assert min(counts) > 0, counts
    with psycopg.connect(cluster.db_url, autocommit=True) as conn:
        used = conn.execute("SELECT count(DISTINCT worker_id) FROM tasks").fetchone()[0]
    assert used == 3
    row.recovery_s = None
    row.notes.append(f"dispatches per coordinator {counts}; 600 tasks in {done_at - started:.1f} s")


def test_e_a_coordinator_uses_workers_that_heartbeat_elsewhere(cluster: Cluster, tmp_path):
    # The second coordinator has no worker of its own; with the first one unable to dispatch (it is
    # stuck after its first claim), every task still runs, dispatched by the second.
    from helpers import free_port

    cluster.coordinator(env_extra={"DISTRACK_FAULT_CLAIM_DELAY_S": "600"})
    second_port = free_port()
    second = cluster.coordinator("--ack_timeout_s=1", port=second_port)
    cluster.worker(slots=2)
    cluster.wait_joined(1)
    log = tmp_path / "exec.log"
    task_ids = insert_tasks(cluster.db_url, record_command(log), 20)
    wait_all_final(cluster.db_url, task_ids, 60)
    second.stop()
    assert int(second.log().rsplit("dispatched ", 1)[1].split()[0]) >= 18
    assert all(len(runs) == 1 for runs in executions(log).values())
    assert os.path.exists(log)


def test_e_kill_9_one_of_two_coordinators_loses_and_repeats_nothing(cluster: Cluster, fault_report, tmp_path):
    row = fault_report("e. kill -9 one of two coordinators mid-load")
    from helpers import free_port

    log = tmp_path / "exec.log"
    first = cluster.coordinator()
    second_port = free_port()
    cluster.coordinator(port=second_port)
    both = f"--coordinator=127.0.0.1:{cluster.coordinator_port},127.0.0.1:{second_port}"
    cluster.worker(both, slots=4)
    cluster.worker(both, slots=4)
    cluster.wait_joined(2)
    task_ids = insert_tasks(cluster.db_url, record_command(log, "sleep 1"), 24)
    with psycopg.connect(cluster.db_url, autocommit=True) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM tasks WHERE status = 'running'").fetchone()[0] >= 4,
                 what="tasks running")
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    done_at = wait_all_final(cluster.db_url, task_ids, 60)
    row.recovery_s = done_at - killed_at
    finals = tally(row, cluster.db_url, task_ids, log, crashed_workers=set())
    # The workers moved to the other coordinator: nobody was declared lost, nothing ran twice.
    assert row.completed == 24 and row.lost == 0 and row.rerun == 0 and row.duplicated == 0
    assert all(r["attempts"] == 1 for r in finals.values())
    assert "switching to" in "".join(s.log() for s in cluster.services if s.name.startswith("worker"))
    row.notes.append(f"workers given both coordinators; all 24 done {row.recovery_s:.1f} s after the kill")
