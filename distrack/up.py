"""`distrack up`: the whole stack on one machine, supervised by this process.

PostgreSQL (embedded with pgserver unless a database is configured), the migrations, then the
coordinator, the workers and the scheduler as child processes. Each child runs in its own session so
a Ctrl-C reaches only this process, which stops them in order: the scheduler (no new tasks), the
workers (running tasks finish and report), the coordinator, then PostgreSQL. Children also get
SIGTERM from the kernel if this process dies without cleaning up.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from distrack.apitoken import api_token_from_env
from distrack.config import database_url_from_env
from distrack.db.embedded import EmbeddedPostgres, default_data_dir
from distrack.db.migrate import migrate

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0  # a worker's shutdown grace (30 s) and some
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when `distrack up` dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    endpoint: str
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distrack", *self.argv],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def stop(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()


def _wait_for_port(host: str, port: int, child: Child, deadline: float) -> None:
    while time.monotonic() < deadline:
        if child.proc is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not listen on {host}:{port} within {READY_TIMEOUT_S:.0f} s")


def _wait_for_http(url: str, child: Child, deadline: float) -> None:
    while time.monotonic() < deadline:
        if child.proc is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1, context=_probe_context(url)) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not answer {url} within {READY_TIMEOUT_S:.0f} s")


def _probe_context(url: str) -> ssl.SSLContext | None:
    """For a scheduler on HTTPS (DISTRACK_HTTPS_CERT): the readiness probe only asks our own child
    whether it is up, over loopback, and sends nothing secret, so it does not check a certificate
    that may well name another host than the address probed."""
    if not url.startswith("https:"):
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _check_port_free(host: str, port: int, name: str) -> None:
    """Fails early, in one clear line, when a port is taken (rather than probing someone else's server)."""
    if port == 0:
        raise RuntimeError(f"the {name} needs a fixed port (0 is only for workers)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As servers do: connections of a previous run lingering in TIME_WAIT do not count, a
        # listening socket still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as exc:
            raise RuntimeError(f"the {name} cannot listen on {_hostport(host, port)}: {exc.strerror}") from None


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _auth_option(token: str | None) -> str:
    """The curl option that sends the token, naming where it comes from, never the token itself."""
    if token is None:
        return ""
    if os.environ.get("DISTRACK_API_TOKEN_FILE"):
        return ' -H "Authorization: Bearer $(cat $DISTRACK_API_TOKEN_FILE)"'
    return ' -H "Authorization: Bearer $DISTRACK_API_TOKEN"'


def run_up(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

    embedded: EmbeddedPostgres | None = None
    children: list[Child] = []
    # The scheduler child reads the same variables (its environment is this one); checking them
    # here fails a bad token file in one line, before PostgreSQL starts.
    token = api_token_from_env()
    try:
        _check_port_free(args.host, args.scheduler_port, "scheduler")
        _check_port_free(args.host, args.coordinator_port, "coordinator")
        for index in range(args.workers if args.worker_port else 0):
            _check_port_free(args.host, args.worker_port + index, f"worker {index + 1}")
        database_url = database_url_from_env()
        if database_url is None:
            data_dir = Path(args.data_dir or os.environ.get("DISTRACK_DATA_DIR") or default_data_dir())
            embedded = EmbeddedPostgres(data_dir)
            database_url = embedded.start()
            db_line = f"embedded PostgreSQL, data in {data_dir}"
        else:
            db_line = "PostgreSQL from DATABASE_URL / POSTGRES_*"
        applied = migrate(database_url)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))

        env = dict(os.environ, DATABASE_URL=database_url)
        host = args.host
        dial = _connect_host(host)
        tuning = [
            f"--heartbeat_interval_s={args.heartbeat_interval_s}",
        ]
        coordinator = Child(
            "coordinator",
            [
                "coordinator",
                f"--coordinator_port={_hostport(host, args.coordinator_port)}",
                *tuning,
                f"--poll_interval_s={args.poll_interval_s}",
                f"--heartbeat_misses={args.heartbeat_misses}",
                f"--ack_timeout_s={args.ack_timeout_s}",
                f"--retry_delay_s={args.retry_delay_s}",
            ],
            f"grpc {_hostport(dial, args.coordinator_port)}",
        )
        workers = []
        for index in range(args.workers):
            port = args.worker_port + index if args.worker_port else 0
            workers.append(
                Child(
                    f"worker {index + 1}",
                    [
                        "worker",
                        f"--worker_port={_hostport(host, port)}",
                        f"--coordinator={_hostport(dial, args.coordinator_port)}",
                        f"--output_dir={args.output_dir}",
                        f"--slots={args.slots}",
                        *([] if args.prefetch is None else [f"--prefetch={args.prefetch}"]),
                        *tuning,
                    ],
                    f"grpc {_hostport(dial, port) if port else '(free port)'}",
                )
            )
        scheme = "https" if os.environ.get("DISTRACK_HTTPS_CERT", "").strip() else "http"
        scheduler_url = f"{scheme}://{_hostport(dial, args.scheduler_port)}"
        scheduler = Child(
            "scheduler",
            ["scheduler", f"--scheduler_port={_hostport(host, args.scheduler_port)}"],
            scheduler_url,
        )

        deadline = time.monotonic() + READY_TIMEOUT_S
        children.append(coordinator)
        coordinator.start(env)
        _wait_for_port(dial, args.coordinator_port, coordinator, deadline)
        for worker in workers:
            children.append(worker)
            worker.start(env)
        for worker in workers:
            if worker.argv[1].endswith(":0"):
                continue
            _wait_for_port(dial, int(worker.argv[1].rsplit(":", 1)[1]), worker, deadline)
        children.append(scheduler)
        scheduler.start(env)
        _wait_for_http(f"{scheduler_url}/health", scheduler, deadline)

        lines = [f"  {'postgres':<12} {db_line}"]
        lines += [f"  {c.name:<12} {c.endpoint}  (pid {c.proc.pid})" for c in children if c.proc]
        lines.append(f"  {'output':<12} {Path(args.output_dir).resolve()}")
        print(
            "distrack is up:\n"
            + "\n".join(lines)
            + f'\nTry: curl -X POST {scheduler_url}/schedule{_auth_option(token)} -d \'{{"command": "echo hello", '
            '"delay_seconds": 0}\'\nCtrl-C stops everything.',
            flush=True,
        )

        while not stop.wait(0.5):
            for child in children:
                if child.proc is not None and child.proc.poll() is not None:
                    log.error("%s exited with code %s; stopping the stack", child.name, child.proc.returncode)
                    return 1
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        # The scheduler first (no new tasks), then workers (finish and report), then the coordinator.
        groups = [
            [c for c in children if c.name == "scheduler"],
            [c for c in children if c.name.startswith("worker")],
            [c for c in children if c.name == "coordinator"],
        ]
        for group in groups:
            threads = [threading.Thread(target=c.stop, args=(STOP_TIMEOUT_S,)) for c in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if embedded is not None:
            embedded.stop()
        print("distrack stopped", flush=True)
