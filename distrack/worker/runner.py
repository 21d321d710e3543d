"""Runs one shell command: `bash -c CMD` in its own process group, stdout and stderr to one file."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# After SIGTERM, how long the process group gets before SIGKILL.
KILL_GRACE_S = 2.0
# The exit code reported for a run stopped before it began (as if ended by SIGTERM).
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


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


class CommandRun:
    """One running command. `start()` spawns it, `wait()` returns its Outcome, `stop()` ends it early."""

    def __init__(self, command: str, output: Path, timeout_s: float | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.command = command
        self.output = output
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._deadline: float | None = None
        self._stopped_because: str | None = None
        self._cancelled = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Spawns the command, unless it was stopped first; raises OSError when it cannot (say, the
        output file cannot be opened)."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.output, "wb") as out:
            if self._stopped_because is not None:
                return
            self.proc = subprocess.Popen(
                ["bash", "-c", self.command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # Its own process group, so a timeout or cancel can kill everything it started.
                start_new_session=True,
                close_fds=True,
            )
        # The timeout counts from the start of the command, whatever reporting takes afterwards.
        if self.timeout_s is not None:
            self._deadline = time.monotonic() + self.timeout_s

    def wait(self) -> Outcome:
        if self.proc is None:  # stopped before it started
            assert self._stopped_because is not None, "start() first"
            return Outcome(STOPPED_EXIT_CODE, self._stopped_because, cancelled=self._cancelled)
        try:
            remaining = None if self._deadline is None else max(self._deadline - time.monotonic(), 0)
            returncode = self.proc.wait(remaining)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return Outcome(124, f"timed out after {self.timeout_s:g} s")
        finally:
            # Whatever the command left running in the background goes with it.
            _signal_group(self.proc.pid, signal.SIGKILL)
        with self._lock:
            if self._stopped_because is not None:
                return Outcome(128 - returncode if returncode < 0 else returncode, self._stopped_because,
                               cancelled=self._cancelled)
        if returncode < 0:
            return Outcome(128 - returncode, f"killed by {signal.Signals(-returncode).name}")
        return Outcome(returncode)

    def stop(self, reason: str, *, cancelled: bool = False) -> None:
        """Ends the run early (TERM, then KILL), or keeps it from starting; `wait()` then reports
        `reason` as the error."""
        with self._lock:
            if self._stopped_because is not None:
                return
            self._stopped_because = reason
            self._cancelled = cancelled
            started = self.proc is not None
        if started:
            threading.Thread(target=self.kill_group, name="stop-run", daemon=True).start()

    def kill_group(self) -> None:
        """TERM, then KILL after a grace period, to the whole process group."""
        assert self.proc is not None
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        # Also reaches children that outlived the leader.
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
