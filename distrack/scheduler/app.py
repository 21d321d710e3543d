"""The scheduler's HTTP API: a Falcon WSGI app over a TaskStore.

`create_app(store)` takes its dependencies; `create_app_from_env()` builds them from the environment
and is what gunicorn loads in each worker process after the fork, e.g.
`gunicorn 'distrack.scheduler.app:create_app_from_env()'`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import falcon

from distrack.apitoken import api_token_from_env
from distrack.config import DEFAULT_STATEMENT_TIMEOUT_S, check_statement_timeout, require_database_url
from distrack.db.pool import make_pool
from distrack.db.store import InsertedTasks, TaskStore
from distrack.errors import DatabaseUnavailable, DataRejected
from distrack.scheduler.auth import BearerAuth
from distrack.scheduler.group_insert import GroupInserter
from distrack.scheduler.openapi import openapi_document
from distrack.scheduler.validation import InvalidInput, parse_batch_request, parse_schedule_request, parse_task_id
from distrack.tasks import TaskSpec

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
LIFECYCLE_TIMESTAMPS = ("picked_at", "started_at", "completed_at", "failed_at", "cancel_requested_at", "cancelled_at")
FINISHED = ("completed", "failed")
# How long clients should wait before retrying while the database is away.
RETRY_AFTER_S = 2


def rfc3339(moment: datetime) -> str:
    """UTC with microseconds and a Z, e.g. 2026-11-23T04:11:54.123456Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def task_json(row: dict[str, Any]) -> dict[str, Any]:
    """A task row as the API shows it: lifecycle timestamps only once they have happened."""
    doc: dict[str, Any] = {
        "task_id": str(row["id"]),
        "command": row["command"],
        "scheduled_at": rfc3339(row["scheduled_at"]),
        "status": row["status"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "timeout_seconds": row["timeout_seconds"],
    }
    for name in LIFECYCLE_TIMESTAMPS:
        if row.get(name) is not None:
            doc[name] = rfc3339(row[name])
    for name in ("exit_code", "worker_id", "error"):
        if name in row:
            doc[name] = row[name]
    return doc


_encode_json = json.JSONEncoder(ensure_ascii=False).encode


def new_tasks_json(tasks: Sequence[TaskSpec], inserted: InsertedTasks) -> list[str]:
    """Each task insert_tasks just committed as the API shows it (task_json's document for a new
    task), as JSON text: written here, not by json.dumps, which costs several times as much for a
    batch of thousands. A new task is queued and has no attempts yet."""
    shown: dict[datetime, str] = {}  # rfc3339 of each distinct due time
    docs = []
    for task, task_id, due in zip(tasks, inserted.ids, inserted.scheduled_ats, strict=True):
        at = shown.get(due) or shown.setdefault(due, rfc3339(due))
        timeout = "null" if task.timeout_seconds is None else repr(float(task.timeout_seconds))
        docs.append(f'{{"task_id": "{task_id}", "command": {_encode_json(task.command)}, "scheduled_at": "{at}", '
                    f'"status": "queued", "attempts": 0, "max_attempts": {int(task.max_attempts)}, '
                    f'"timeout_seconds": {timeout}}}')
    return docs


def read_body(req: falcon.Request, limit: int) -> bytes:
    if req.content_length is not None and req.content_length > limit:
        raise falcon.HTTPContentTooLarge(
            title="Body too large",
            description=f"the body is {req.content_length} bytes; the limit is {limit}",
        )
    # A chunked body has no Content-Length, and Falcon's bounded_stream would read none of it; the
    # server (gunicorn) marks such input as terminated, so it is safe to read up to the limit.
    chunked = req.content_length is None and req.env.get("wsgi.input_terminated")
    body = (req.stream if chunked else req.bounded_stream).read(limit + 1)
    if len(body) > limit:
        raise falcon.HTTPContentTooLarge(title="Body too large", description=f"the body is over {limit} bytes")
    return body


class ScheduleResource:
    def __init__(self, store: TaskStore, max_body_bytes: int) -> None:
        # Concurrent requests share statements and commits (see group_insert).
        self.inserter = GroupInserter(lambda tasks: new_tasks_json(tasks, store.insert_tasks(tasks)))
        self.max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = parse_schedule_request(read_body(req, self.max_body_bytes))
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.inserter.insert(request)


class BatchResource:
    def __init__(self, store: TaskStore, max_body_bytes: int) -> None:
        self.store = store
        self.max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tasks = parse_batch_request(read_body(req, self.max_body_bytes))
        docs = new_tasks_json(tasks, self.store.insert_tasks(tasks))
        resp.content_type = falcon.MEDIA_JSON
        resp.text = f'{{"count": {len(docs)}, "tasks": [{", ".join(docs)}]}}'


class StatusResource:
    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        value = req.params.get("task_id")
        if isinstance(value, list):  # ?task_id=a&task_id=b: which one was meant is anyone's guess
            raise InvalidInput(f"task_id is given {len(value)} times; give it once")
        resp.media = self._get(parse_task_id(value))

    def on_get_task(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        resp.media = self._get(parse_task_id(task_id))

    def on_post_cancel(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """200 when the task is cancelled (also when it already was), 202 when it was running and
        its worker is stopping it, 409 when it had already finished. The code follows what the cancel
        found; the body is the task as it is now (a stop may already have completed)."""
        tid = parse_task_id(task_id)
        found = self.store.cancel_task(tid)
        doc = self._get(tid)
        if found is None and doc["status"] in FINISHED:
            raise falcon.HTTPConflict(
                title="Task already finished",
                description=f"task {tid} is {doc['status']}; only queued or running tasks can be cancelled",
            )
        resp.status = falcon.HTTP_202 if found in ("picked", "running") else falcon.HTTP_200
        resp.media = doc

    def _get(self, task_id: uuid.UUID) -> dict[str, Any]:
        row = self.store.get_task(task_id)
        if row is None:
            raise falcon.HTTPNotFound(title="Unknown task", description=f"no task has id {task_id}")
        return task_json(row)


class HealthResource:
    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.store.ping()
        resp.media = {"status": "ok"}


class OpenApiResource:
    def __init__(self, document: dict[str, Any]) -> None:
        self.body = json.dumps(document, indent=2).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.body
        resp.content_type = falcon.MEDIA_JSON


def _serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Every error as the JSON `{"title", "description"}` the API documents, whatever the client's
    Accept header asks for (Falcon's default would answer XML, or nothing, to some)."""
    resp.data = exc.to_json()
    resp.content_type = falcon.MEDIA_JSON


def _invalid_input(req: falcon.Request, resp: falcon.Response, exc: InvalidInput, params: dict) -> None:
    raise falcon.HTTPBadRequest(title="Invalid input", description=str(exc))


def _data_rejected(req: falcon.Request, resp: falcon.Response, exc: DataRejected, params: dict) -> None:
    raise falcon.HTTPBadRequest(title="Invalid input", description=str(exc))


def _database_unavailable(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict) -> None:
    # Not "nothing was stored": a commit can succeed just before the connection breaks.
    raise falcon.HTTPServiceUnavailable(
        title="Database unavailable",
        description="the task database cannot be reached or did not answer in time; the request did not complete, "
        "retry later",
        retry_after=RETRY_AFTER_S,
    )


def create_app(
    store: TaskStore, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_token: str | None = None
) -> falcon.App:
    """The API over `store`. With `api_token`, every request but GET /health needs it as a bearer token."""
    app = falcon.App(middleware=[BearerAuth(api_token)] if api_token else [])
    app.set_error_serializer(_serialize_error)
    # Clients such as `curl -d` send JSON without a JSON content type; the body is parsed as JSON
    # whatever it says, so no media handler is involved in reading requests.
    app.req_options.strip_url_path_trailing_slash = True
    status = StatusResource(store)
    app.add_route("/schedule", ScheduleResource(store, max_body_bytes))
    app.add_route("/tasks", BatchResource(store, max_body_bytes))
    app.add_route("/status", status)
    app.add_route("/tasks/{task_id}", status, suffix="task")
    app.add_route("/tasks/{task_id}/cancel", status, suffix="cancel")
    app.add_route("/health", HealthResource(store))
    app.add_route("/openapi.json", OpenApiResource(openapi_document(max_body_bytes=max_body_bytes,
                                                                    auth=bool(api_token))))
    app.add_error_handler(InvalidInput, _invalid_input)
    app.add_error_handler(DataRejected, _data_rejected)
    app.add_error_handler(DatabaseUnavailable, _database_unavailable)
    return app


def create_app_from_env(max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                        statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S) -> falcon.App:
    """The WSGI app with its own pool, for gunicorn to load in each worker after the fork; the token
    comes from DISTRACK_API_TOKEN or DISTRACK_API_TOKEN_FILE. The settings `distrack scheduler` takes as
    flags are arguments here: `gunicorn 'distrack.scheduler.app:create_app_from_env(statement_timeout_s=30)'`."""
    statement_timeout_s = check_statement_timeout(statement_timeout_s)
    api_token = api_token_from_env()
    store = TaskStore(make_pool(require_database_url(), name="scheduler", statement_timeout_s=statement_timeout_s))
    return create_app(store, max_body_bytes=max_body_bytes, api_token=api_token)
