"""The psycopg connection pool, created by each process when it starts serving (after any fork)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from distrack.db.queries import queries

# A request must not hang while the database is away: fail over to a 503 quickly instead.
CONNECT_TIMEOUT_S = 3
POOL_TIMEOUT_S = 3.0
TCP_USER_TIMEOUT_MS = 15_000
# psycopg_pool retries a lost connection with a backoff that doubles without a cap (1, 2, 4, 8 s...)
# until this long has passed. A short value gives up early instead; the next request that needs a
# connection then starts a fresh attempt at once, so a service answers again within a request or two
# of the database's return, however long it was away.
RECONNECT_TIMEOUT_S = 2.0
# A connection back in the pool for less than this is handed out again without a check (a round trip
# to the server for every statement would double the cost of a busy service). One that died in that
# window fails its next statement, which the caller sees as the database being unavailable.
CHECK_IDLE_AFTER_S = 1.0

_returned_at: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()


class _Pool(ConnectionPool):
    """Notes when each connection comes back (see _check_if_idle). Not with the pool's `reset`
    callback: given one, psycopg_pool hands every returned connection to its worker thread, a thread
    switch and a queue for every statement."""

    def putconn(self, conn: psycopg.Connection) -> None:
        _returned_at[conn] = time.monotonic()
        super().putconn(conn)


def _check_if_idle(conn: psycopg.Connection) -> None:
    """Checks a connection that sat in the pool a while (a database restart kills idle ones)."""
    returned = _returned_at.get(conn)
    if returned is None or time.monotonic() - returned >= CHECK_IDLE_AFTER_S:
        ConnectionPool.check_connection(conn)


def _statement_timeout_setter(timeout_s: float) -> Callable[[psycopg.Connection], None]:
    # A session setting, made once per connection; not the `options` connection parameter, which
    # would replace any `options` the user's DATABASE_URL carries.
    milliseconds = max(int(timeout_s * 1000), 1)

    def configure(conn: psycopg.Connection) -> None:
        conn.execute(queries()["set_statement_timeout"], {"timeout": f"{milliseconds}ms"})

    return configure


def connection_kwargs() -> dict:
    return {
        "autocommit": True,
        "row_factory": dict_row,
        "connect_timeout": CONNECT_TIMEOUT_S,
        # Text goes over the wire as UTF-8 whatever the server's default, so a database in another
        # encoding rejects what it cannot store (a DataError, a 400) instead of failing in the driver.
        "client_encoding": "utf8",
        # A statement sent on a connection whose peer vanished fails after this long, instead of
        # waiting out TCP's retransmissions (a quarter of an hour).
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        # Keepalives notice a database host that vanished without closing the socket.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


def make_pool(database_url: str, *, min_size: int = 1, max_size: int = 10, name: str = "distrack",
              statement_timeout_s: float | None = None) -> ConnectionPool:
    """An open pool that does not wait for the database: services start (and answer 503) while it is down.
    With `statement_timeout_s`, the server cancels a statement that runs longer (blocked on a lock, say),
    so its caller fails fast instead of hanging."""
    pool = _Pool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        kwargs=connection_kwargs(),
        # A connection that died while idle (database restart) is replaced before anyone gets it.
        check=_check_if_idle,
        configure=None if statement_timeout_s is None else _statement_timeout_setter(statement_timeout_s),
        timeout=POOL_TIMEOUT_S,
        reconnect_timeout=RECONNECT_TIMEOUT_S,
        name=name,
        open=False,
    )
    pool.open(wait=False)
    return pool
