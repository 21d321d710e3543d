"""The schema in sql/: applied by `distrack migrate` and by hand with psql, idempotently."""

import subprocess
import threading
from pathlib import Path

import psycopg
import pytest
from helpers import REPO

from distrack.db.migrate import migrate
from distrack.db.queries import migration_files, parse_queries, queries

PSQL = Path(__import__("pgserver").__file__).parent / "pginstall" / "bin" / "psql"


def schema_snapshot(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        idx = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
        trg = conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1").fetchall()
    return cols + idx + trg


def test_migrate_applies_once_and_records(empty_db_url):
    names = [name for name, _ in migration_files()]
    assert names[:2] == ["0001_tasks", "0002_workers_and_cancel"]
    assert migrate(empty_db_url) == names
    snapshot = schema_snapshot(empty_db_url)
    assert migrate(empty_db_url) == []
    assert schema_snapshot(empty_db_url) == snapshot
    with psycopg.connect(empty_db_url) as conn:
        recorded = [r[0] for r in conn.execute("SELECT name FROM distrack_migrations ORDER BY name")]
    assert recorded == names


def test_concurrent_migrators_do_not_collide(empty_db_url):
    results, errors = [], []

    def run():
        try:
            results.append(migrate(empty_db_url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(map(len, results)) == [0, 0, 0, len(migration_files())]


def test_psql_by_hand_matches_distrack_migrate_and_can_be_rerun(empty_db_url, db_url):
    files = sorted((REPO / "sql" / "migrations").rglob("[0-9][0-9][0-9][0-9]_*.sql"))
    for _ in range(2):  # twice: the files are idempotent
        for path in files:
            out = subprocess.run(
                [str(PSQL), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", empty_db_url, "-f", str(path)],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr
    assert schema_snapshot(empty_db_url) == schema_snapshot(db_url)
    # And `distrack migrate` sees them as applied.
    assert migrate(empty_db_url) == []


def test_migrations_are_numbered_files_only():
    for path in (REPO / "sql" / "migrations").rglob("*"):
        if path.is_file():
            assert path.name[:4].isdigit() and path.suffix == ".sql", path


def test_queries_file_parses_into_named_statements():
    q = queries()
    assert {"insert_tasks", "claim_due", "get_task", "mark_running", "end_attempts", "cancel_task"} <= set(q)
    assert "FOR UPDATE SKIP LOCKED" in q["claim_due"]
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- a --\nSELECT 1;\n-- a --\nSELECT 2;\n")


def _claim_beside(sql_conn, others_sql: str) -> str:
    """Inserts the rows `others_sql` selects (id, command, scheduled_at, status, attempts) and 5
    tasks due now, analyzes the table, and returns the claim statement for three slots."""
    sql_conn.execute(f"INSERT INTO tasks (id, command, scheduled_at, status, attempts) {others_sql}")
    sql_conn.execute(
        "INSERT INTO tasks (id, command, scheduled_at) "
        "SELECT gen_random_uuid(), 'echo', now() FROM generate_series(1, 5)"
    )
    sql_conn.execute("ANALYZE tasks")
    return queries()["claim_due"].replace("%(worker_ids)s", "ARRAY['w1', 'w2', 'w3']")


def test_claim_reads_only_the_partial_index_whatever_the_history(sql_conn):
    # 20,000 finished rows and 5 queued ones: the claim must not visit the finished ones.
    claim = _claim_beside(sql_conn, "SELECT gen_random_uuid(), 'echo', now() - interval '1 hour', 'completed', 1 "
                                    "FROM generate_series(1, 20000)")
    with sql_conn.transaction(force_rollback=True):
        rows = sql_conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {claim}").fetchall()
    plan = "\n".join(r["QUERY PLAN"] for r in rows)
    assert "tasks_queued_scheduled_at_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


def _rows_read(plan: dict) -> int:
    """Rows every node of an EXPLAIN (ANALYZE, FORMAT JSON) plan produced, over all its loops."""
    return plan["Actual Rows"] * plan["Actual Loops"] + sum(_rows_read(p) for p in plan.get("Plans", []))


def test_claim_reads_a_few_rows_whatever_is_queued_for_later(sql_conn):
    # 20,000 tasks due in an hour and 5 due now: a claim (the coordinator runs one at every wake-up)
    # must read about what it claims, not the whole queue of tasks scheduled for later.
    claim = _claim_beside(sql_conn, "SELECT gen_random_uuid(), 'echo', now() + interval '1 hour', 'queued', 0 "
                                    "FROM generate_series(1, 20000)")
    with sql_conn.transaction(force_rollback=True):
        (explained,) = sql_conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {claim}").fetchone().values()
    with sql_conn.transaction(force_rollback=True):
        rows = sql_conn.execute(claim).fetchall()
    assert _rows_read(explained[0]["Plan"]) < 100, explained
    # And what it says is still right: 3 claimed, 2 due left (due now, so not a wait of an hour).
    assert sum(r["id"] is not None for r in rows) == 3
    (tail,) = [r for r in rows if r["id"] is None]
    assert tail["left_due"] is True and tail["next_due_s"] <= 0


def test_insert_by_hand_wakes_listeners_once_per_statement(db_url, sql_conn):
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN distrack_task_queued")
        sql_conn.execute(
            "INSERT INTO tasks (id, command, scheduled_at) SELECT gen_random_uuid(), 'echo', "
            "timestamptz '2030-01-01 00:00:00+00' + g * interval '1 minute' FROM generate_series(1, 100) AS g"
        )
        got = list(listener.notifies(timeout=2.0, stop_after=5))
    assert len(got) == 1
    assert got[0].channel == "distrack_task_queued"
    # The payload is when the earliest of them is due (epoch seconds), so a coordinator need not wake
    # for tasks due after it would anyway.
    assert float(got[0].payload) == 1893456000 + 60
