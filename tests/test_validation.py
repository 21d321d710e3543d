"""Parsing of what HTTP clients send: every bad input gets InvalidInput with a useful message."""

import json
import uuid

import pytest

from distrack.scheduler.validation import (
    MAX_COMMAND_BYTES,
    MAX_DELAY_SECONDS,
    InvalidInput,
    ScheduleRequest,
    parse_schedule_request,
    parse_task_id,
)


def parse(doc: object) -> ScheduleRequest:
    return parse_schedule_request(json.dumps(doc).encode())


def test_minimal_request_gets_defaults():
    assert parse({"command": "echo hi"}) == ScheduleRequest("echo hi", 0.0, 1, None)


def test_all_fields():
    req = parse({"command": "x", "delay_seconds": 2.5, "max_attempts": 3, "timeout_seconds": 10})
    assert req == ScheduleRequest("x", 2.5, 3, 10.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body is empty"),
        (b"   ", "body is empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"echo"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
        (b'{"delay_seconds": 1}', "command is required"),
        (b'{"command": null}', "command is required"),
        (b'{"command": ""}', "must not be empty"),
        (b'{"command": "   \\n"}', "must not be empty"),
        (b'{"command": 42}', "command must be a string, not a number"),
        (b'{"command": ["echo"]}', "command must be a string, not an array"),
        (b'{"command": "a\\u0000b"}', "NUL"),
        (b'{"command": "\\ud800"}', "surrogate"),
        (b'{"command": "x", "delay_seconds": -1}', "delay_seconds must be between"),
        (b'{"command": "x", "delay_seconds": "5"}', "delay_seconds must be a number, not a string"),
        (b'{"command": "x", "delay_seconds": true}', "delay_seconds must be a number, not a boolean"),
        (b'{"command": "x", "delay_seconds": 1e999}', "delay_seconds must be between"),
        (b'{"command": "x", "delay_seconds": NaN}', "not a JSON number"),
        (b'{"command": "x", "delay_seconds": Infinity}', "not a JSON number"),
        (b'{"command": "x", "delay_seconds": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"command": "x", "delay_seconds": 100000000000000000000000000}', "delay_seconds must be between"),
        (b'{"command": "x", "max_attempts": 0}', "max_attempts must be between"),
        (b'{"command": "x", "max_attempts": 1.5}', "max_attempts must be an integer"),
        (b'{"command": "x", "timeout_seconds": 0}', "timeout_seconds must be greater than 0"),
        (b'{"command": "x", "dealy_seconds": 5}', "unknown field(s) 'dealy_seconds'"),
        (b"[" * 100000, "not valid JSON"),
    ],
)
def test_bad_input_is_rejected_with_a_message(body: bytes, message: str):
    with pytest.raises(InvalidInput) as info:
        parse_schedule_request(body)
    assert message in str(info.value)


def test_delay_limits_are_inclusive():
    assert parse({"command": "x", "delay_seconds": MAX_DELAY_SECONDS}).delay_seconds == MAX_DELAY_SECONDS
    with pytest.raises(InvalidInput):
        parse({"command": "x", "delay_seconds": MAX_DELAY_SECONDS + 0.001})


def test_command_size_limit_counts_utf8_bytes():
    assert parse({"command": "e" * MAX_COMMAND_BYTES}).command
    with pytest.raises(InvalidInput, match="limit is"):
        parse({"command": "é" * (MAX_COMMAND_BYTES // 2 + 1)})


def test_task_id_parsing():
    tid = uuid.uuid4()
    assert parse_task_id(str(tid)) == tid
    assert parse_task_id(f" {tid} ") == tid
    for bad, message in [(None, "required"), ("", "required"), ("nope", "not a UUID"), ("1234", "not a UUID")]:
        with pytest.raises(InvalidInput, match=message):
            parse_task_id(bad)


def test_a_batch_of_tasks_is_parsed_in_order():
    from distrack.scheduler.validation import parse_batch_request

    body = json.dumps({"tasks": [{"command": "a"}, {"command": "b", "delay_seconds": 2, "max_attempts": 3}]})
    assert parse_batch_request(body.encode()) == [ScheduleRequest("a"), ScheduleRequest("b", 2.0, 3, None)]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "tasks must be an array"),
        ({"tasks": {}}, "tasks must be an array of task objects, not an object"),
        ({"tasks": []}, "must not be empty"),
        ({"tasks": ["echo"]}, "tasks[0] must be a JSON object"),
        ({"tasks": [{"command": "ok"}, {"command": ""}]}, "tasks[1]: command must not be empty"),
        ({"tasks": [{"command": "ok", "delay_seconds": -1}]}, "tasks[0]: delay_seconds must be between"),
        ({"tasks": [{"command": "ok"}], "extra": 1}, "unknown field(s) 'extra'"),
    ],
)
def test_a_bad_batch_is_rejected_whole_and_says_where(doc, message):
    from distrack.scheduler.validation import parse_batch_request

    with pytest.raises(InvalidInput) as info:
        parse_batch_request(json.dumps(doc).encode())
    assert message in str(info.value)


def test_batch_size_limit():
    from distrack.scheduler.validation import MAX_BATCH_TASKS, parse_batch_request

    assert len(parse_batch_request(json.dumps({"tasks": [{"command": "x"}] * MAX_BATCH_TASKS}).encode())) == (
        MAX_BATCH_TASKS)
    with pytest.raises(InvalidInput, match="the limit is"):
        parse_batch_request(json.dumps({"tasks": [{"command": "x"}] * (MAX_BATCH_TASKS + 1)}).encode())


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_explained_once(constant):
    with pytest.raises(InvalidInput) as info:
        parse_schedule_request(b'{"command": "x", "delay_seconds": %s}' % constant.encode())
    assert str(info.value) == f"body is not valid JSON: {constant} is not a JSON number"


def test_range_messages_show_the_limit_in_full():
    with pytest.raises(InvalidInput) as info:
        parse({"command": "x", "delay_seconds": MAX_DELAY_SECONDS + 1})
    assert str(info.value) == f"delay_seconds must be between 0 and {MAX_DELAY_SECONDS}, not {MAX_DELAY_SECONDS + 1}"


@pytest.mark.parametrize(("value", "expected"), [(3.0, 3), (1e2, 100), (1, 1)])
def test_integral_numbers_are_integers(value, expected):
    assert parse({"command": "x", "max_attempts": value}).max_attempts == expected
