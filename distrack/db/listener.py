"""Listener: a thread that LISTENs on some channels and hands each NOTIFY to a callback.

A notification only says "look now"; the database stays the truth and the caller's timed poll
covers anything missed. LISTEN runs on its own autocommit connection outside the pool, reconnects
with backoff, and checks the connection with `SELECT 1` when the channels have been quiet. After
every (re)connect the callback gets `(channel, None)`: notifications may have been missed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import psycopg
from psycopg import sql

from distrack.db.pool import connection_kwargs

log = logging.getLogger(__name__)

# How long one wait for notifications lasts: bounds both the stop latency and how long a dead
# connection can go unnoticed.
QUIET_CHECK_S = 1.0
RECONNECT_MAX_S = 5.0

OnNotify = Callable[[str, str | None], None]


class Listener:
    def __init__(self, database_url: str, channels: Sequence[str], on_notify: OnNotify) -> None:
        self.database_url = database_url
        self.channels = list(channels)
        self.on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.database_url, **connection_kwargs()) as conn:
                    for channel in self.channels:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    for channel in self.channels:
                        self._deliver(channel, None)
                    delay = 0.1
                    self._listen(conn)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    break
                log.warning("LISTEN: %s; reconnecting in %.1f s", str(exc).strip(), delay)
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            received = False
            for notify in conn.notifies(timeout=QUIET_CHECK_S):
                received = True
                self._deliver(notify.channel, notify.payload)
                if self._stop.is_set():
                    return
            if not received:
                conn.execute("SELECT 1")

    def _deliver(self, channel: str, payload: str | None) -> None:
        try:
            self.on_notify(channel, payload)
        except Exception:  # a bad callback must not end the LISTEN loop
            log.exception("handling a notification on %s failed", channel)
