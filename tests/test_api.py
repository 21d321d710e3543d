"""The HTTP API in-process (Falcon's TestClient) over a real database: answers and every bad input."""

import re
import uuid
from datetime import UTC, datetime

import falcon.testing
import pytest

from distrack.db.pool import make_pool
from distrack.db.store import Attempt, TaskStore
from distrack.scheduler.app import create_app

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def client(store):
    return falcon.testing.TestClient(create_app(store, max_body_bytes=4096))


def test_schedule_returns_the_stored_task(client, store):
    resp = client.simulate_post("/schedule", body='{"command": "echo hello", "delay_seconds": 5}')
    assert resp.status_code == 200
    doc = resp.json
    assert doc["command"] == "echo hello" and doc["status"] == "queued"
    assert RFC3339_UTC.match(doc["scheduled_at"])
    row = store.get_task(uuid.UUID(doc["task_id"]))  # committed
    assert row["command"] == "echo hello"
    assert 4 < (row["scheduled_at"] - datetime.now(UTC)).total_seconds() <= 5


def test_schedule_accepts_json_without_a_json_content_type(client):
    # What `curl -d '{...}'` sends: application/x-www-form-urlencoded.
    resp = client.simulate_post(
        "/schedule", body='{"command": "true"}', headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert resp.status_code == 200


def test_status_shows_lifecycle_fields_once_they_happen(client, store):
    tid = client.simulate_post("/schedule", json={"command": "echo"}).json["task_id"]
    doc = client.simulate_get("/status", params={"task_id": tid}).json
    assert doc["task_id"] == tid and doc["status"] == "queued" and doc["attempts"] == 0
    assert {"exit_code", "worker_id", "error"} <= set(doc)
    assert not {"picked_at", "started_at", "completed_at", "failed_at"} & set(doc)
    (task,) = store.claim_due(["w1"])
    attempt = Attempt(task.id, task.lease, "w1")
    store.mark_running(attempt)
    store.mark_completed(attempt, 0)
    doc = client.simulate_get("/status", params={"task_id": tid}).json
    assert doc["status"] == "completed" and doc["exit_code"] == 0 and doc["worker_id"] == "w1"
    for name in ("scheduled_at", "picked_at", "started_at", "completed_at"):
        assert RFC3339_UTC.match(doc[name]), name
    assert "failed_at" not in doc
    assert client.simulate_get(f"/tasks/{tid}").json == doc


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"delay_seconds": 5}', "command is required"),
        ('{"command": ""}', "must not be empty"),
        ('{"command": 7}', "must be a string"),
        ('{"command": "x", "delay_seconds": "soon"}', "must be a number"),
        ('{"command": "x", "delay_seconds": -5}', "between"),
        ('{"command": "x", "delay_seconds": 1e12}', "between"),
        ('{"command": "x", "max_attempts": 0}', "max_attempts"),
        ('{"command": "x", "extra": 1}', "unknown field"),
        ("", "body is empty"),
    ],
)
def test_bad_schedule_input_is_400_with_a_json_reason(client, body, fragment):
    resp = client.simulate_post("/schedule", body=body)
    assert resp.status_code == 400
    assert fragment in resp.json["description"]


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ({}, 400, "task_id is required"),
        ({"task_id": "not-a-uuid"}, 400, "not a UUID"),
        ({"task_id": str(uuid.uuid4())}, 404, "no task has id"),
    ],
)
def test_bad_status_queries(client, params, status, fragment):
    resp = client.simulate_get("/status", params=params)
    assert resp.status_code == status
    assert fragment in resp.json["description"]


def test_wrong_method_is_405_and_unknown_path_404(client):
    assert client.simulate_get("/schedule").status_code == 405
    assert client.simulate_delete("/status").status_code == 405
    resp = client.simulate_get("/nope")
    assert resp.status_code == 404 and resp.json["title"]


def test_body_over_the_limit_is_413(client):
    resp = client.simulate_post("/schedule", body='{"command": "' + "x" * 5000 + '"}')
    assert resp.status_code == 413
    assert "limit is 4096" in resp.json["description"]


def test_database_unreachable_is_503_and_nothing_claims_success():
    pool = make_pool("postgresql://nobody@127.0.0.1:1/none", max_size=1)
    try:
        client = falcon.testing.TestClient(create_app(TaskStore(pool)))
        resp = client.simulate_post("/schedule", json={"command": "echo"})
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "2"
        assert "did not complete" in resp.json["description"]
        assert client.simulate_get("/health").status_code == 503
        # Bad input is still a 400, not a 503: validation comes before the database.
        assert client.simulate_post("/schedule", body="{").status_code == 400
    finally:
        pool.close()


def test_health(client):
    resp = client.simulate_get("/health")
    assert resp.status_code == 200 and resp.json == {"status": "ok"}


def test_cancel_a_queued_task(client):
    tid = client.simulate_post("/schedule", json={"command": "echo", "delay_seconds": 60}).json["task_id"]
    resp = client.simulate_post(f"/tasks/{tid}/cancel")
    assert resp.status_code == 200
    assert resp.json["status"] == "cancelled" and "cancelled_at" in resp.json
    again = client.simulate_post(f"/tasks/{tid}/cancel")  # idempotent
    assert again.status_code == 200 and again.json["cancelled_at"] == resp.json["cancelled_at"]


def test_cancel_a_running_task_is_accepted_while_its_worker_stops_it(client, store):
    tid = client.simulate_post("/schedule", json={"command": "sleep 100"}).json["task_id"]
    (task,) = store.claim_due(["w1"])
    store.mark_running(Attempt(task.id, task.lease, "w1"))
    resp = client.simulate_post(f"/tasks/{tid}/cancel")
    assert resp.status_code == 202
    assert resp.json["status"] == "running" and "cancel_requested_at" in resp.json
    assert client.simulate_post(f"/tasks/{tid}/cancel").status_code == 202


def test_cancel_a_finished_task_is_409(client, store):
    tid = client.simulate_post("/schedule", json={"command": "true"}).json["task_id"]
    (task,) = store.claim_due(["w1"])
    store.mark_running(Attempt(task.id, task.lease, "w1"))
    store.mark_completed(Attempt(task.id, task.lease, "w1"), 0)
    resp = client.simulate_post(f"/tasks/{tid}/cancel")
    assert resp.status_code == 409
    assert "is completed" in resp.json["description"]


def test_cancel_unknown_or_malformed_ids(client):
    assert client.simulate_post(f"/tasks/{uuid.uuid4()}/cancel").status_code == 404
    assert client.simulate_post("/tasks/nope/cancel").status_code == 400
    assert client.simulate_get(f"/tasks/{uuid.uuid4()}/cancel").status_code == 405


def test_a_batch_is_stored_in_one_statement_with_one_wake_up(store, db_url):
    import psycopg

    client = falcon.testing.TestClient(create_app(store))  # the default 1 MiB body limit
    tasks = [{"command": f"echo {i}", "delay_seconds": i % 3} for i in range(1000)]
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN distrack_task_queued")
        resp = client.simulate_post("/tasks", json={"tasks": tasks})
        notifies = list(listener.notifies(timeout=1.0, stop_after=2))
    assert resp.status_code == 200
    assert resp.json["count"] == 1000
    assert [t["command"] for t in resp.json["tasks"]] == [t["command"] for t in tasks]  # the input's order
    assert len(notifies) == 1
    # The scheduler makes the ids: one random (version 4) id per task, the one it is stored under.
    answered = {uuid.UUID(t["task_id"]): t["command"] for t in resp.json["tasks"]}
    assert len(answered) == 1000 and {i.version for i in answered} == {4}
    with psycopg.connect(db_url) as conn:
        stored = dict(conn.execute("SELECT id, command FROM tasks WHERE status = 'queued'").fetchall())
    assert stored == answered


def test_a_bad_batch_stores_nothing(client, store, db_url):
    import psycopg

    resp = client.simulate_post("/tasks", json={"tasks": [{"command": "fine"}, {"command": 5}]})
    assert resp.status_code == 400 and "tasks[1]" in resp.json["description"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    assert client.simulate_get("/tasks").status_code == 405


def test_a_batchs_answer_shows_each_task_exactly_as_get_does(client):
    # The batch answer is written from what the insert sent and the database's now(), not read back
    # from the rows: it must show what GET reads, to the microsecond and the character.
    tasks = [
        {"command": "echo 'héllo ✓ 😀' \"quoted\" \\ back", "delay_seconds": 2.5, "max_attempts": 3,
         "timeout_seconds": 0.5},
        {"command": "true", "delay_seconds": 0, "timeout_seconds": 30},
        {"command": "line\nbreak\ttab"},
        # What an array literal would take for syntax, were it not quoted and escaped.
        {"command": ' {a,b} "NULL" NULL \\"} ', "delay_seconds": 0.0000005, "timeout_seconds": 0.00001},
        {"command": "NULL", "delay_seconds": 1.9999995},
        {"command": "echo far", "delay_seconds": 366 * 24 * 3600, "timeout_seconds": 7 * 24 * 3600},
        {"command": "echo soon", "delay_seconds": 0.123456789, "timeout_seconds": 1e-6},
    ]
    resp = client.simulate_post("/tasks", json={"tasks": tasks})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    assert resp.json["count"] == len(tasks)
    for sent, got in zip(tasks, resp.json["tasks"], strict=True):
        assert got["command"] == sent["command"]
        assert set(got) == {"task_id", "command", "scheduled_at", "status", "attempts", "max_attempts",
                            "timeout_seconds"}
        full = client.simulate_get(f"/tasks/{got['task_id']}").json
        assert got == {key: full[key] for key in got}
