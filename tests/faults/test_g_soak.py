"""Fault scenario g: a soak of 5,000 tasks while workers are killed at random and replaced."""

import random
import signal
import time

import pytest
from faultlib import BackgroundLoop, executions, record_command, tally, wait_all_final
from helpers import Cluster

pytestmark = pytest.mark.slow

TASKS = 5000
WORKERS = 3


# A kill at a random moment within each of these spans of the work (fractions of the tasks ended):
# tied to the work rather than to the clock, so a fast machine gets as many kills as a slow one (at
# one every 1.5 to 3 s, a machine that ran the tasks in 9 s sometimes got only two).
KILL_SPANS = ((0.05, 0.2), (0.25, 0.4), (0.45, 0.6), (0.65, 0.8))


class Killer(BackgroundLoop):
    """SIGKILLs a random worker and starts a replacement, once within each of KILL_SPANS, until stopped."""

    def __init__(self, cluster: Cluster, workers: list, seed: int, task_count: int) -> None:
        super().__init__()
        self.cluster = cluster
        self.workers = workers
        self.random = random.Random(seed)
        self.marks = [round(self.random.uniform(low, high) * task_count) for low, high in KILL_SPANS]
        self.killed_ids: set[str] = set()
        self.kills = 0
        self.error: BaseException | None = None

    def _run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.cluster.db_url, autocommit=True) as conn:
                for mark in self.marks:
                    while not self._stop.wait(0.05):
                        (ended,) = conn.execute(
                            "SELECT count(*) FROM tasks WHERE status IN ('completed', 'failed')").fetchone()
                        if ended >= mark:
                            break
                    if self._stop.is_set():
                        return
                    self._kill_one()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _kill_one(self) -> None:
        victim = self.random.choice(self.workers)
        worker_id = self.cluster.worker_id(victim)
        # Counted as crashed before the kill: any start on it may be cut short.
        self.killed_ids.add(worker_id)
        victim.signal(signal.SIGKILL)
        victim.proc.wait()
        self.kills += 1
        self.workers[self.workers.index(victim)] = self.cluster.worker(slots=5)


def test_g_soak_with_random_worker_kills(cluster: Cluster, fault_report, tmp_path):
    row = fault_report(f"g. soak: {TASKS} tasks, random worker kills")
    seed = random.randrange(1 << 30)
    row.notes.append(f"seed {seed}")
    log = tmp_path / "exec.log"
    cluster.coordinator("--retry_delay_s=0.05")
    workers = [cluster.worker(slots=5) for _ in range(WORKERS)]
    cluster.wait_joined(WORKERS)
    started = time.monotonic()
    import psycopg

    with psycopg.connect(cluster.db_url, autocommit=True) as conn:
        task_ids = [r[0] for r in conn.execute(
            "INSERT INTO tasks (id, command, scheduled_at, max_attempts) "
            "SELECT gen_random_uuid(), %s, now(), 3 FROM generate_series(1, %s) RETURNING id::text",
            (record_command(log, "sleep 0.02"), TASKS),
        ).fetchall()]
    killer = Killer(cluster, workers, seed, TASKS)
    killer.start()
    try:
        # Stop killing once most of the work is done, so the end is not a race with the killer.
        with psycopg.connect(cluster.db_url, autocommit=True) as conn:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                (left,) = conn.execute("SELECT count(*) FROM tasks WHERE status NOT IN ('completed', 'failed')"
                                       ).fetchone()
                if left < TASKS // 10:
                    break
                time.sleep(0.2)
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    done_at = wait_all_final(cluster.db_url, task_ids, 300)
    finals = tally(row, cluster.db_url, task_ids, log, crashed_workers=killer.killed_ids)
    runs = executions(log)
    assert row.lost == 0 and row.duplicated == 0
    assert row.completed + row.failed == TASKS  # exactly one terminal state each
    for task_id, r in finals.items():
        if r["status"] == "failed":  # only ever by losing its workers, three times
            assert "was lost" in r["error"], r
        # Every start but those cut short by a kill ran once: the task's starts outside killed
        # workers number at most one, and a completed task started at least once.
        assert r["status"] != "completed" or runs.get(task_id), task_id
    # The output files agree with the log: every start has its file, and every file on a worker that
    # was not killed belongs to a logged start (a worker killed between opening a task's file and
    # starting bash leaves a file with no start).
    starts = {(t, w) for t in runs for _, w in runs[t]}
    files = {tuple(reversed(f.stem.rsplit("_", 1))) for f in cluster.output_dir.glob("*.txt")}
    assert starts <= files
    assert {(t, w) for t, w in files if w not in killer.killed_ids} <= starts
    row.notes.append(f"{killer.kills} workers killed; {row.rerun} tasks re-run after a kill; "
                     f"{time.monotonic() - started:.0f} s in all, last task done {done_at - started:.0f} s in")
    assert killer.kills >= 3
