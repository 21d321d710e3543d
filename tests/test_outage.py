"""The scheduler against a PostgreSQL that goes away and comes back: 503 meanwhile, then recovery."""

import os

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
