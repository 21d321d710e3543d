"""Runs one shell command: `bash -c CMD` in its own process group, stdout and stderr to one file."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

# After SIGTERM, how long the process group gets before SIGKILL.
KILL_GRACE_S = 2.0


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.error is None


def output_path(output_dir: Path, worker_id: str, task_id: str) -> Path:
    return output_dir / f"{worker_id}_{task_id}.txt"


class CommandRun:
    """One running command. `start()` spawns it; `wait()` returns its Outcome."""

    def __init__(self, command: str, output: Path, timeout_s: float | None = None) -> None:
        self.command = command
        self.output = output
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Spawns the command; raises OSError when it cannot (say, the output file cannot be opened)."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", self.command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group, so a timeout or cancel can kill everything it started.
                start_new_session=True,
                close_fds=True,
            )

    def wait(self) -> Outcome:
        assert self.proc is not None, "start() first"
        try:
            returncode = self.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return Outcome(124, f"timed out after {self.timeout_s:g} s")
        if returncode < 0:
            name = signal.Signals(-returncode).name
            return Outcome(128 - returncode, f"killed by {name}")
        return Outcome(returncode)

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
    except ProcessLookupError:
        pass
