"""Listener: a thread that turns NOTIFYs on one channel into a threading.Event.

A notification only says "look now"; the database stays the truth and the caller's timed poll
covers anything missed. LISTEN runs on its own autocommit connection outside the pool, reconnects
with backoff, and checks the connection with `SELECT 1` when the channel has been quiet.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from psycopg import sql

from distrack.db.pool import connection_kwargs

log = logging.getLogger(__name__)

# How long one wait for notifications lasts: bounds both the stop latency and how long a dead
# connection can go unnoticed.
QUIET_CHECK_S = 1.0
RECONNECT_MAX_S = 5.0


class Listener:
    def __init__(self, database_url: str, channel: str, wakeup: threading.Event) -> None:
        self.database_url = database_url
        self.channel = channel
        self.wakeup = wakeup
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{channel}", daemon=True)

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
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.connected.set()
                    # Anything sent while we were not listening was lost: make the caller look.
                    self.wakeup.set()
                    delay = 0.1
                    self._listen(conn)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    break
                log.warning("LISTEN %s: %s; reconnecting in %.1f s", self.channel, exc, delay)
            finally:
                self.connected.clear()
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            received = False
            for _ in conn.notifies(timeout=QUIET_CHECK_S):
                received = True
                self.wakeup.set()
                if self._stop.is_set():
                    return
            if not received:
                conn.execute("SELECT 1")
