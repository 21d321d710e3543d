"""The OpenAPI document: valid (openapi-spec-validator), the one the server serves, covering every
route the app has; and schemathesis fuzzing a live scheduler (real gunicorn, real PostgreSQL, a
token) from it: no 5xx, every response as documented. The number of requests it made is printed in
pytest's summary."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import falcon.inspect
import pytest
from helpers import Api, add_report
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from distrack.scheduler.app import DEFAULT_MAX_BODY_BYTES, create_app
from distrack.scheduler.openapi import COMMAND_PATTERNS, openapi_document
from distrack.scheduler.validation import (
    MAX_BATCH_TASKS,
    MAX_COMMAND_BYTES,
    MAX_DELAY_SECONDS,
    InvalidInput,
    parse_schedule_request,
)

# Bounded so the fuzzing takes well under a minute on two busy cores; DISTRACK_FUZZ_EXAMPLES raises it.
FUZZ_EXAMPLES = int(os.environ.get("DISTRACK_FUZZ_EXAMPLES", "50"))
# Random unless DISTRACK_FUZZ_SEED repeats a run; the seed used is printed with the results.
FUZZ_SEED = int(os.environ.get("DISTRACK_FUZZ_SEED") or random.randrange(2**32))
# gunicorn's access log: `127.0.0.1 - - [date] "METHOD /path HTTP/1.1" STATUS size "-" "agent"`.
ACCESS_LINE = re.compile(r'\] "([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ')


@pytest.mark.parametrize("auth", [True, False])
def test_the_document_is_valid_openapi(auth):
    validate(openapi_document(max_body_bytes=DEFAULT_MAX_BODY_BYTES, auth=auth))


def test_the_document_carries_the_limits_the_parser_enforces():
    doc = openapi_document(max_body_bytes=12345, auth=False)
    request = doc["components"]["schemas"]["ScheduleRequest"]["properties"]
    assert request["command"]["maxLength"] == MAX_COMMAND_BYTES
    assert request["delay_seconds"]["maximum"] == MAX_DELAY_SECONDS
    assert doc["components"]["schemas"]["BatchRequest"]["properties"]["tasks"]["maxItems"] == MAX_BATCH_TASKS
    assert "12345 bytes" in doc["paths"]["/schedule"]["post"]["responses"]["413"]["description"]


def test_every_route_of_the_app_is_documented_and_nothing_else():
    app = create_app(store=None, api_token="t")  # type: ignore[arg-type] - routes only, no request is made
    routed = {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal  # Falcon's own OPTIONS and 405 responders
    }
    doc = openapi_document(max_body_bytes=DEFAULT_MAX_BODY_BYTES, auth=True)
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routed == documented


def test_the_live_server_serves_the_document(secured_cluster):
    status, served = Api(secured_cluster.url, token=secured_cluster.api_token).request("GET", "/openapi.json")
    assert status == 200
    assert served == openapi_document(max_body_bytes=DEFAULT_MAX_BODY_BYTES, auth=True)


def test_fuzzing_the_live_api_finds_no_5xx_and_nothing_undocumented(secured_cluster, tmp_path, request):
    """schemathesis' own runner (its command line: every phase, every check), as a user would run it."""
    config = tmp_path / "schemathesis.toml"
    # The token reaches schemathesis through the environment, not its command line.
    config.write_text(
        f"seed = {FUZZ_SEED}\n"
        "[generation]\n"
        f"max-examples = {FUZZ_EXAMPLES}\n"
        'database = "none"\n'
        "[headers]\n"
        'Authorization = "Bearer ${DISTRACK_FUZZ_TOKEN}"\n'
        # Which answers count as refusing invalid input, and as taking valid input: schemathesis'
        # defaults, less 5xx (never acceptable here), plus 413. The schema cannot say "at most 1 MiB
        # of JSON", so a batch valid or not by the schema can be too large, and 413 is documented.
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]\n'
        "[checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", "401", "403", "404", "409", "413"]\n'
    )
    report = tmp_path / "report.json"
    env = {**os.environ, "DISTRACK_FUZZ_TOKEN": secured_cluster.api_token}
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{secured_cluster.url}/openapi.json", "--checks", "all", "--workers", "1", "--no-color",
         "--report", "json", "--report-json-path", str(report)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    output = run.stdout + run.stderr
    received = [ACCESS_LINE.search(line) for line in secured_cluster.services[0].log().splitlines()]
    statuses = Counter(int(match.group(3)) for match in received if match)
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    assert report.exists(), output
    result = json.loads(report.read_text())
    phases = ", ".join(f"{name} {phase['status']}" for name, phase in result["phases"].items())
    add_report(request.config, "issue 5: schemathesis against a live scheduler with a token", [
        f"  seed {FUZZ_SEED}, max-examples {FUZZ_EXAMPLES} (DISTRACK_FUZZ_SEED, DISTRACK_FUZZ_EXAMPLES), "
        f"exit {run.returncode}",
        f"  operations tested: {result['operations']['tested']} of {result['operations']['total']} "
        "(schemathesis leaves out the document's own GET /openapi.json)",
        f"  phases: {phases}",
        f"  test cases generated: {result['test_cases']['generated']}, with failures: "
        f"{result['test_cases']['with_failures']}, in {result['running_time']:.0f} s",
        f"  requests the server received (its access log): {sum(statuses.values())}",
        "  statuses: " + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())),
        f"  5xx: {server_errors}",
    ])
    assert run.returncode == 0, output
    assert result["failures"] == [] and result["errors"] == [], output
    assert result["operations"]["tested"] == 6 and result["test_cases"]["generated"] >= 6 * 10, output
    assert all(phase["status"] == "success" for name, phase in result["phases"].items() if name != "examples"), output
    assert server_errors == 0, statuses
    assert secured_cluster.api_token not in output


# Characters regex engines disagree on (\s in Python, Rust and ECMAScript), and the usual suspects.
EDGE_CHARACTERS = "\x00\x1c\x1d\x1e\x1f\x85\xa0\u180e\u200b\u3000\ufeff x\t\n"


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(EDGE_CHARACTERS), max_size=4) | st.text(max_size=20))
def test_the_command_patterns_say_what_the_parser_accepts(command):
    """As judged by Python's re and by jsonschema_rs (what schemathesis validates with)."""
    import jsonschema_rs

    schema = {"type": "string", "allOf": COMMAND_PATTERNS}
    documented = all(re.search(p["pattern"], command) for p in COMMAND_PATTERNS)
    assert jsonschema_rs.is_valid(schema, command) == documented
    try:
        parse_schedule_request(json.dumps({"command": command}).encode())
        accepted = True
    except InvalidInput:
        accepted = False
    assert documented == accepted
