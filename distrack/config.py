"""Configuration: frozen dataclasses built once at startup from flags and the environment.

Nothing here reads the environment at import time; `database_url_from_env` and the CLI do it when a
service starts, so tests can hand each service its own settings.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from distrack.errors import ConfigError
from distrack.transport import TransportSecurity

DEFAULT_SCHEDULER_PORT = 8081
DEFAULT_COORDINATOR_PORT = 8080
DEFAULT_WORKER_PORT = 8000

# The seed's liveness rule: a heartbeat every 3 s, and a worker is gone after 3 missed ones.
DEFAULT_HEARTBEAT_INTERVAL_S = 3.0
DEFAULT_HEARTBEAT_MISSES = 3
# NOTIFY wakes the coordinator at once; the poll only covers a lost notification or a restart.
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_SLOTS = 5
# A worker takes this many tasks per slot beyond its slots, to start as slots free (see the worker's
# service): enough to cover the time the coordinator takes to record an end and send the next task
# under load, lingers included. Measured end to end (3 workers x 5 slots, `echo hello`): 0.50-0.55 of
# the bash reference with 2, 0.61-0.69 with 4, 0.65 with 6.
PREFETCH_PER_SLOT = 4
# The most tasks a worker may run, or take beyond its slots: each is a thread of the worker's.
MAX_TASKS_PER_WORKER = 10_000


def default_prefetch(slots: int) -> int:
    return min(slots * PREFETCH_PER_SLOT, MAX_TASKS_PER_WORKER)


DEFAULT_SHUTDOWN_GRACE_S = 30.0
# Well under gunicorn's worker timeout (60 s), which would kill the process and every connection on it.
DEFAULT_STATEMENT_TIMEOUT_S = 10.0
# PostgreSQL's statement_timeout is a 32-bit count of milliseconds: about 24.8 days.
MAX_STATEMENT_TIMEOUT_S = (2**31 - 1) // 1000
# First retry delay; each further attempt doubles it (with jitter).
DEFAULT_RETRY_DELAY_S = 1.0
# Relative to where the worker starts, like its output folder.
DEFAULT_TASK_DIR = "worker_tasks"


def check_statement_timeout(value: object) -> float:
    """`value` as a statement timeout in seconds: a number greater than 0 and at most
    MAX_STATEMENT_TIMEOUT_S, else a ConfigError (beyond it, PostgreSQL would refuse every connection's
    setup, and every request would get 503)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_STATEMENT_TIMEOUT_S:
        raise ConfigError(f"statement_timeout_s must be a number of seconds greater than 0 and at most "
                          f"{MAX_STATEMENT_TIMEOUT_S}, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class Address:
    """A listen or dial address given as `:8081`, `8081` or `host:8081`."""

    host: str
    port: int

    def bind_target(self) -> str:
        """Where a server listens: every interface when no host was given."""
        return f"{_bracket(self.host) if self.host else '0.0.0.0'}:{self.port}"

    def dial_target(self) -> str:
        """Where a client connects: this machine when no host was given."""
        return f"{_bracket(self.host) if self.host else 'localhost'}:{self.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def parse_address(text: str, *, what: str = "address", allow_zero: bool = False) -> Address:
    """Parses `:8081`, `8081`, `host:8081` or `[::1]:8081`; raises ConfigError otherwise.

    Port 0 (a free port chosen by the system) only where `allow_zero`: fine to listen on, not to dial.
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    host = host.strip("[]")
    low = 0 if allow_zero else 1
    if not port_text.isdigit() or not low <= int(port_text) < 65536:
        raise ConfigError(f"{what} {text!r} is not a port, ':port' or 'host:port' (port {low}-65535)")
    return Address(host, int(port_text))


def parse_addresses(text: str, *, what: str = "address") -> tuple[Address, ...]:
    """A comma-separated list of addresses (`host1:8080,host2:8080`); port 0 is not allowed."""
    parts = [p for p in (part.strip() for part in text.split(",")) if p]
    if not parts:
        raise ConfigError(f"{what} {text!r} names no address")
    return tuple(parse_address(p, what=what) for p in parts)


def database_url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """`DATABASE_URL`, else a URL built from the seed's `POSTGRES_*` variables, else None."""
    env = os.environ if env is None else env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return url
    db = env.get("POSTGRES_DB", "").strip()
    user = env.get("POSTGRES_USER", "").strip()
    if not db and not user:
        return None
    password = env.get("POSTGRES_PASSWORD", "")
    host = env.get("POSTGRES_HOST", "localhost").strip() or "localhost"
    port = env.get("POSTGRES_PORT", "5432").strip() or "5432"
    credentials = quote(user or "postgres", safe="")
    if password:
        credentials += ":" + quote(password, safe="")
    return f"postgresql://{credentials}@{_bracket(host)}:{port}/{quote(db or user, safe='')}"


def require_database_url(env: Mapping[str, str] | None = None) -> str:
    url = database_url_from_env(env)
    if url is None:
        raise ConfigError(
            "no database configured: set DATABASE_URL, or POSTGRES_DB/POSTGRES_USER/POSTGRES_PASSWORD "
            "(with POSTGRES_HOST and POSTGRES_PORT), or run `distrack up` to use an embedded PostgreSQL"
        )
    return url


def is_loopback_host(host: str) -> bool:
    """Whether a listen host is reachable from this machine only. '' (every interface) is not; a
    name counts only when every address it resolves to is a loopback one."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


@dataclass(frozen=True)
class SchedulerConfig:
    database_url: str
    listen: Address = Address("", DEFAULT_SCHEDULER_PORT)
    # 0 means "suit the machine" (see distrack.scheduler.server).
    http_workers: int = 0
    http_threads: int = 0
    max_body_bytes: int = 1024 * 1024
    # A request's SQL statement running longer than this is cancelled and the request gets 503.
    statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S
    # HTTPS through gunicorn when both are set (PEM files).
    https_cert: str | None = None
    https_key: str | None = None
    # None: no token, every request is served. Kept out of repr so it never reaches a log.
    api_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CoordinatorConfig:
    database_url: str
    listen: Address = Address("", DEFAULT_COORDINATOR_PORT)
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    heartbeat_misses: int = DEFAULT_HEARTBEAT_MISSES
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S
    # How long one SubmitTasks call may take (and never past half of ack_timeout_s after the claim).
    dispatch_timeout_s: float = 5.0
    # A dispatch must reach its worker within half of this after the claim; a task picked this long
    # ago, not reported started, and not listed by a heartbeat of its worker since, goes back to the
    # queue.
    ack_timeout_s: float = 30.0
    # Testing only (DISTRACK_FAULT_CLAIM_DELAY_S): a pause between a claim's commit and its dispatch,
    # so fault-injection tests can kill the coordinator inside that window.
    fault_claim_delay_s: float = 0.0
    # The cluster token and TLS for its gRPC server and its calls to workers.
    security: TransportSecurity = field(default_factory=TransportSecurity)

    @property
    def worker_ttl_s(self) -> float:
        """A worker silent for this long is declared lost."""
        return self.heartbeat_interval_s * self.heartbeat_misses

    @property
    def registry_refresh_s(self) -> float:
        """How often the shared worker registry is read back from the database."""
        return min(self.heartbeat_interval_s, self.poll_interval_s) / 2


@dataclass(frozen=True)
class WorkerConfig:
    # The coordinators to heartbeat and report to: the first, then the next while it is unreachable.
    coordinators: tuple[Address, ...] = (Address("", DEFAULT_COORDINATOR_PORT),)
    listen: Address = Address("", DEFAULT_WORKER_PORT)
    output_dir: str = "worker_output"
    slots: int = DEFAULT_SLOTS
    # Tasks taken beyond the slots, waiting for one.
    prefetch: int = default_prefetch(DEFAULT_SLOTS)
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    # `WORKER_ADDRESS` from the environment: the host other machines use to reach this worker.
    advertise_host: str | None = None
    # How long a status report is retried while the coordinator is unreachable: as long as the
    # worker runs, in effect (a day).
    report_retry_s: float = 24 * 3600.0
    # A limit for tasks that come without their own timeout_seconds; 0 means none.
    task_timeout_s: float = 0.0
    # On SIGTERM, how long running tasks get to finish before they are stopped.
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    # The cluster token and TLS for its gRPC server and its calls to the coordinators.
    security: TransportSecurity = field(default_factory=TransportSecurity)
    # The working directory of every task (created at start); also their HOME.
    task_dir: str = DEFAULT_TASK_DIR
    # Names (or shell-style patterns) of the worker's environment variables that tasks also get.
    task_env_allow: tuple[str, ...] = ()
