"""Serves the scheduler app with gunicorn: worker processes with a thread per connection (see
httpworker), each with its own pool after the fork."""

from __future__ import annotations

import logging
import os

from gunicorn.app.base import BaseApplication

from distrack.config import Address, SchedulerConfig, is_loopback_host

log = logging.getLogger(__name__)

# Connections each worker process serves at once, a thread each; more wait to be accepted. Requests
# are short and share their inserts (group_insert), so a few database connections serve them all;
# keep-alive lets a client reuse its connection instead of paying a TCP handshake per task.
CONNECTIONS_PER_WORKER = 256
DATABASE_CONNECTIONS_PER_WORKER = 8
KEEPALIVE_S = 30
# What gunicorn reads before the app sees a request, stated here so the README's limits have one
# source (these are gunicorn's defaults): a longer request line gets 414, a longer header or more
# headers 431, as plain HTML from gunicorn.
LIMIT_REQUEST_LINE_BYTES = 4094
LIMIT_REQUEST_FIELD_BYTES = 8190
LIMIT_REQUEST_FIELDS = 100
# As for the cluster token (distrack.transport.MIN_TOKEN_CHARS).
MIN_API_TOKEN_CHARS = 16


def default_http_workers() -> int:
    return max(2, min(os.cpu_count() or 1, 8))


class SchedulerApplication(BaseApplication):
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        config = self.config
        settings = {
            "bind": [config.listen.bind_target()],
            "workers": config.http_workers or default_http_workers(),
            # One thread per open connection (see httpworker): gthread's hand-offs between its poller
            # and its pool cost more CPU per request than the request itself.
            "worker_class": "distrack.scheduler.httpworker.ConnectionThreadWorker",
            "worker_connections": config.http_threads or CONNECTIONS_PER_WORKER,
            "keepalive": KEEPALIVE_S,
            "limit_request_line": LIMIT_REQUEST_LINE_BYTES,
            "limit_request_field_size": LIMIT_REQUEST_FIELD_BYTES,
            "limit_request_fields": LIMIT_REQUEST_FIELDS,
            "graceful_timeout": 10,
            "timeout": 60,
            "proc_name": "distrack-scheduler",
            "accesslog": os.environ.get("DISTRACK_ACCESS_LOG") or None,
            "errorlog": "-",
            "loglevel": os.environ.get("DISTRACK_LOG_LEVEL", "info").lower(),
            "worker_exit": _close_pool,
        }
        if config.https_cert:
            settings.update(certfile=config.https_cert, keyfile=config.https_key)
        # gunicorn 27 opens a control socket at one fixed path per user, which a second scheduler on
        # the same machine would fight over; distrack does not use it.
        if "control_socket_disable" in self.cfg.settings:
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):  # noqa: ANN201 - the WSGI app
        # Runs in each gunicorn worker after the fork, so every process owns its own pool.
        from distrack.db.pool import make_pool
        from distrack.db.store import TaskStore
        from distrack.process import freeze_startup_objects
        from distrack.scheduler.app import create_app

        pool = make_pool(self.config.database_url, max_size=DATABASE_CONNECTIONS_PER_WORKER, name="scheduler",
                         statement_timeout_s=self.config.statement_timeout_s)
        _pools.append(pool)
        app = create_app(TaskStore(pool), max_body_bytes=self.config.max_body_bytes, api_token=self.config.api_token)
        freeze_startup_objects()
        return app


_pools: list = []


def _close_pool(server: object, worker: object) -> None:
    while _pools:
        _pools.pop().close()


def exposure_warning(listen: Address, api_token: str | None) -> str | None:
    """What to warn about when the API would be open to other machines without a token."""
    if api_token or is_loopback_host(listen.host):
        return None
    return (f"the scheduler listens on {listen.bind_target()}, beyond this machine, with no API token: anyone "
            "who can reach it can run shell commands on the workers. Set DISTRACK_API_TOKEN (or "
            "DISTRACK_API_TOKEN_FILE), or listen on 127.0.0.1")


def short_token_warning(api_token: str | None) -> str | None:
    """Shorter tokens work (a test may use one) but are worth a warning: the token is all that stands
    between the network and shell commands on the workers."""
    if api_token is None or len(api_token) >= MIN_API_TOKEN_CHARS:
        return None
    return (f"the API token is shorter than {MIN_API_TOKEN_CHARS} characters; use a long random one "
            "(e.g. `openssl rand -hex 32`)")


def serve(config: SchedulerConfig) -> None:
    """Runs gunicorn in this process until it receives SIGTERM or SIGINT."""
    for warning in (exposure_warning(config.listen, config.api_token), short_token_warning(config.api_token)):
        if warning:
            log.warning("%s", warning)
    if config.api_token:
        log.info("the API requires a bearer token (every path but /health)")
    SchedulerApplication(config).run()
