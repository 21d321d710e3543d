"""f. A Compose-like cluster on one machine: every service is a host of its own (a network namespace),
found by name as in Compose (`postgres`, `coordinator`); workers advertise their own addresses (no
WORKER_ADDRESS, as under `--scale`). One worker's link is cut: its tasks are rescued by the others,
which keep working; once the link is back the worker rejoins. The plumbing is in netns.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import netns
import psycopg
import pytest
from faultlib import executions, record_command, tally, wait_all_final
from helpers import Api, kill_marked_processes, wait_for

from distrack.config import DEFAULT_SLOTS
from distrack.db.migrate import migrate

WORKERS = ["worker-1", "worker-2", "worker-3"]
HOSTS = ["postgres", "coordinator", "scheduler", *WORKERS]
PG_USER = "pgserver"  # the system user pgserver runs PostgreSQL as when started by root
TASKS = 30
# Cut only while every task running on worker-1 started less than this long ago: `sleep 1` cannot
# have finished (and been reported) before the link is down, so "running at the cut" is exact.
FRESH_S = 0.4
# Settings a service must not inherit from the test's environment: its database comes from the
# POSTGRES_* below, its address from its route, and gRPC would honour a proxy.
DROPPED_ENV = ("DATABASE_URL", "WORKER_ADDRESS", "POSTGRES_", "PG", "http_proxy", "https_proxy", "grpc_proxy",
               "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "GRPC_PROXY", "NO_PROXY", "ALL_PROXY")


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces are needed on CI: {reason}")
    pytest.skip(reason)


class ComposeCluster:
    """PostgreSQL, a coordinator, a scheduler and three workers, each in its own namespace."""

    def __init__(self, net: netns.Network, workdir: Path) -> None:
        self.net = net
        self.workdir = workdir
        self.logs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.marker = uuid.uuid4().hex
        self.pg_root: Path | None = None
        self.pg_bin: Path | None = None
        self.worker_ids: dict[str, str] = {}  # host name -> worker id

    def ip(self, host: str) -> str:
        return self.net.hosts[host].ip

    @property
    def db_url(self) -> str:
        return f"postgresql://postgres@{self.ip('postgres')}:5432/postgres"

    @property
    def api(self) -> Api:
        return Api(f"http://{self.ip('scheduler')}:8081")

    def _start(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path = self.workdir / f"{host}.log"
        self.logs[host] = log_path
        with open(log_path, "ab") as log:
            proc = self.net.popen(host, argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=self.workdir)
        self.procs[host] = proc
        return proc

    def _check_alive(self, host: str) -> None:
        proc = self.procs[host]
        if proc.poll() is not None:
            pytest.fail(f"{host} exited with {proc.returncode}:\n{self.logs[host].read_text(errors='replace')}")

    # --- postgres

    def start_postgres(self) -> None:
        import pgserver

        self.pg_bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        try:
            user = pwd.getpwnam(PG_USER)
        except KeyError:
            netns.run("useradd", "--system", PG_USER)
            user = pwd.getpwnam(PG_USER)
        # Outside pytest's tmp_path, which only root may enter.
        self.pg_root = Path(tempfile.mkdtemp(prefix=f"{self.net.prefix}-pg-"))
        data, sockets = self.pg_root / "data", self.pg_root / "sockets"
        sockets.mkdir()
        for path in (self.pg_root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_pg = ["runuser", "-u", PG_USER, "--"]
        netns.run(*as_pg, str(self.pg_bin / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                  "--encoding=utf8", "--no-sync", timeout=120)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {netns.SUPERNET} trust\n")
        ip = self.ip("postgres")
        self._start("postgres", [*as_pg, str(self.pg_bin / "postgres"), "-D", str(data), "-h", ip, "-p", "5432",
                                 "-k", str(sockets), "-c", "fsync=off", "-c", "full_page_writes=off"])

        def accepting() -> bool:
            self._check_alive("postgres")
            with contextlib.suppress(psycopg.OperationalError), psycopg.connect(self.db_url, connect_timeout=2):
                return True
            return False

        wait_for(accepting, 60, interval=0.1, what="PostgreSQL to accept connections at its address")
        migrate(self.db_url)

    def stop_postgres(self) -> None:
        if self.pg_root is not None and self.pg_bin is not None and (self.pg_root / "data" / "postmaster.pid").exists():
            netns.run("runuser", "-u", PG_USER, "--", str(self.pg_bin / "pg_ctl"), "-D", str(self.pg_root / "data"),
                      "-m", "immediate", "-w", "-t", "30", "stop", check=False, timeout=60)

    # --- distrack services

    def service_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV)}
        env.update(POSTGRES_HOST="postgres", POSTGRES_PORT="5432", POSTGRES_USER="postgres", POSTGRES_DB="postgres",
                   PYTHONUNBUFFERED="1", DISTRACK_LOG_LEVEL="INFO",
                   # Task commands get it (allow-listed), so the ones a cut-off worker leaves behind can be found.
                   DISTRACK_TEST_CLUSTER=self.marker, DISTRACK_TASK_ENV_ALLOW="DISTRACK_TEST_CLUSTER")
        return env

    def distrack(self, host: str, *argv: str) -> subprocess.Popen:
        return self._start(host, [sys.executable, "-m", "distrack", *argv], self.service_env())

    def start_services(self) -> None:
        self.distrack("coordinator", "coordinator", "--coordinator_port=:8080", "--heartbeat_interval_s=0.2",
                      "--poll_interval_s=0.5")
        self.wait_tcp("coordinator", 8080)
        self.distrack("scheduler", "scheduler", "--scheduler_port=:8081", "--http_workers=1")
        for worker in WORKERS:
            self.distrack(worker, "worker", "--worker_port=:8000", "--coordinator=coordinator:8080",
                          f"--output_dir={self.workdir / 'out'}", "--heartbeat_interval_s=0.2",
                          "--shutdown_grace_s=2")

        def healthy() -> bool:
            self._check_alive("scheduler")
            return self.api.request("GET", "/health", timeout=2)[0] == 200

        wait_for(healthy, 60, interval=0.1, what="the scheduler to answer /health")

        def joined() -> dict[str, str] | None:
            for worker in WORKERS:
                self._check_alive(worker)
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                rows = conn.execute("SELECT address, worker_id FROM workers").fetchall()
            return dict(rows) if len(rows) >= len(WORKERS) else None

        by_address: dict[str, str] = wait_for(joined, 60, interval=0.1, what="3 workers to join")  # type: ignore[assignment]
        # Each worker advertises the address of its own route to the coordinator: its namespace's.
        expected = {f"{self.ip(w)}:8000": w for w in WORKERS}
        assert set(by_address) == set(expected), (by_address, expected)
        self.worker_ids = {expected[address]: worker_id for address, worker_id in by_address.items()}

    def wait_tcp(self, host: str, port: int, timeout: float = 60) -> None:
        def listening() -> bool:
            self._check_alive(host)
            with contextlib.suppress(OSError), socket.create_connection((self.ip(host), port), timeout=1):
                return True
            return False

        wait_for(listening, timeout, interval=0.1, what=f"{host} to listen on {port}")

    def dump_logs(self) -> str:
        return "\n".join(f"===== {host}\n{path.read_text(errors='replace')}" for host, path in self.logs.items())

    def stop(self) -> list[str]:
        errors = []
        # As `docker compose down` would: the workers and the scheduler (at once), then the coordinator
        # (so the workers can still deregister), then the database.
        for group in ([*WORKERS, "scheduler"], ["coordinator"]):
            procs = [self.procs[host] for host in group if host in self.procs]
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            for proc in procs:
                try:
                    netns.stop_process(proc, timeout=15, term=False)
                except Exception as exc:
                    errors.append(f"process {proc.pid}: {exc}")
        try:
            self.stop_postgres()
        except Exception as exc:
            errors.append(f"pg_ctl stop: {exc}")
        errors += self.net.teardown()  # waits for (or kills) every process it started, then the network
        kill_marked_processes(f"DISTRACK_TEST_CLUSTER={self.marker}")
        if self.pg_root is not None:
            shutil.rmtree(self.pg_root, ignore_errors=True)
        return errors


@pytest.fixture
def compose(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ComposeCluster]:
    reason = netns.unavailable_reason()
    if reason:
        skip_or_fail(reason)
    net = netns.Network()
    cluster = ComposeCluster(net, tmp_path)
    try:
        net.up(HOSTS)
        cluster.start_postgres()
        cluster.start_services()
        yield cluster
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(cluster.dump_logs())
        errors = cluster.stop()
        leftovers = net.leftovers()
        assert not errors and not leftovers, f"teardown: {errors} {leftovers}"


def w1_snapshot(conn: psycopg.Connection, worker_id: str, task_ids: list[str]) -> dict:
    """Tasks held by worker-1 now, the age of its oldest run, and how many others have not started."""
    rows = conn.execute(
        "SELECT id::text, status, EXTRACT(EPOCH FROM clock_timestamp() - started_at)::float8 FROM tasks "
        "WHERE id = ANY(%s::uuid[]) AND worker_id = %s AND status IN ('picked', 'running')",
        (task_ids, worker_id),
    ).fetchall()
    # Not started yet, nor held by worker-1: in the queue, or waiting on another worker for a slot.
    (queued,) = conn.execute(
        "SELECT count(*) FROM tasks WHERE id = ANY(%s::uuid[]) AND (status = 'queued' OR "
        "(status = 'picked' AND worker_id <> %s))", (task_ids, worker_id),
    ).fetchone()
    running = {r[0] for r in rows if r[1] == "running"}
    ages = [r[2] for r in rows if r[1] == "running" and r[2] is not None]
    return {"running": running, "picked": {r[0] for r in rows if r[1] == "picked"},
            "oldest_s": max(ages, default=0.0), "queued": queued}


@pytest.mark.slow
def test_f_cut_one_workers_link(compose: ComposeCluster, fault_report, tmp_path):
    row = fault_report("f. netns cluster: cut one worker's link")
    log = tmp_path / "exec.log"
    db = compose.db_url
    w1, others = compose.worker_ids["worker-1"], [compose.worker_ids[w] for w in WORKERS[1:]]
    api = compose.api

    # One batch, so each worker's first runs start together and are fresh at once: sent one by one on a
    # slow machine, worker-1's starts (and its prefetched tasks' after them) spread over more than FRESH_S.
    status, doc = api.request("POST", "/tasks", {"tasks": [
        {"command": record_command(log, "sleep 1"), "max_attempts": 3} for _ in range(TASKS)]})
    assert status == 200, (status, doc)
    task_ids = [t["task_id"] for t in doc["tasks"]]

    with psycopg.connect(db, autocommit=True) as conn:
        # A moment when worker-1 runs tasks that all started just now, with work left for the others. Its
        # slots all on record as running: no run of it has started with its start report still on the way.
        def cut_moment() -> dict | None:
            snap = w1_snapshot(conn, w1, task_ids)
            ok = len(snap["running"]) == DEFAULT_SLOTS and snap["oldest_s"] < FRESH_S and snap["queued"] >= 6
            return snap if ok else None

        before = wait_for(cut_moment, 60, interval=0.01, what="fresh tasks running on worker-1")
        checked = time.monotonic()
        compose.net.set_link("worker-1", up=False)
        cut_mono, cut_wall = time.monotonic(), dt.datetime.now(dt.UTC)
        after = w1_snapshot(conn, w1, task_ids)  # what was in flight (picked -> running) as it went down
        # Sound only if the link went down before the oldest of those runs could have finished.
        assert cut_mono - checked + before["oldest_s"] < 1.0, f"cut took {cut_mono - checked:.2f} s: machine too busy"
    running_at_cut = before["running"] | after["running"]
    held_at_cut = running_at_cut | before["picked"] | after["picked"]

    def worker_gone() -> bool:
        with psycopg.connect(db, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM workers WHERE worker_id = %s", (w1,)).fetchone()[0] == 0

    wait_for(worker_gone, 30, interval=0.02, what="the coordinator to drop worker-1")
    lost_after_s = time.monotonic() - cut_mono
    wait_all_final(db, task_ids, 90)
    tally(row, db, task_ids, log, crashed_workers={w1})
    with psycopg.connect(db, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        detail = {r["id"]: r for r in conn.execute(
            "SELECT id::text AS id, status, attempts, worker_id, started_at, completed_at FROM tasks "
            "WHERE id = ANY(%s::uuid[])", (task_ids,)).fetchall()}

    # Nothing lost, nothing failed, nothing run twice outside worker-1's window.
    assert row.lost == 0 and row.duplicated == 0 and row.completed == TASKS, row
    # worker-1's tasks were rescued: each completed on another worker, a second attempt for those running.
    for task_id in held_at_cut:
        task = detail[task_id]
        assert task["status"] == "completed" and task["worker_id"] in others, task
        assert task["completed_at"] > cut_wall, task
    for task_id in running_at_cut:
        assert detail[task_id]["attempts"] >= 2, detail[task_id]
    # worker-1 reported nothing once its link was down.
    late = [t for t in detail.values() if t["worker_id"] == w1 and t["completed_at"] > cut_wall]
    assert not late, f"worker-1 completed tasks after its link was cut: {late}"
    # The other workers kept working: they started and completed tasks after the cut.
    for worker_id in others:
        done_after = [t for t in detail.values() if t["worker_id"] == worker_id and t["started_at"] > cut_wall]
        assert done_after, f"{worker_id} did no work after the cut"
    # Re-runs are exactly the tasks worker-1 had started and another worker finished. (A start recorded
    # just as the link went down may never have reached worker-1: then it ran once, elsewhere.)
    runs = executions(log)
    started_on_w1 = {t for t in task_ids if any(w == w1 for _, w in runs.get(t, []))}
    rescued_runs = {t for t in started_on_w1 if detail[t]["worker_id"] != w1}
    assert rescued_runs and rescued_runs <= running_at_cut, (rescued_runs, running_at_cut)
    assert row.rerun == len(rescued_runs), (row.rerun, rescued_runs)
    rescued_at = max(detail[t]["completed_at"] for t in held_at_cut)
    row.recovery_s = (rescued_at - cut_wall).total_seconds()

    row.notes.append(
        f"6 hosts in network namespaces on {compose.net.subnet}, workers advertised at .13-.15 (no WORKER_ADDRESS); "
        f"worker-1 cut with {len(running_at_cut)} running (+{len(held_at_cut) - len(running_at_cut)} picked): "
        f"dropped after {lost_after_s:.2f} s, its tasks done elsewhere after {row.recovery_s:.2f} s"
    )
    row.notes += compose.net.notes

    # The link comes back: worker-1 heartbeats again and is in the registry once more.
    compose.net.set_link("worker-1", up=True)
    restored_mono, restored_wall = time.monotonic(), dt.datetime.now(dt.UTC)

    def rejoined() -> bool:
        with psycopg.connect(db, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM workers WHERE worker_id = %s AND last_seen_at > %s",
                                (w1, restored_wall)).fetchone()[0] == 1

    wait_for(rejoined, 60, interval=0.05, what="worker-1 to heartbeat again after its link is back")
    row.notes.append(f"worker-1 rejoined {time.monotonic() - restored_mono:.2f} s after its link came back")

    # ... and is given tasks again (the coordinator dials it back).
    def runs_tasks_again() -> bool:
        batch = [api.schedule(record_command(tmp_path / "exec-rejoined.log"))["task_id"] for _ in range(6)]
        wait_all_final(db, batch, 30)
        with psycopg.connect(db, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s::uuid[]) AND worker_id = %s "
                                "AND status = 'completed'", (batch, w1)).fetchone()[0] > 0

    wait_for(runs_tasks_again, 30, interval=0.2, what="worker-1 to run tasks again after it rejoined")
    row.notes.append(f"worker-1 ran tasks again {time.monotonic() - restored_mono:.2f} s after its link came back")
