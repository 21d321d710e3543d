"""A stack of the suites' own: `distrack up --workers N` on free ports, stopped by PID afterwards.

The stack runs in its own session, so a Ctrl-C in the terminal reaches only the benchmark, which then
stops the stack with SIGTERM (`distrack up` stops its services and the embedded PostgreSQL in order).
If the benchmark itself dies, the kernel sends `distrack up` SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# A first start runs initdb for the embedded PostgreSQL, a few seconds on a slow disk; then the
# services start one after the other. Anything past this is a stack that will not come up.
START_TIMEOUT_S = 120.0
# `distrack up` waits up to 40 s for workers to finish running tasks; the suites leave none running.
STOP_TIMEOUT_S = 60.0
# How long PostgreSQL gets for a fast shutdown when `distrack up` left it running.
POSTGRES_STOP_S = 10.0
READY_LINE = "Ctrl-C stops everything"
PR_SET_PDEATHSIG = 1
# Within one line only: [ \t], never \s, which would run on into the next line.
_PID_LINE = re.compile(r"^[ \t]+(\S.*?)[ \t]{2,}.*\(pid (\d+)\)[ \t]*$", re.MULTILINE)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def parse_service_pids(up_output: str) -> dict[str, int]:
    """`  worker 1     grpc (free port)  (pid 123)` lines of `distrack up` -> {"worker 1": 123, ...}."""
    return {match.group(1).strip(): int(match.group(2)) for match in _PID_LINE.finditer(up_output)}


def postgres_url_from_pid_file(text: str) -> str:
    """The libpq URL of an embedded PostgreSQL from its postmaster.pid (pid, data dir, start time,
    port, socket dir, ...): a Unix socket in the socket dir, as pgserver's own get_uri() builds it."""
    lines = text.splitlines()
    if len(lines) < 5 or not lines[3].strip() or not lines[4].strip():
        raise ValueError("postmaster.pid has no port and socket directory")
    return f"postgresql://postgres:@/postgres?host={lines[4].strip()}&port={lines[3].strip()}"


def configured_database_url(env: Mapping[str, str]) -> str | None:
    """DATABASE_URL, or one made of POSTGRES_*, exactly as the services read them; None when neither."""
    from distrack.config import database_url_from_env

    return database_url_from_env(env)


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when the benchmark dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class StackError(Exception):
    """The stack did not come up."""


@dataclass
class OwnStack:
    """`distrack up` with `workers` workers, its files under `work_dir` (kept across stacks, so the
    embedded PostgreSQL is made once). Use as a context manager: it is stopped on the way out."""

    workers: int
    work_dir: Path
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    url: str = ""
    database_url: str | None = None
    services: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    embedded: bool = False
    # The embedded PostgreSQL's postmaster (None for a configured database).
    postgres_pid: int | None = None

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"up-{self.workers}w.log"

    def __enter__(self) -> OwnStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        scheduler_port = free_port()
        configured = configured_database_url(self.env)
        self.embedded = configured is None
        argv = [sys.executable, "-m", "distrack", "up", f"--workers={self.workers}",
                f"--data_dir={self.data_dir}", f"--scheduler_port={scheduler_port}",
                f"--coordinator_port={free_port()}", "--worker_port=0",
                f"--output_dir={self.work_dir / 'output'}"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, env=dict(self.env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.work_dir, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        output = self._wait_ready()
        self.services = parse_service_pids(output)
        self.url = f"http://127.0.0.1:{scheduler_port}"
        if configured:
            self.database_url = configured
        else:
            pid_file = (self.data_dir / "postmaster.pid").read_text()
            self.database_url = postgres_url_from_pid_file(pid_file)
            self.postgres_pid = int(pid_file.split()[0])

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            output = self.log_path.read_text(errors="replace")
            if READY_LINE in output:
                return output
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"`distrack up` exited with code {self.proc.returncode}:\n{_tail(output)}")
            if time.monotonic() > deadline:
                raise StackError(f"`distrack up` was not up within {START_TIMEOUT_S:.0f} s:\n{_tail(output)}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to `distrack up` (it stops everything it started), SIGKILL if it hangs; then an
        embedded PostgreSQL it left behind gets a fast shutdown. Safe to call more than once."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.embedded:
            _stop_leftover_postgres(self.data_dir)


def _stop_leftover_postgres(data_dir: Path) -> None:
    """A postmaster still running on our own temporary data dir: ask it for a fast shutdown (SIGINT)."""
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + POSTGRES_STOP_S
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])
