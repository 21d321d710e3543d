"""Helpers for tests: waiting on conditions, free ports, an HTTP client, service processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from distrack.rpc import distrack_pb2, distrack_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
# Fast liveness for tests: a heartbeat every 0.2 s, a worker lost after 3 misses.
TEST_HEARTBEAT_S = 0.2


# Tables that tests hand over to be printed after the run (pytest's terminal summary), e.g. what each
# attack on the API got back: output printed during a test or fixture is captured, this is not.
REPORTS = pytest.StashKey[list[tuple[str, list[str]]]]()


def add_report(config: pytest.Config, title: str, lines: list[str]) -> None:
    config.stash.setdefault(REPORTS, []).append((title, lines))


def wait_for(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> object:
    """Polls `condition` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConnectionCounter:
    """A peer that is down as far as gRPC can tell: a TCP listener on `port` that accepts every
    connection and closes it at once (no HTTP/2), counting them, so a client's reconnect attempts can
    be counted. A context manager; it stops listening on exit."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="connection-counter", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.close()
            self.count += 1

    def __enter__(self) -> ConnectionCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def with_database(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


# --- service processes


class Service:
    """One `python -m distrack ...` process (or of another module: `module`), with its log in a file;
    stopped by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, module: str = "distrack"
                 ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Not the repository: the services import the installed package, as users run them.
            cwd=log_dir,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever it started in its session (gunicorn workers, task commands) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


class Cluster:
    """Real processes on free loopback ports against one test database."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.output_dir = workdir / "worker_output"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "WORKER_ADDRESS"))}
        # Task commands get the marker (allow-listed into their clean environment), so the ones a
        # killed worker orphaned can be found.
        self.marker = f"DISTRACK_TEST_CLUSTER={uuid.uuid4().hex}"
        self.env.update(DATABASE_URL=db_url, PYTHONUNBUFFERED="1", DISTRACK_LOG_LEVEL="INFO",
                        DISTRACK_TEST_CLUSTER=self.marker.split("=", 1)[1],
                        DISTRACK_TASK_ENV_ALLOW="DISTRACK_TEST_CLUSTER")
        self.services: list[Service] = []
        self.coordinator_port = free_port()
        self.scheduler_port = free_port()
        self._counter = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.scheduler_port}"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, env or self.env, self.workdir)
        self.services.append(service)
        return service

    def coordinator(self, *extra: str, port: int | None = None, env_extra: dict[str, str] | None = None) -> Service:
        port = port or self.coordinator_port
        self._counter += 1
        name = "coordinator" if port == self.coordinator_port and not any(
            s.name == "coordinator" for s in self.services) else f"coordinator{self._counter}"
        service = self.start(name, [
            "coordinator", f"--coordinator_port=127.0.0.1:{port}",
            f"--heartbeat_interval_s={TEST_HEARTBEAT_S}", "--poll_interval_s=0.5", *extra,
        ], {**self.env, **(env_extra or {})})
        self.wait_port(port, service)
        return service

    def worker(self, *extra: str, slots: int = 5, coordinator_port: int | None = None,
               env_extra: dict[str, str] | None = None) -> Service:
        self._counter += 1
        port = free_port()
        service = self.start(f"worker{self._counter}", [
            "worker", f"--worker_port=127.0.0.1:{port}",
            f"--coordinator=127.0.0.1:{coordinator_port or self.coordinator_port}",
            f"--output_dir={self.output_dir}", f"--slots={slots}", f"--heartbeat_interval_s={TEST_HEARTBEAT_S}",
            *extra,
        ], {**self.env, **(env_extra or {})})
        service.port = port  # type: ignore[attr-defined]
        self.wait_port(port, service)
        return service

    def worker_id(self, worker: Service) -> str:
        """The id a worker process gave itself (from its first log line)."""
        import re

        match = wait_for(lambda: re.search(r"worker (\S+) listening", worker.log()), what="the worker's id")
        return match.group(1)  # type: ignore[union-attr]

    def wait_joined(self, count: int, timeout: float = 20.0) -> None:
        """Waits until `count` workers are registered in the database."""
        import psycopg

        def joined() -> bool:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                return conn.execute("SELECT count(*) FROM workers").fetchone()[0] >= count

        wait_for(joined, timeout, what=f"{count} worker(s) to join")

    def scheduler(self, *extra: str, env_extra: dict[str, str] | None = None) -> Service:
        service = self.start(
            "scheduler",
            [
                "scheduler",
                f"--scheduler_port=127.0.0.1:{self.scheduler_port}",
                "--http_workers=2",
                *extra,
            ],
            {**self.env, **(env_extra or {})},
        )
        self.wait_port(self.scheduler_port, service)
        return service

    def wait_port(self, port: int, service: Service, timeout: float = 30.0) -> None:
        def listening() -> bool:
            if not service.alive():
                pytest.fail(f"{service.name} exited with {service.proc.returncode}:\n{service.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
            return False

        wait_for(listening, timeout, what=f"{service.name} to listen on {port}")

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
        kill_marked_processes(self.marker)

    def logs(self) -> str:
        return "\n".join(f"===== {s.name} (pid {s.pid})\n{s.log()}" for s in self.services)


def kill_marked_processes(marker: str) -> None:
    """SIGKILLs this test's stray processes (tasks orphaned by a killed worker), found by the marker
    in their environment."""
    needle = marker.encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ + b"\0":
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


class Api:
    """A small JSON client for the scheduler's HTTP API."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # Sent with every request unless the call passes its own Authorization header.
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        data = (
            json.dumps(body).encode() if isinstance(body, dict) else (body.encode() if isinstance(body, str) else body)
        )
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={**self.auth, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError) as exc:
            # Nothing answered (not up yet, or gone): status 0, so callers can wait or assert on it.
            return 0, str(exc)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def schedule(self, command: str, delay_seconds: float = 0, **extra: Any) -> dict:
        status, doc = self.request("POST", "/schedule", {"command": command, "delay_seconds": delay_seconds, **extra})
        assert status == 200, (status, doc)
        return doc

    def status(self, task_id: str) -> dict:
        status, doc = self.request("GET", f"/status?task_id={task_id}")
        assert status == 200, (status, doc)
        return doc

    def wait_final(self, task_id: str, timeout: float = 20.0) -> dict:
        """Waits until the task is completed, failed or cancelled; returns its status document."""

        def final() -> dict | None:
            doc = self.status(task_id)
            return doc if doc["status"] in ("completed", "failed", "cancelled") else None

        return wait_for(final, timeout, what=f"task {task_id} to finish")  # type: ignore[return-value]


# --- an in-test coordinator

INPROGRESS = distrack_pb2.TaskStatus.INPROGRESS


def serve_in_test(add_servicer: Callable[[Any, grpc.Server], None], servicer: Any, threads: int = 4,
                  port: int = 0) -> tuple[grpc.Server, int]:
    """A started plaintext gRPC server for one servicer on a loopback port (a free one unless given;
    give the port of a server just stopped to start it again); stop it when done."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(threads))
    add_servicer(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound and (port == 0 or bound == port), f"could not listen on port {port}"
    server.start()
    return server, bound


class RecordingCoordinator(distrack_pb2_grpc.CoordinatorServicer):
    """A coordinator for a worker under test: records heartbeats and reports, and records every start
    unless told otherwise (deny_start); can refuse the next N reports with UNAVAILABLE."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.heartbeats: list[distrack_pb2.HeartbeatRequest] = []
        self.reports: list[distrack_pb2.TaskStatusUpdate] = []
        self.refuse_reports = 0
        self.refused = 0
        self.deny_start: set[str] = set()  # tasks whose INPROGRESS is answered "not recorded"
        self.worker_ttl_s = 3 * TEST_HEARTBEAT_S  # what a real coordinator with the test heartbeat says
        self.heartbeats_unanswered = False  # as if the worker were cut off from it (reports still pass)
        self.stop_task_ids: set[str] = set()  # runs every heartbeat answer tells the worker to stop
        self.cancel_task_ids: set[str] = set()  # of those, the ones to stop because their cancel was asked
        # When set: the next heartbeat's answer is decided, then held until `release` is set (`held` says
        # it is being held), as if the coordinator were slow to answer.
        self.hold_next_answer: tuple[threading.Event, threading.Event] | None = None

    def Heartbeat(self, request, context):
        with self.lock:
            if self.heartbeats_unanswered:
                context.abort(grpc.StatusCode.UNAVAILABLE, "unreachable (test)")
            self.heartbeats.append(request)
            stop = sorted(self.stop_task_ids)
            cancel = sorted(self.cancel_task_ids)
            hold, self.hold_next_answer = self.hold_next_answer, None
        if hold is not None:
            held, release = hold
            held.set()
            release.wait(10)
        return distrack_pb2.HeartbeatResponse(stop_task_ids=stop, cancel_task_ids=cancel,
                                              worker_ttl_s=self.worker_ttl_s)

    def ReportTasks(self, request, context):
        # Refused or recorded as a whole, like a coordinator whose database is down or up.
        with self.lock:
            if self.refuse_reports > 0:
                self.refuse_reports -= 1
                self.refused += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "database down (test)")
            self.reports.extend(request.updates)
            denied = [u.status == INPROGRESS and u.task_id in self.deny_start for u in request.updates]
        acks = [distrack_pb2.TaskStatusAck(recorded=not d) for d in denied]
        return distrack_pb2.TaskStatusAcks(acks=acks)

    def statuses(self, task_id: str) -> list[int]:
        with self.lock:
            return [r.status for r in self.reports if r.task_id == task_id]

    def final(self, task_id: str) -> distrack_pb2.TaskStatusUpdate | None:
        with self.lock:
            done = [r for r in self.reports if r.task_id == task_id and r.status != INPROGRESS]
        return done[-1] if done else None

    def Deregister(self, request, context):
        return distrack_pb2.DeregisterResponse()
