"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Built here from the same constants the parsing enforces (distrack.scheduler.validation), so the
document and the code cannot disagree on a limit. It describes the server it is served by: the body
limit it was started with, and whether it asks for a token.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from distrack.scheduler import validation as v

OPENAPI_VERSION = "3.1.0"
STATUSES = ("queued", "picked", "running", "completed", "failed", "cancelled")
LIFECYCLE_TIMESTAMPS = ("picked_at", "started_at", "completed_at", "failed_at", "cancel_requested_at", "cancelled_at")
# A command is not blank (has a character outside validation.WHITESPACE, which is what str.strip()
# removes) and has no NUL (bash cannot take one in an argument). The characters are spelled out as
# \uXXXX so every regex engine reads them alike; two simple patterns rather than one that says both,
# as fuzzers took seconds to generate and check 64 KiB strings against the combined one.
COMMAND_PATTERNS = [
    {"pattern": "[^" + "".join(f"\\u{ord(c):04x}" for c in v.WHITESPACE) + "]"},
    {"pattern": r"^[^\u0000]*$"},
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        doc["headers"] = headers
    return doc


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _response(description, "Error", headers)


def _schemas() -> dict[str, Any]:
    timestamp = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"}
    task_properties: dict[str, Any] = {
        "task_id": {"type": "string", "format": "uuid"},
        "command": {"type": "string"},
        "scheduled_at": {**timestamp, "description": "when the task is due (RFC 3339, UTC)"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "attempts": {"type": "integer", "minimum": 0, "description": "runs that started"},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": v.MAX_ATTEMPTS},
        "timeout_seconds": {"type": ["number", "null"]},
        **{name: {**timestamp, "description": "present once it happened (RFC 3339, UTC)"}
           for name in LIFECYCLE_TIMESTAMPS},
        "exit_code": {"type": ["integer", "null"]},
        "worker_id": {"type": ["string", "null"]},
        "error": {"type": ["string", "null"]},
    }
    created = ["task_id", "command", "scheduled_at", "status", "attempts", "max_attempts", "timeout_seconds"]
    return {
        "ScheduleRequest": {
            "type": "object",
            "required": ["command"],
            "additionalProperties": False,
            "properties": {
                "command": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": v.MAX_COMMAND_BYTES,
                    "allOf": COMMAND_PATTERNS,
                    "description": f"run with `bash -c`: not blank, no NUL, at most {v.MAX_COMMAND_BYTES} bytes "
                    "once encoded in UTF-8",
                },
                "delay_seconds": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": v.MAX_DELAY_SECONDS,
                    "default": 0,
                    "description": "seconds from now until the task is due",
                },
                "max_attempts": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": v.MAX_ATTEMPTS,
                    "default": 1,
                    "description": "runs allowed; a failed run is retried after 1 s, 2 s, 4 s... with jitter",
                },
                "timeout_seconds": {
                    "type": ["number", "null"],
                    "exclusiveMinimum": 0,
                    "maximum": v.MAX_TIMEOUT_SECONDS,
                    "description": "the command's process group is killed when it runs longer; null or absent: "
                    "the worker's own limit, if any",
                },
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["tasks"],
            "additionalProperties": False,
            "properties": {
                "tasks": {"type": "array", "minItems": 1, "maxItems": v.MAX_BATCH_TASKS,
                          "items": _ref("ScheduleRequest")},
            },
        },
        "Task": {
            "type": "object",
            "required": created,
            "additionalProperties": False,
            "properties": task_properties,
        },
        "TaskStatus": {
            "type": "object",
            "required": [*created, "exit_code", "worker_id", "error"],
            "additionalProperties": False,
            "properties": task_properties,
        },
        "Batch": {
            "type": "object",
            "required": ["count", "tasks"],
            "additionalProperties": False,
            "properties": {
                "count": {"type": "integer", "minimum": 1, "maximum": v.MAX_BATCH_TASKS},
                "tasks": {"type": "array", "items": _ref("Task"), "description": "in the order sent"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "additionalProperties": False,
            "properties": {"status": {"const": "ok"}},
        },
        "Error": {
            "type": "object",
            "required": ["title"],
            "properties": {
                "title": {"type": "string"},
                "description": {"type": "string", "description": "what is wrong"},
            },
        },
    }


def openapi_document(*, max_body_bytes: int, auth: bool) -> dict[str, Any]:
    """The API as a server with this body limit, and a token (auth=True) or none, answers."""
    retry_after = {"Retry-After": {"description": "seconds to wait before retrying",
                                   "schema": {"type": "integer", "minimum": 0}}}
    bad_input = _error("the input is malformed or out of range; the description says what is wrong")
    too_large = _error(f"the body is over {max_body_bytes} bytes")
    unavailable = _error("the database cannot be reached or did not answer in time; nothing can be said about "
                         "the request, retry later", retry_after)
    unauthorized = {
        "401": _error(
            "no `Authorization: Bearer <token>` header, or not the right token",
            {"WWW-Authenticate": {"description": 'Bearer realm="distrack"', "schema": {"type": "string"}}},
        )
    } if auth else {}
    task_id_path = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    no_task = _error("no task has this id")

    def body(schema: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(schema)}},
                "description": "read as JSON whatever the Content-Type says (so `curl -d` works)"}

    paths: dict[str, Any] = {
        "/schedule": {"post": {
            "operationId": "schedule",
            "summary": "Schedule one command",
            "requestBody": body("ScheduleRequest"),
            "responses": {
                "200": _response("the task, committed to PostgreSQL", "Task"),
                "400": bad_input, **unauthorized, "413": too_large, "503": unavailable,
            },
        }},
        "/tasks": {"post": {
            "operationId": "scheduleBatch",
            "summary": f"Schedule up to {v.MAX_BATCH_TASKS} tasks in one statement; one bad task rejects them all",
            "requestBody": body("BatchRequest"),
            "responses": {
                "200": _response("the tasks, committed, in the order sent", "Batch"),
                "400": bad_input, **unauthorized, "413": too_large, "503": unavailable,
            },
        }},
        "/status": {"get": {
            "operationId": "status",
            "summary": "A task's status",
            "parameters": [{"name": "task_id", "in": "query", "required": True,
                            "schema": {"type": "string", "format": "uuid"}}],
            "responses": {
                "200": _response("the task", "TaskStatus"),
                "400": bad_input, **unauthorized, "404": no_task, "503": unavailable,
            },
        }},
        "/tasks/{task_id}": {"get": {
            "operationId": "getTask",
            "summary": "A task's status (the same as /status?task_id=)",
            "parameters": [task_id_path],
            "responses": {
                "200": _response("the task", "TaskStatus"),
                "400": bad_input, **unauthorized, "404": no_task, "503": unavailable,
            },
        }},
        "/tasks/{task_id}/cancel": {"post": {
            "operationId": "cancel",
            "summary": "Cancel a queued or running task",
            "parameters": [task_id_path],
            "responses": {
                "200": _response("the task is cancelled (also when it already was)", "TaskStatus"),
                "202": _response("the task was running; its worker is stopping it", "TaskStatus"),
                "400": bad_input, **unauthorized, "404": no_task,
                "409": _error("the task had already finished"), "503": unavailable,
            },
        }},
        "/health": {"get": {
            "operationId": "health",
            "summary": "Whether the database answers (never needs a token)",
            "security": [],
            "responses": {"200": _response("the database answers", "Health"), "503": unavailable},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {"description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                **unauthorized,
            },
        }},
    }
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "distrack scheduler",
            "version": _version(),
            "description": "Schedules shell commands to run on distrack's workers. Errors are JSON "
            "`{\"title\", \"description\"}`; a wrong method is 405 and an unknown path 404.",
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearerToken": {"type": "http", "scheme": "bearer",
                            "description": "the scheduler's DISTRACK_API_TOKEN (or DISTRACK_API_TOKEN_FILE)"}
        }
        doc["security"] = [{"bearerToken": []}]
    return doc


def _version() -> str:
    try:
        return metadata.version("distrack")
    except metadata.PackageNotFoundError:
        return "0.0.0"
