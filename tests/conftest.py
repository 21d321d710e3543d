"""Shared fixtures: a real PostgreSQL, a fresh database per test, and real service processes.

PostgreSQL is the embedded one (pgserver, in a temporary folder) unless DATABASE_URL is set, in which
case tests create their databases on that server. Each test that needs a clean schema gets its own
database cloned from a migrated template (CREATE DATABASE ... TEMPLATE), which takes milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import REPORTS, Cluster, with_database
from psycopg import sql

from distrack.db.embedded import EmbeddedPostgres
from distrack.db.migrate import migrate
from distrack.db.pool import make_pool
from distrack.db.store import TaskStore

# --- PostgreSQL


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server tests may create databases on."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    folder = tempfile.mkdtemp(prefix="distrack-test-pg-")
    embedded = EmbeddedPostgres(Path(folder) / "pgdata")
    try:
        yield embedded.start()
    finally:
        embedded.stop()
        subprocess.run(["rm", "-rf", folder], check=False)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"distrack_template_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(with_database(server_url, name))
    yield name
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A new, empty database (no schema)."""
    name = f"distrack_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _cloned_database(server_url: str, template_db: str) -> Iterator[str]:
    """A new database cloned from the migrated template, dropped afterwards."""
    name = f"distrack_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    yield with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A new database with the current schema, cloned from the migrated template."""
    yield from _cloned_database(server_url, template_db)


@pytest.fixture(scope="module")
def module_db_url(server_url: str, template_db: str) -> Iterator[str]:
    """Like db_url, shared by the tests of one module (for a service they all talk to)."""
    yield from _cloned_database(server_url, template_db)


@pytest.fixture
def store(db_url: str) -> Iterator[TaskStore]:
    pool = make_pool(db_url, max_size=4, name="test")
    pool.wait(10)
    yield TaskStore(pool)
    pool.close()


@pytest.fixture
def sql_conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        yield conn


@pytest.fixture
def cluster(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(db_url, tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(c.logs())


@pytest.fixture(scope="module")
def secured_cluster(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A live scheduler (a real gunicorn on a free loopback port) that requires a fresh random token,
    `cluster.api_token`, with its access log on, so tests can check the token never reaches a log."""
    import secrets

    c = Cluster(module_db_url, tmp_path_factory.mktemp("secured"))
    c.api_token = secrets.token_urlsafe(32)  # type: ignore[attr-defined]
    try:
        c.scheduler(env_extra={"DISTRACK_API_TOKEN": c.api_token, "DISTRACK_ACCESS_LOG": "-"})  # type: ignore[attr-defined]
        yield c
    finally:
        c.stop_all()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, lines in terminalreporter.config.stash.get(REPORTS, []):
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)
