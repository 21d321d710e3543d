"""The scheduler against a PostgreSQL that goes away and comes back: 503 meanwhile, then recovery."""

import os

import psycopg
import pytest
from helpers import Api, Service, free_port, wait_for

from distrack.db.embedded import EmbeddedPostgres
from distrack.db.migrate import migrate

pytestmark = pytest.mark.slow


def test_scheduler_answers_503_while_the_database_is_down_and_recovers_by_itself(tmp_path):
    pg = EmbeddedPostgres(tmp_path / "pgdata")
    url = pg.start()
    scheduler = None
    try:
        migrate(url)
        port = free_port()
        env = dict(os.environ, DATABASE_URL=url)
        scheduler = Service(
            "scheduler", ["scheduler", f"--scheduler_port=127.0.0.1:{port}", "--http_workers=1"], env, tmp_path
        )
        api = Api(f"http://127.0.0.1:{port}")
        wait_for(lambda: api.request("GET", "/health")[0] == 200, 30, what="the scheduler")
        before = api.schedule("echo before")

        pg.stop()
        status, doc = api.request("POST", "/schedule", {"command": "echo during"})
        assert status == 503, doc
        assert "did not complete" in doc["description"]
        assert api.request("GET", f"/status?task_id={before['task_id']}")[0] == 503
        assert api.request("POST", "/schedule", "{bad json")[0] == 400  # bad input is still a 400

        pg.start()
        wait_for(
            lambda: api.request("POST", "/schedule", {"command": "echo after"})[0] == 200,
            60,
            interval=0.2,
            what="the scheduler to recover",
        )
        assert api.status(before["task_id"])["status"] == "queued"
        assert scheduler.alive()
    finally:
        if scheduler is not None:
            scheduler.stop()
        pg.stop()


@pytest.mark.parametrize("started_by", ["distrack scheduler", "gunicorn"])
def test_a_statement_held_up_past_the_timeout_gets_503_and_stores_nothing(db_url, tmp_path, started_by):
    # A lock the insert waits on (a migration, an admin's long transaction): the request must not hang
    # (the client below gives up after 10 s, gunicorn kills the process after 60 s).
    port = free_port()
    env = dict(os.environ, DATABASE_URL=db_url)
    if started_by == "gunicorn":  # as README says to run it without `distrack scheduler`
        scheduler = Service("scheduler", [f"--bind=127.0.0.1:{port}", "--workers=1", "--no-control-socket",
                                          "distrack.scheduler.app:create_app_from_env(statement_timeout_s=0.5)"],
                            env, tmp_path, module="gunicorn")
    else:
        scheduler = Service("scheduler", ["scheduler", f"--scheduler_port=127.0.0.1:{port}", "--http_workers=1",
                                          "--statement_timeout_s=0.5"], env, tmp_path)
    try:
        api = Api(f"http://127.0.0.1:{port}")
        wait_for(lambda: api.request("GET", "/health")[0] == 200, 30, what="the scheduler")
        with psycopg.connect(db_url) as locker:  # the lock is held until this transaction ends
            locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            status, doc = api.request("POST", "/schedule", {"command": "echo held-up"})
            assert status == 503, doc
            assert "did not answer in time" in doc["description"]
            status, doc = api.request("POST", "/tasks", {"tasks": [{"command": "echo held-up"}] * 3})
            assert status == 503, doc
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM tasks WHERE command = 'echo held-up'").fetchone() == (0,)
        assert api.request("POST", "/schedule", {"command": "echo after"})[0] == 200
        assert scheduler.alive()
    finally:
        scheduler.stop()
