"""How task commands are started: a session of their own, the signals a shell expects, the exact
environment given, and a clear error when the program is missing; both through the C library (the
GIL-free path) and through os.posix_spawnp (the fallback)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from distrack.worker import spawner


@pytest.fixture(params=["libc", "os.posix_spawnp"])
def path(request, monkeypatch):
    if request.param == "os.posix_spawnp":
        monkeypatch.setattr(spawner, "_libc", None)
    else:
        assert spawner._libc is not None, "this platform's C library should offer posix_spawn"
    return request.param


def run(tmp_path: Path, script: str, env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """(pid, exit status, output) of `bash -c script`."""
    out_path = tmp_path / "out.txt"
    with open(out_path, "wb") as out:
        pid = spawner.spawn_session("bash", ["bash", "-c", script], env if env is not None else {"PATH": os.defpath},
                                    stdin_path=os.devnull, output_fd=out.fileno())
    _, status = os.waitpid(pid, 0)
    return pid, os.waitstatus_to_exitcode(status), out_path.read_text()


def status_mask(text: str, field: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1], 16)


def test_sigpipe_and_sigxfsz_are_not_ignored_and_nothing_is_blocked(path, tmp_path):
    # This process ignores SIGPIPE (Python does), which a plain posix_spawn would pass on.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    _, code, out = run(tmp_path, "cat /proc/self/status")
    assert code == 0
    ignored = status_mask(out, "SigIgn")
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the task"
    assert status_mask(out, "SigBlk") == 0


def test_a_pipeline_into_head_ends_quietly(path, tmp_path):
    _, code, out = run(tmp_path, "yes | head -n 2")
    assert (code, out) == (0, "y\ny\n")  # no "Broken pipe" from yes


def test_the_child_leads_its_own_session_with_stdin_from_dev_null(path, tmp_path):
    pid, code, out = run(tmp_path, "ps -o sid= -o pgid= -p $$; readlink /proc/self/fd/0; echo err >&2")
    sid, pgid = (int(x) for x in out.split()[:2])
    assert (sid, pgid) == (pid, pid)
    assert out.split()[2:] == ["/dev/null", "err"]


def test_the_environment_is_exactly_the_one_given(path, tmp_path):
    env = {"PATH": os.defpath, "ONLY_THIS": "caf\u00e9 and spaces"}
    _, code, out = run(tmp_path, "env | grep -v -E '^(PWD|SHLVL|_)=' | sort", env)
    assert out.splitlines() == ["ONLY_THIS=caf\u00e9 and spaces", f"PATH={os.defpath}"]


def test_a_missing_program_is_a_file_not_found_error(path, tmp_path):
    with open(tmp_path / "out.txt", "wb") as out, pytest.raises(FileNotFoundError):
        spawner.spawn_session("no-such-program-distrack", ["no-such-program-distrack"], {"PATH": os.defpath},
                              stdin_path=os.devnull, output_fd=out.fileno())


def test_a_nul_in_an_argument_or_the_environment_is_refused_not_cut_short(path, tmp_path):
    with open(tmp_path / "out.txt", "wb") as out:
        for argv, env in ((["bash", "-c", "echo a\0b"], {"PATH": os.defpath}),
                          (["bash", "-c", "true"], {"PATH": os.defpath, "X": "a\0b"})):
            with pytest.raises(ValueError):
                spawner.spawn_session("bash", argv, env, stdin_path=os.devnull, output_fd=out.fileno())
