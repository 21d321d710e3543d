"""The connection pool (distrack.db.pool) against a real PostgreSQL: idle connections are checked
before use, recently returned ones are not, and returning one takes no other thread."""

import threading
import time

import psycopg
import pytest
from helpers import wait_for

from distrack.db import pool as pool_module
from distrack.db.pool import make_pool
from distrack.db.store import TaskStore


@pytest.fixture
def one_connection_pool(db_url):
    pool = make_pool(db_url, max_size=1, name="test-pool")
    pool.wait(10)
    try:
        yield pool
    finally:
        pool.close()


def backend_pid(pool) -> int:
    with pool.connection() as conn:
        return conn.info.backend_pid


def test_a_connection_killed_while_idle_is_replaced_before_anyone_uses_it(one_connection_pool, db_url,
                                                                        monkeypatch):
    monkeypatch.setattr(pool_module, "CHECK_IDLE_AFTER_S", 0.05)
    store = TaskStore(one_connection_pool)
    killed = backend_pid(one_connection_pool)
    returned_by = time.monotonic()
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (killed,))
        wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (killed,)).fetchone(),
                 what="the killed backend to be gone")
    wait_for(lambda: time.monotonic() - returned_by >= 0.05, what="the connection to be idle for the check")
    store.ping()  # would fail (DatabaseUnavailable) on the dead connection
    assert backend_pid(one_connection_pool) != killed


def test_a_returned_connection_is_noted_on_the_returning_thread(one_connection_pool):
    # Noting the return with the pool's `reset` callback would send every returned connection
    # through the pool's worker thread; the note is made by whoever returns it, before it is back.
    store = TaskStore(one_connection_pool)
    noted_by = []
    original = pool_module._Pool.putconn

    def spy(self, conn):
        original(self, conn)
        noted_by.append((threading.current_thread(), pool_module._returned_at.get(conn)))

    before = time.monotonic()
    pool_module._Pool.putconn = spy
    try:
        store.ping()
    finally:
        pool_module._Pool.putconn = original
    [(thread, noted_at)] = noted_by
    assert thread is threading.current_thread()
    assert noted_at is not None and noted_at >= before
    assert one_connection_pool._reset is None  # no reset callback: no worker thread on the way back
