"""The environment a task's command gets: a clean one, not the worker's.

A worker's own environment holds what it needs to run (in Compose, the database password; always,
the cluster token when one is set). A task gets none of it: only a minimal base (PATH, the locale,
TZ, TMPDIR, USER and LOGNAME as the worker has them, and HOME set to the task directory), the
variables the operator allow-lists, and DISTRACK_TASK_ID, DISTRACK_ATTEMPT and DISTRACK_WORKER_ID.

The allow-list takes names and shell-style patterns (`AWS_*`). distrack's own credentials
(NEVER_PASSED) are never passed: named outright they are a ConfigError at start, so the operator
learns at once; a pattern just does not match them. A pattern that brings in a name that looks like
a secret is logged, so a broad pattern cannot leak one quietly.

A task runs as the worker's user, which would let it read the environment of every distrack
process of that user in /proc/<pid>/environ; `distrack.process.shield_process` closes that. Beyond
that, this keeps secrets out of a task's way but is not a sandbox: a task can read whatever the
worker's user can read (the token file, the TLS key), so run the worker as a user, or in a
container, that holds only what its tasks may see.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pwd
from collections.abc import Iterable, Mapping
from pathlib import Path

from distrack.errors import ConfigError

log = logging.getLogger(__name__)

TASK_DIR_ENV = "DISTRACK_TASK_DIR"
ALLOW_ENV = "DISTRACK_TASK_ENV_ALLOW"

# Passed as the worker has them, when it has them.
BASE_NAMES = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR")
BASE_PATTERNS = ("LC_*",)
# bash's own default when PATH is unset is odd (it includes `.`); this is Debian's login PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# distrack's own credentials, whatever the allow-list says.
NEVER_PASSED = (
    "DATABASE_URL",
    "POSTGRES_*",
    "PGPASSWORD",
    "PGPASSFILE",
    "DISTRACK_*TOKEN*",
    "DISTRACK_*KEY*",
    "DISTRACK_*SECRET*",
    "DISTRACK_*PASSWORD*",
)
# Names worth a warning when a pattern (not the name itself) lets them through.
SECRET_LOOKING = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*KEY*", "*CREDENTIAL*", "*_AUTH*")


def parse_allow_list(text: str) -> tuple[str, ...]:
    """`NAME,OTHER,PREFIX_*` (commas or spaces) as a tuple of names and patterns; ConfigError if it
    names one of distrack's own credentials."""
    return check_allow_list(tuple(item for item in text.replace(",", " ").split() if item))


def check_allow_list(allow: Iterable[str]) -> tuple[str, ...]:
    allow = tuple(allow)
    for item in allow:
        if not _is_pattern(item) and _matches(item, NEVER_PASSED):
            raise ConfigError(
                f"{ALLOW_ENV} names {item}, one of distrack's own credentials, which tasks never get; "
                f"give the task its own variable instead"
            )
    return allow


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_pattern(item: str) -> bool:
    return any(ch in item for ch in "*?[")


class TaskEnvironment:
    """Builds each task's environment from the worker's, computed once at start."""

    def __init__(self, task_dir: Path, allow: Iterable[str] = (), env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        allow = check_allow_list(allow)
        self.task_dir = task_dir
        base: dict[str, str] = {"PATH": DEFAULT_PATH}
        base.update({k: v for k, v in env.items() if k in BASE_NAMES or _matches(k, BASE_PATTERNS)})
        # HOME is the task directory: a place tasks may write to, apart from the worker's own home
        # and its dotfiles. Allow-list HOME to give tasks the worker's.
        base["HOME"] = str(task_dir)
        user = _user_name()
        if user:
            base["USER"] = base["LOGNAME"] = user
        passed = sorted(k for k in env if _matches(k, allow) and not _matches(k, NEVER_PASSED))
        base.update({k: env[k] for k in passed})
        self._base = base
        self.passed = passed
        self.withheld = sorted(k for k in env if _matches(k, allow) and _matches(k, NEVER_PASSED))
        explicit = set(allow)
        self.secret_looking = [k for k in passed if k not in explicit and _matches(k.upper(), SECRET_LOOKING)]

    def log_summary(self) -> None:
        log.info("tasks run in %s with a clean environment%s", self.task_dir,
                 f" plus {', '.join(self.passed)}" if self.passed else "")
        if self.withheld:
            log.info("not passed to tasks despite the allow-list (distrack's own credentials): %s",
                     ", ".join(self.withheld))
        if self.secret_looking:
            log.warning("tasks get %s through a pattern in %s; these look like secrets: name them outright "
                        "if that is meant", ", ".join(self.secret_looking), ALLOW_ENV)

    def for_task(self, task_id: str, attempt: int, worker_id: str) -> dict[str, str]:
        # The task learns who it is: handy for idempotent commands and for counting executions.
        return {**self._base, "DISTRACK_TASK_ID": task_id, "DISTRACK_ATTEMPT": str(attempt),
                "DISTRACK_WORKER_ID": worker_id}


def prepare_task_dir(path: str) -> Path:
    """The task directory, absolute and created (with its parents); OSError if it cannot be."""
    task_dir = Path(path).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    return task_dir


def _user_name() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no passwd entry, as under `docker run --user 1234`
        return None
