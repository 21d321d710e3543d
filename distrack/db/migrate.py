"""Applies sql/migrations/ in order, each in its own transaction, recording what ran."""

from __future__ import annotations

import logging

import psycopg

from distrack.db.pool import connection_kwargs
from distrack.db.queries import migration_files
from distrack.errors import DatabaseUnavailable, MigrationError

log = logging.getLogger(__name__)

# Serialises migrators that start at the same moment (several services, several hosts).
ADVISORY_LOCK_KEY = 0x64697374726B  # "distrk"


def migrate(database_url: str) -> list[str]:
    """Applies every migration not yet recorded; returns the names it applied (empty when current)."""
    try:
        conn = psycopg.connect(database_url, **connection_kwargs())
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {exc}".strip()) from None
    applied_now: list[str] = []
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS distrack_migrations "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row["name"] for row in conn.execute("SELECT name FROM distrack_migrations")}
            for name, text in migration_files():
                if name in done:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(text)
                        conn.execute(
                            "INSERT INTO distrack_migrations (name) VALUES (%s) ON CONFLICT DO NOTHING",
                            (name,),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {name} failed: {exc}") from None
                log.info("applied migration %s", name)
                applied_now.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    return applied_now
