"""Parsing and checking of what HTTP clients send. Pure functions: bytes and strings in, values or
InvalidInput (with a message for the client) out."""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any

from distrack.tasks import TaskSpec

MAX_COMMAND_BYTES = 64 * 1024  # well under Linux's 128 KiB limit on one argv string (bash -c CMD)
MAX_DELAY_SECONDS = 366 * 24 * 3600  # a year (and a leap day): farther than that is a mistake
MAX_ATTEMPTS = 100
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
SCHEDULE_FIELDS = ("command", "delay_seconds", "max_attempts", "timeout_seconds")
_SCHEDULE_FIELD_SET = frozenset(SCHEDULE_FIELDS)
# What a blank command is made of: exactly the characters str.isspace() (so str.strip()) treats as
# whitespace, spelled out because regular expression engines disagree on \s (JSON Schema's, Rust's
# and Python's differ on U+001C-U+001F, U+0085 and U+FEFF) and the OpenAPI document states the rule.
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000")
MAX_BATCH_TASKS = 10_000  # with the 1 MiB body limit, batches of a few thousand short commands fit
# The form the API hands out (and JSON Schema's "uuid" format); uuid.UUID alone would also take
# braces, a urn: prefix or 32 bare digits, which no client of this API needs.
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class InvalidInput(ValueError):
    """The client's input is wrong; the message says how."""


# What /schedule (and each item of /tasks) parses into.
ScheduleRequest = TaskSpec


def _reject_constant(name: str) -> Any:
    raise InvalidInput(f"body is not valid JSON: {name} is not a JSON number")


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidInput('body is empty: send a JSON object such as {"command": "echo hello", "delay_seconds": 5}')
    try:
        text = body.decode("utf-8")  # strictly: json.loads(bytes) would guess UTF-16 from a BOM
    except UnicodeDecodeError:
        raise InvalidInput("body is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except InvalidInput:  # NaN or Infinity, already explained
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer with thousands of digits
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("body is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"body must be a JSON object, not {_json_type(value)}")
    return value


def parse_schedule_request(body: bytes) -> ScheduleRequest:
    return schedule_from_json(parse_json_object(body))


def parse_batch_request(body: bytes) -> list[ScheduleRequest]:
    """`{"tasks": [{...}, ...]}`: every task as for /schedule; one bad task rejects the whole batch."""
    data = parse_json_object(body)
    unknown = sorted(set(data) - {"tasks"})
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown))}; expected 'tasks'")
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        raise InvalidInput(f"tasks must be an array of task objects, not {_json_type(tasks)}")
    if not tasks:
        raise InvalidInput("tasks must not be empty")
    if len(tasks) > MAX_BATCH_TASKS:
        raise InvalidInput(f"{len(tasks)} tasks in one batch; the limit is {MAX_BATCH_TASKS}")
    requests = []
    for index, item in enumerate(tasks):
        if not isinstance(item, dict):
            raise InvalidInput(f"tasks[{index}] must be a JSON object, not {_json_type(item)}")
        try:
            requests.append(schedule_from_json(item))
        except InvalidInput as exc:
            raise InvalidInput(f"tasks[{index}]: {exc}") from None
    return requests


def schedule_from_json(data: dict[str, Any]) -> ScheduleRequest:
    # Once per task of a batch: the common case (no unknown field) builds no set and sorts nothing.
    if not _SCHEDULE_FIELD_SET.issuperset(data):
        unknown = sorted(set(data) - _SCHEDULE_FIELD_SET)
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"expected {', '.join(SCHEDULE_FIELDS)}")
    return ScheduleRequest(
        command=_command(data.get("command")),
        delay_seconds=_number(data.get("delay_seconds", 0), "delay_seconds", 0, MAX_DELAY_SECONDS),
        max_attempts=_integer(data.get("max_attempts", 1), "max_attempts", 1, MAX_ATTEMPTS),
        timeout_seconds=_optional_timeout(data.get("timeout_seconds")),
    )


def parse_task_id(text: str | None) -> uuid.UUID:
    """A task id as the API shows it (8-4-4-4-12 hex digits, any case, surrounding spaces ignored)."""
    if text is None or not text.strip():
        raise InvalidInput("task_id is required, e.g. /status?task_id=<uuid>")
    if not _CANONICAL_UUID.fullmatch(text.strip()):
        raise InvalidInput(f"task_id {text[:100]!r} is not a UUID such as 41ae4338-2c98-414f-822d-86464e8ee5cd")
    return uuid.UUID(text.strip())


def _command(value: Any) -> str:
    if value is None:
        raise InvalidInput("command is required")
    if not isinstance(value, str):
        raise InvalidInput(f"command must be a string, not {_json_type(value)}")
    if not value.strip():
        raise InvalidInput("command must not be empty")
    if "\x00" in value:
        raise InvalidInput("command must not contain a NUL character")
    # ASCII text (CPython knows without looking at it) is one byte a character, and has no surrogates.
    ascii_only = value.isascii()
    size = len(value) if ascii_only else len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_COMMAND_BYTES:
        raise InvalidInput(f"command is {size} bytes; the limit is {MAX_COMMAND_BYTES}")
    if not ascii_only:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput("command contains an unpaired surrogate (not valid Unicode)") from None
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{name} must be a number, not {_json_type(value)}")
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low:g} and {high:.16g}, not {value!r}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    # JSON has one number type: 3.0 (or 3e0) is the integer 3, as JSON Schema's "integer" says.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        shown = repr(value) if isinstance(value, float) else _json_type(value)
        raise InvalidInput(f"{name} must be an integer, not {shown}")
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}, not {value}")
    return value


def _optional_timeout(value: Any) -> float | None:
    if value is None:
        return None
    seconds = _number(value, "timeout_seconds", 0, MAX_TIMEOUT_SECONDS)
    if seconds <= 0:
        raise InvalidInput("timeout_seconds must be greater than 0")
    return seconds


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
