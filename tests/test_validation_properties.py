"""Property tests (hypothesis) for the parsing of what HTTP clients send: whatever the bytes, the
parser returns a value within every limit or raises InvalidInput, never anything else; what it
accepts round-trips; every limit holds exactly at its boundary."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from distrack.scheduler.validation import (
    MAX_ATTEMPTS,
    MAX_BATCH_TASKS,
    MAX_COMMAND_BYTES,
    MAX_DELAY_SECONDS,
    MAX_TIMEOUT_SECONDS,
    InvalidInput,
    ScheduleRequest,
    parse_batch_request,
    parse_schedule_request,
    parse_task_id,
)

# The machine is shared with benchmarks: no per-example deadline, a bounded number of examples.
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Each field drawn from values of every JSON type, good and bad, so that all branches are reached.
field_values = {
    "command": st.text(max_size=40) | json_values,
    "delay_seconds": st.integers() | st.floats() | json_values,
    "max_attempts": st.integers(-5, 200) | st.floats() | json_values,
    "timeout_seconds": st.none() | st.floats() | st.integers() | json_values,
}
schedule_objects = st.fixed_dictionaries({}, optional={**field_values, "extra": json_values})

valid_commands = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=200
).filter(lambda s: s.strip())
valid_requests = st.builds(
    ScheduleRequest,
    command=valid_commands,
    delay_seconds=st.floats(0, MAX_DELAY_SECONDS) | st.integers(0, MAX_DELAY_SECONDS),
    max_attempts=st.integers(1, MAX_ATTEMPTS),
    timeout_seconds=st.none() | st.floats(0, MAX_TIMEOUT_SECONDS, exclude_min=True),
)


def assert_within_limits(request: ScheduleRequest) -> None:
    assert isinstance(request.command, str) and request.command.strip() and "\x00" not in request.command
    assert len(request.command.encode("utf-8")) <= MAX_COMMAND_BYTES
    assert isinstance(request.delay_seconds, float) and 0 <= request.delay_seconds <= MAX_DELAY_SECONDS
    assert type(request.max_attempts) is int and 1 <= request.max_attempts <= MAX_ATTEMPTS
    timeout = request.timeout_seconds
    assert timeout is None or (isinstance(timeout, float) and 0 < timeout <= MAX_TIMEOUT_SECONDS)


def parse_or_reject(parse, body: bytes):  # noqa: ANN001, ANN201
    """The parser's result, or None when it raised InvalidInput; any other exception fails the test."""
    try:
        return parse(body)
    except InvalidInput as exc:
        assert str(exc)  # a message for the client
        return None


@PROPERTY
@given(st.binary(max_size=512))
@example(b"\xef\xbb\xbf{}")  # a UTF-8 byte order mark
@example(b'{"command": "x", "delay_seconds": NaN}')
@example(b"[" * 5000 + b"]" * 5000)
@example(b'{"command": "x", "max_attempts": 1' + b"0" * 5000 + b"}")
def test_any_bytes_parse_or_get_invalid_input(body):
    request = parse_or_reject(parse_schedule_request, body)
    if request is not None:
        assert_within_limits(request)


@PROPERTY
@given(json_values)
def test_any_json_value_parses_or_gets_invalid_input(value):
    body = json.dumps(value).encode()
    request = parse_or_reject(parse_schedule_request, body)
    if request is not None:
        assert_within_limits(request)
    batch = parse_or_reject(parse_batch_request, body)
    for item in batch or []:
        assert_within_limits(item)


@PROPERTY
@given(schedule_objects)
def test_any_schedule_object_parses_within_the_limits_or_gets_invalid_input(doc):
    request = parse_or_reject(parse_schedule_request, json.dumps(doc).encode())
    if request is not None:
        assert_within_limits(request)
        assert request.command == doc["command"]


@PROPERTY
@given(valid_requests)
def test_accepted_values_round_trip(spec):
    doc = {"command": spec.command, "delay_seconds": spec.delay_seconds, "max_attempts": spec.max_attempts,
           "timeout_seconds": spec.timeout_seconds}
    parsed = parse_schedule_request(json.dumps(doc).encode())
    assert parsed == ScheduleRequest(spec.command, float(spec.delay_seconds), spec.max_attempts, spec.timeout_seconds)
    # Defaults when the optional fields are left out.
    assert parse_schedule_request(json.dumps({"command": spec.command}).encode()) == ScheduleRequest(spec.command)


@PROPERTY
@given(st.lists(valid_requests, min_size=1, max_size=20), st.data())
def test_a_batch_round_trips_and_one_bad_task_is_named(specs, data):
    tasks = [{"command": s.command, "delay_seconds": s.delay_seconds, "max_attempts": s.max_attempts} for s in specs]
    parsed = parse_batch_request(json.dumps({"tasks": tasks}).encode())
    assert [(p.command, p.delay_seconds, p.max_attempts) for p in parsed] == [
        (s.command, float(s.delay_seconds), s.max_attempts) for s in specs]
    index = data.draw(st.integers(0, len(tasks) - 1))
    tasks[index] = {**tasks[index], "delay_seconds": -1}
    with pytest.raises(InvalidInput, match=rf"^tasks\[{index}\]: delay_seconds must be between"):
        parse_batch_request(json.dumps({"tasks": tasks}).encode())


@PROPERTY
@given(st.uuids(), st.sampled_from([str, lambda u: str(u).upper(), lambda u: f"  {u}\t"]))
def test_any_uuid_in_its_usual_forms_is_a_task_id(value, spell):
    assert parse_task_id(spell(value)) == value


@PROPERTY
@given(st.text(max_size=60) | st.uuids().map(lambda u: u.hex) | st.uuids().map(lambda u: f"{{{u}}}"))
@example("urn:uuid:41ae4338-2c98-414f-822d-86464e8ee5cd")
@example("41ae4338-2c98-414f-822d-86464e8ee5cd\x00")
@example("41ae4338-2c98-414f-822d-86464e8ee5c\u0661")  # an Arabic-Indic digit one
def test_any_text_is_a_canonical_task_id_or_invalid_input(text):
    try:
        parsed = parse_task_id(text)
    except InvalidInput:
        return
    assert str(parsed) == text.strip().lower()


# --- every limit exactly at its boundary


def accepts(**fields) -> bool:
    try:
        parse_schedule_request(json.dumps({"command": "x", **fields}).encode())
    except InvalidInput:
        return False
    return True


@pytest.mark.parametrize(
    ("field", "inside", "outside"),
    [
        ("delay_seconds", [0, -0.0, MAX_DELAY_SECONDS, float(MAX_DELAY_SECONDS)],
         [-5e-324, math.nextafter(MAX_DELAY_SECONDS, math.inf), MAX_DELAY_SECONDS + 1]),
        ("max_attempts", [1, MAX_ATTEMPTS, 1.0, float(MAX_ATTEMPTS)], [0, MAX_ATTEMPTS + 1, 1.5, True]),
        ("timeout_seconds", [5e-324, 1, MAX_TIMEOUT_SECONDS, None],
         [0, -0.0, -1, math.nextafter(MAX_TIMEOUT_SECONDS, math.inf), MAX_TIMEOUT_SECONDS + 1]),
    ],
)
def test_numeric_limits_hold_exactly_at_the_boundary(field, inside, outside):
    for value in inside:
        assert accepts(**{field: value}), value
    for value in outside:
        assert not accepts(**{field: value}), value


@pytest.mark.parametrize("char", ["e", "é", "€", "😀"])  # 1, 2, 3 and 4 bytes in UTF-8
def test_command_limit_is_exactly_64_kib_of_utf8(char):
    size = len(char.encode())
    fits = char * (MAX_COMMAND_BYTES // size) + "e" * (MAX_COMMAND_BYTES % size)
    assert len(fits.encode()) == MAX_COMMAND_BYTES
    assert parse_schedule_request(json.dumps({"command": fits}).encode()).command == fits
    with pytest.raises(InvalidInput, match=f"command is {MAX_COMMAND_BYTES + 1} bytes"):
        parse_schedule_request(json.dumps({"command": fits + "e"}).encode())


def test_batch_limit_is_exact():
    body = json.dumps({"tasks": [{"command": "x"}] * MAX_BATCH_TASKS}).encode()
    assert len(parse_batch_request(body)) == MAX_BATCH_TASKS
    with pytest.raises(InvalidInput, match=f"{MAX_BATCH_TASKS + 1} tasks in one batch"):
        parse_batch_request(json.dumps({"tasks": [{"command": "x"}] * (MAX_BATCH_TASKS + 1)}).encode())


@pytest.mark.parametrize(("depth", "message"), [(100, "command must be a string"), (100_000, "nested too deeply")])
def test_deeply_nested_json_is_invalid_input_not_a_crash(depth, message):
    body = b'{"command": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(InvalidInput, match=message):
        parse_schedule_request(body)


def test_a_canonical_uuid_is_required():
    tid = uuid.uuid4()
    for bad in (tid.hex, f"{{{tid}}}", f"urn:uuid:{tid}", str(tid)[:-1], f"{tid}0"):
        with pytest.raises(InvalidInput, match="is not a UUID"):
            parse_task_id(bad)


def test_whitespace_is_exactly_what_str_strip_removes():
    import sys

    from distrack.scheduler.validation import WHITESPACE

    assert sorted(WHITESPACE) == [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
