"""Runs one shell command: `bash -c CMD` in its own session (and process group), stdout and stderr to
one file, stdin from /dev/null.

The command is started with posix_spawn rather than subprocess.Popen: the same child, for about a third
of the parent's CPU (no Python-side fork preparation, and vfork-like spawning in the C library), called
so that the GIL is released while the child execs (see spawner). Its exit is awaited on a pidfd (Linux
5.3+) so a timeout needs no polling; without pidfds it polls.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from distrack.worker.spawner import spawn_session

# After SIGTERM, how long the process group gets before SIGKILL.
KILL_GRACE_S = 2.0
# The exit code reported for a run stopped before it began (as if ended by SIGTERM).
STOPPED_EXIT_CODE = 128 + signal.SIGTERM
# Where pidfds are missing, how often a wait looks at the child.
POLL_S = 0.005


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    error: str | None = None
    cancelled: bool = False

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.error is None


def output_path(output_dir: Path, worker_id: str, task_id: str) -> Path:
    return output_dir / f"{worker_id}_{task_id}.txt"


class Child:
    """A spawned process: waits for it with an optional timeout and reaps it exactly once (the run's
    thread and a stop may both wait). The pidfd is closed only once no thread polls it, so no poll ever
    lands on a number the kernel has handed to another file."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._waiters = 0
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The exit code (negative: killed by that signal), or None if still running after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._reap() is not None:
                    self._close_if_done()
                    return self.returncode
                pidfd = self._pidfd
                self._waiters += 1
            try:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                if pidfd is not None:
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    poller.poll(None if remaining is None else max(int(remaining * 1000), 1))
                else:
                    time.sleep(POLL_S if remaining is None else min(POLL_S, remaining))
            finally:
                with self._lock:
                    self._waiters -= 1
                    self._close_if_done()

    def _reap(self) -> int | None:
        """Holds _lock."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: cannot happen unless SIGCHLD is ignored
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _close_if_done(self) -> None:
        """Holds _lock."""
        if self.returncode is not None and self._waiters == 0 and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def spawn(command: str, output: Path, env: Mapping[str, str] | None = None) -> Child:
    """Starts `bash -c command` in a new session, output to `output`; raises OSError when it cannot."""
    with open(output, "wb") as out:
        # Its own session and process group, so a timeout or cancel can kill everything it started.
        pid = spawn_session("bash", ["bash", "-c", command], os.environ if env is None else env,
                            stdin_path=os.devnull, output_fd=out.fileno())
    return Child(pid)


class CommandRun:
    """One running command. `start()` spawns it, `wait()` returns its Outcome, `stop()` ends it early."""

    def __init__(self, command: str, output: Path, timeout_s: float | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.command = command
        self.output = output
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.env = env
        self.child: Child | None = None
        self._deadline: float | None = None
        self._stopped_because: str | None = None
        self._cancelled = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Spawns the command, unless it was stopped first; raises OSError when it cannot (say, the
        output file cannot be opened)."""
        with self._lock:
            if self._stopped_because is not None:
                return
            try:
                self.child = spawn(self.command, self.output, self.env)
            except FileNotFoundError:
                if self.output.parent.is_dir():
                    raise
                # The output folder was removed while the worker ran: make it again, once.
                self.output.parent.mkdir(parents=True, exist_ok=True)
                self.child = spawn(self.command, self.output, self.env)
        # The timeout counts from the start of the command, whatever reporting takes afterwards.
        if self.timeout_s is not None:
            self._deadline = time.monotonic() + self.timeout_s

    def wait(self) -> Outcome:
        if self.child is None:  # stopped before it started
            assert self._stopped_because is not None, "start() first"
            return Outcome(STOPPED_EXIT_CODE, self._stopped_because, cancelled=self._cancelled)
        try:
            remaining = None if self._deadline is None else max(self._deadline - time.monotonic(), 0)
            returncode = self.child.wait(remaining)
            if returncode is None:
                self.kill_group()
                return Outcome(124, f"timed out after {self.timeout_s:g} s")
        finally:
            # Whatever the command left running in the background goes with it.
            _signal_group(self.child.pid, signal.SIGKILL)
        with self._lock:
            if self._stopped_because is not None:
                return Outcome(128 - returncode if returncode < 0 else returncode, self._stopped_because,
                               cancelled=self._cancelled)
        if returncode < 0:
            return Outcome(128 - returncode, f"killed by {signal.Signals(-returncode).name}")
        return Outcome(returncode)

    @property
    def stop_reason(self) -> str | None:
        """Why stop() was called, if it was."""
        with self._lock:
            return self._stopped_because

    def stop(self, reason: str, *, cancelled: bool = False) -> None:
        """Ends the run early (TERM, then KILL), or keeps it from starting; `wait()` then reports
        `reason` as the error."""
        with self._lock:
            if self._stopped_because is not None:
                return
            self._stopped_because = reason
            self._cancelled = cancelled
            started = self.child is not None
        if started:
            threading.Thread(target=self.kill_group, name="stop-run", daemon=True).start()

    def kill_group(self) -> None:
        """TERM, then KILL after a grace period, to the whole process group."""
        assert self.child is not None
        _signal_group(self.child.pid, signal.SIGTERM)
        self.child.wait(KILL_GRACE_S)
        # Also reaches children that outlived the leader.
        _signal_group(self.child.pid, signal.SIGKILL)
        self.child.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
