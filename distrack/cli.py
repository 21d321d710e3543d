"""The `distrack` command: one subcommand per service, plus `migrate` and `up`, and the client
commands `submit`, `status` and `cancel` that talk to a running scheduler.

Flags keep the seed's spelling (`--scheduler_port=:8081`); the dashed spelling works too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from distrack import config as cfg
from distrack.apitoken import api_token_from_env
from distrack.db.store import MAX_RETRY_DELAY_S
from distrack.errors import ConfigError, DistrackError
from distrack.transport import TransportSecurity, load_cert_pair, security_from_env
from distrack.worker.environment import ALLOW_ENV, TASK_DIR_ENV, parse_allow_list

log = logging.getLogger("distrack")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """Adds `--name_with_underscores` and its `--dashed-name` twin."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*names, dest=name, **kwargs)


def _address(what: str, allow_zero: bool = True):  # noqa: ANN202
    def parse(text: str) -> cfg.Address:
        try:
            return cfg.parse_address(text, what=what, allow_zero=allow_zero)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _addresses(what: str):  # noqa: ANN202
    def parse(text: str) -> tuple[cfg.Address, ...]:
        try:
            return cfg.parse_addresses(text, what=what)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _positive(kind: type):  # noqa: ANN202
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return parse


def _statement_timeout(text: str) -> float:
    try:
        return cfg.check_statement_timeout(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tasks_per_worker(minimum: int):  # noqa: ANN202
    """A number of tasks a worker holds (--slots, --prefetch): heartbeats carry it as a 32-bit integer,
    and each is a thread."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not minimum <= value <= cfg.MAX_TASKS_PER_WORKER:
            raise argparse.ArgumentTypeError(f"{text!r} must be from {minimum} to {cfg.MAX_TASKS_PER_WORKER:,}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _retry_delay(text: str) -> float:
    value = _non_negative(text)
    if value > MAX_RETRY_DELAY_S:
        raise argparse.ArgumentTypeError(f"{text!r} is over the {MAX_RETRY_DELAY_S:g} s cap")
    return value


def _add_coordinator_tuning(parser: argparse.ArgumentParser) -> None:
    _flag(
        parser,
        "poll_interval_s",
        type=_positive(float),
        default=cfg.DEFAULT_POLL_INTERVAL_S,
        help="longest wait between two looks at the queue when no NOTIFY arrives (default %(default)s)",
    )
    _flag(
        parser,
        "heartbeat_misses",
        type=_positive(int),
        default=cfg.DEFAULT_HEARTBEAT_MISSES,
        help="missed heartbeats after which a worker is declared lost and its tasks rescued (default %(default)s)",
    )
    _flag(
        parser,
        "ack_timeout_s",
        type=_positive(float),
        default=30.0,
        help="a dispatch must reach its worker within half of this many seconds after the claim; a task "
        "not reported started that its worker's heartbeats, this long after the claim, do not list goes "
        "back to the queue (default %(default)s)",
    )
    _flag(
        parser,
        "retry_delay_s",
        type=_retry_delay,
        default=cfg.DEFAULT_RETRY_DELAY_S,
        help="delay before the first retry of a failed task with attempts left; doubles each time, "
        "with jitter, up to an hour (default %(default)s)",
    )


def _add_heartbeat_interval(parser: argparse.ArgumentParser) -> None:
    _flag(
        parser,
        "heartbeat_interval_s",
        type=_positive(float),
        default=cfg.DEFAULT_HEARTBEAT_INTERVAL_S,
        help="seconds between a worker's heartbeats (default %(default)s)",
    )


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    _flag(
        parser,
        "output_dir",
        default="worker_output",
        help="folder for task output, one file <worker_id>_<task_id>.txt per task (default %(default)s)",
    )
    _flag(
        parser,
        "slots",
        type=_tasks_per_worker(1),
        default=cfg.DEFAULT_SLOTS,
        help="tasks a worker runs at once (default %(default)s)",
    )
    _flag(
        parser,
        "prefetch",
        type=_tasks_per_worker(0),
        default=None,
        help="tasks a worker takes beyond its slots, each to start as a slot frees: keeps the slots busy "
        "between dispatches; it refuses more (default: four times --slots; 0 takes none)",
    )


def _add_transport_options(parser: argparse.ArgumentParser) -> None:
    """The cluster token and TLS, shared by the coordinator and the workers (README, Security)."""
    _flag(parser, "cluster_token_file", default=None, metavar="FILE",
          help="file holding the cluster token every gRPC call must carry (default: DISTRACK_CLUSTER_TOKEN_FILE; "
               "or the token itself in DISTRACK_CLUSTER_TOKEN, never as a flag, which `ps` would show)")
    _flag(parser, "tls_cert", default=None, metavar="PEM",
          help="certificate for TLS on gRPC, served and presented to servers (default: DISTRACK_TLS_CERT)")
    _flag(parser, "tls_key", default=None, metavar="PEM", help="its private key (default: DISTRACK_TLS_KEY)")
    _flag(parser, "tls_ca", default=None, metavar="PEM",
          help="CA that signs the cluster's certificates: servers then require client certificates (mutual "
               "TLS) and clients check servers against it (default: DISTRACK_TLS_CA)")
    _flag(parser, "tls_server_name", default=None, metavar="NAME",
          help="name to check server certificates against instead of the host dialled "
               "(default: DISTRACK_TLS_SERVER_NAME)")


def _security(args: argparse.Namespace) -> TransportSecurity:
    security = security_from_env(token_file=args.cluster_token_file, cert_file=args.tls_cert,
                                 key_file=args.tls_key, ca_file=args.tls_ca, server_name=args.tls_server_name)
    security.require_server_credentials()
    return security


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distrack",
        description="A distributed task scheduler for shell commands, with PostgreSQL as its queue.",
        epilog="Database: DATABASE_URL, or POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_HOST "
        "(default localhost), POSTGRES_PORT (default 5432). HTTP API token: DISTRACK_API_TOKEN or "
        "DISTRACK_API_TOKEN_FILE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "scheduler",
        help="HTTP API that accepts tasks and answers status (gunicorn)",
        description="Serves POST /schedule and GET /status over HTTP with gunicorn. With DISTRACK_API_TOKEN "
        "(or DISTRACK_API_TOKEN_FILE, a file holding it) set, every request but GET /health needs "
        "'Authorization: Bearer <token>'; without one, listening beyond loopback logs a warning.",
    )
    _flag(
        p,
        "scheduler_port",
        type=_address("scheduler port"),
        default=cfg.Address("", cfg.DEFAULT_SCHEDULER_PORT),
        help="where to listen: ':8081', '8081' or 'host:8081' (default :8081)",
    )
    _flag(
        p,
        "http_workers",
        type=_positive(int),
        default=0,
        help="gunicorn worker processes (default: one per CPU, at least 2)",
    )
    _flag(p, "http_threads", type=_positive(int), default=0,
          help="connections each gunicorn worker serves at once, a thread each (default 256)")
    _flag(
        p,
        "max_body_bytes",
        type=_positive(int),
        default=1024 * 1024,
        help="largest request body accepted; larger ones get 413 (default %(default)s)",
    )
    _flag(p, "statement_timeout_s", type=_statement_timeout, default=cfg.DEFAULT_STATEMENT_TIMEOUT_S,
          help="longest a request's SQL statement may run (waiting on a lock, say); the request then "
          "gets 503 and nothing of it is stored (default %(default)g)")
    _flag(p, "https_cert", default=None, metavar="PEM",
          help="serve HTTPS with this certificate (chain) (default: DISTRACK_HTTPS_CERT)")
    _flag(p, "https_key", default=None, metavar="PEM", help="its private key (default: DISTRACK_HTTPS_KEY)")

    p = sub.add_parser(
        "coordinator",
        help="claims due tasks and dispatches them to workers over gRPC",
        description="Tracks workers by heartbeat, claims due tasks from PostgreSQL and "
        "dispatches them round-robin to workers with free slots.",
    )
    _flag(
        p,
        "coordinator_port",
        type=_address("coordinator port"),
        default=cfg.Address("", cfg.DEFAULT_COORDINATOR_PORT),
        help="where to listen for gRPC: ':8080', '8080' or 'host:8080' (default :8080)",
    )
    _add_heartbeat_interval(p)
    _add_coordinator_tuning(p)
    _add_transport_options(p)

    p = sub.add_parser(
        "worker",
        help="runs tasks (bash -c) and reports to the coordinator",
        description="Runs each task with `bash -c` in its own process group, writes its "
        "output to a file and reports its status. Set WORKER_ADDRESS to the "
        "host name other machines use to reach this worker.",
    )
    _flag(
        p,
        "worker_port",
        type=_address("worker port"),
        default=cfg.Address("", cfg.DEFAULT_WORKER_PORT),
        help="where to listen for gRPC: ':8000', '8000' or 'host:8000'; 0 picks a free port (default :8000)",
    )
    _flag(
        p,
        "coordinator",
        type=_addresses("coordinator address"),
        default=(cfg.Address("", cfg.DEFAULT_COORDINATOR_PORT),),
        help="the coordinator to heartbeat and report to: ':8080' or 'host:8080' (default :8080); "
        "several, comma-separated, to fail over to the next while one is unreachable",
    )
    _add_worker_options(p)
    _add_heartbeat_interval(p)
    _flag(p, "task_timeout_s", type=_non_negative, default=0.0,
          help="time limit for tasks scheduled without timeout_seconds; 0 means none (default %(default)s)")
    _flag(p, "shutdown_grace_s", type=_non_negative, default=cfg.DEFAULT_SHUTDOWN_GRACE_S,
          help="on SIGTERM, how long running tasks may finish before they are stopped and handed back "
               "(default %(default)s)")
    _flag(p, "task_dir", default=None, metavar="DIR",
          help=f"working directory and HOME of every task, created at start (default: {TASK_DIR_ENV}, "
               f"else {cfg.DEFAULT_TASK_DIR})")
    _flag(p, "task_env_allow", default=None, metavar="NAMES",
          help=f"the worker's environment variables tasks also get, comma-separated names or patterns such as "
               f"AWS_*; tasks get a clean environment otherwise (default: {ALLOW_ENV})")
    _add_transport_options(p)

    sub.add_parser(
        "migrate",
        help="applies the SQL migrations (idempotent)",
        description="Applies sql/migrations/ in order, each once, recording what ran.",
    )

    p = sub.add_parser(
        "up",
        help="the whole stack on this machine in one command",
        description="Starts PostgreSQL (embedded unless a database is configured), applies "
        "the migrations, then a coordinator, N workers and the scheduler. "
        "Ctrl-C or SIGTERM stops everything.",
    )
    _flag(p, "workers", type=_positive(int), default=3, help="how many workers (default %(default)s)")
    _flag(
        p, "host", default="127.0.0.1", help="interface the services listen on (default %(default)s: this machine only)"
    )
    _flag(p, "scheduler_port", type=int, default=cfg.DEFAULT_SCHEDULER_PORT, help="default %(default)s")
    _flag(p, "coordinator_port", type=int, default=cfg.DEFAULT_COORDINATOR_PORT, help="default %(default)s")
    _flag(
        p,
        "worker_port",
        type=int,
        default=cfg.DEFAULT_WORKER_PORT,
        help="first worker's port; the others take the next ones; 0 picks free ports (default %(default)s)",
    )
    _flag(
        p,
        "data_dir",
        default=None,
        help="embedded PostgreSQL data folder, kept between runs (default: DISTRACK_DATA_DIR, else "
        "the user data folder, e.g. ~/.local/share/distrack/pgdata)",
    )
    _add_worker_options(p)
    _add_heartbeat_interval(p)
    _add_coordinator_tuning(p)
    _add_client_commands(sub)
    return parser


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    token_note = ("Sends DISTRACK_API_TOKEN (or the contents of DISTRACK_API_TOKEN_FILE) as a bearer token "
                  "when set. Prints the task as JSON; exits 1 when the scheduler refuses or cannot be reached.")

    def url_flag(parser: argparse.ArgumentParser) -> None:
        _flag(parser, "url", default=None,
              help="the scheduler's base URL (default: $SCHEDULER_URL, else http://localhost:8081)")

    p = sub.add_parser("submit", help="schedule a command on a running scheduler",
                       description="Schedules COMMAND (POST /schedule). " + token_note)
    p.add_argument("task_command", metavar="COMMAND", help="the shell command, run with `bash -c`")
    _flag(p, "delay_seconds", type=float, default=0.0, help="seconds from now until it is due (default 0)")
    _flag(p, "max_attempts", type=int, default=None, help="runs allowed, 1 to 100 (default 1)")
    _flag(p, "timeout_seconds", type=float, default=None, help="kill the command after this many seconds")
    url_flag(p)
    for name, text in (("status", "shows a task's status (GET /tasks/ID)"),
                       ("cancel", "cancels a queued or running task (POST /tasks/ID/cancel)")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". " + token_note)
        p.add_argument("task_id", metavar="TASK_ID")
        url_flag(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distrack.process import setup_logging, shield_process

    setup_logging(args.command)
    if not shield_process():
        log.warning("could not make this process non-dumpable: tasks run as its user may read its environment")
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"distrack {args.command}: {exc}", file=sys.stderr)
        return 2
    except (DistrackError, OSError) as exc:
        print(f"distrack {args.command}: {exc}", file=sys.stderr)
        return 1


def _https(args: argparse.Namespace) -> dict[str, str]:
    cert = args.https_cert or os.environ.get("DISTRACK_HTTPS_CERT", "").strip() or None
    key = args.https_key or os.environ.get("DISTRACK_HTTPS_KEY", "").strip() or None
    if not cert and not key:
        return {}
    load_cert_pair(cert, key, what="HTTPS", cert_env="DISTRACK_HTTPS_CERT (--https_cert)",
                   key_env="DISTRACK_HTTPS_KEY (--https_key)")
    return {"https_cert": cert, "https_key": key}


def _run(args: argparse.Namespace) -> int:
    if args.command == "migrate":
        from distrack.db.migrate import migrate

        applied = migrate(cfg.require_database_url())
        print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
        return 0
    if args.command == "scheduler":
        from distrack.scheduler.server import serve as serve_scheduler

        serve_scheduler(
            cfg.SchedulerConfig(
                database_url=cfg.require_database_url(),
                listen=args.scheduler_port,
                http_workers=args.http_workers,
                http_threads=args.http_threads,
                max_body_bytes=args.max_body_bytes,
                statement_timeout_s=args.statement_timeout_s,
                api_token=api_token_from_env(),
                **_https(args),
            )
        )
        return 0
    if args.command == "coordinator":
        from distrack.coordinator.server import serve as serve_coordinator
        from distrack.process import stop_on_signals

        serve_coordinator(
            cfg.CoordinatorConfig(
                database_url=cfg.require_database_url(),
                listen=args.coordinator_port,
                poll_interval_s=args.poll_interval_s,
                heartbeat_interval_s=args.heartbeat_interval_s,
                heartbeat_misses=args.heartbeat_misses,
                ack_timeout_s=args.ack_timeout_s,
                retry_delay_s=args.retry_delay_s,
                fault_claim_delay_s=float(os.environ.get("DISTRACK_FAULT_CLAIM_DELAY_S") or 0),
                security=_security(args),
            ),
            stop_on_signals(),
        )
        return 0
    if args.command == "worker":
        from distrack.process import stop_on_signals
        from distrack.worker.server import serve as serve_worker

        serve_worker(
            cfg.WorkerConfig(
                coordinators=args.coordinator,
                listen=args.worker_port,
                output_dir=args.output_dir,
                slots=args.slots,
                prefetch=cfg.default_prefetch(args.slots) if args.prefetch is None else args.prefetch,
                heartbeat_interval_s=args.heartbeat_interval_s,
                advertise_host=os.environ.get("WORKER_ADDRESS", "").strip() or None,
                task_timeout_s=args.task_timeout_s,
                shutdown_grace_s=args.shutdown_grace_s,
                security=_security(args),
                task_dir=args.task_dir or os.environ.get(TASK_DIR_ENV, "").strip() or cfg.DEFAULT_TASK_DIR,
                task_env_allow=parse_allow_list(
                    args.task_env_allow if args.task_env_allow is not None else os.environ.get(ALLOW_ENV, "")),
            ),
            stop_on_signals(),
        )
        return 0
    if args.command == "up":
        from distrack.up import run_up

        return run_up(args)
    if args.command in ("submit", "status", "cancel"):
        from distrack.client import run_client

        return run_client(args)
    raise AssertionError(args.command)
