"""The API token across real processes: the scheduler reading it from a file, refusing to start on a
bad one, warning when it listens beyond loopback without one; the `distrack` client commands and the
benchmark's client sending it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import Api, free_port, wait_for

from distrack.bench.client import ApiError, SchedulerClient

TOKEN = "test-token-0123456789abcdef"


def distrack(*argv: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrack", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def client_env(cluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTRACK_API_TOKEN", "SCHEDULER_URL"))}
    return {**env, "SCHEDULER_URL": cluster.url, **extra}


def test_the_scheduler_reads_its_token_from_a_file(cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cluster.scheduler(env_extra={"DISTRACK_API_TOKEN_FILE": str(token_file)})
    assert Api(cluster.url).request("POST", "/schedule", {"command": "true"})[0] == 401
    status, doc = Api(cluster.url, token=TOKEN).request("POST", "/schedule", {"command": "true"})
    assert status == 200, doc
    assert Api(cluster.url, token=TOKEN + "x").request("GET", "/openapi.json")[0] == 401
    assert "the API requires a bearer token" in cluster.services[-1].log()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DISTRACK_API_TOKEN_FILE": "/nonexistent/token"}, "cannot read the API token from DISTRACK_API_TOKEN_FILE"),
        ({"DISTRACK_API_TOKEN_FILE": "{empty}"}, "is empty"),
        ({"DISTRACK_API_TOKEN": TOKEN, "DISTRACK_API_TOKEN_FILE": "{empty}"}, "both DISTRACK_API_TOKEN and"),
    ],
)
def test_a_bad_token_setting_stops_the_scheduler_at_start(db_url, tmp_path, env, message):
    empty = tmp_path / "empty"
    empty.write_text("")
    env = {k: v.format(empty=empty) for k, v in env.items()}
    port = free_port()
    out = distrack("scheduler", f"--scheduler_port=127.0.0.1:{port}",
                   env={**os.environ, "DATABASE_URL": db_url, **env})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrack scheduler: ") and message in lines[0], out.stderr
    assert TOKEN not in out.stderr


def test_listening_beyond_loopback_without_a_token_warns(cluster):
    port = free_port()
    # Every interface, as `--scheduler_port=:8081` (and Docker) does; only loopback is ever dialled.
    service = cluster.start("open-scheduler", ["scheduler", f"--scheduler_port=:{port}", "--http_workers=1"])
    cluster.wait_port(port, service)
    line = wait_for(lambda: next((x for x in service.log().splitlines() if "no API token" in x), None),
                    what="the warning")
    assert "WARNING" in line and f"0.0.0.0:{port}" in line and "DISTRACK_API_TOKEN" in line


def test_no_warning_on_loopback_or_with_a_token(cluster):
    quiet = cluster.scheduler()  # 127.0.0.1, no token
    assert Api(cluster.url).request("GET", "/health")[0] == 200
    assert "no API token" not in quiet.log()


# --- clients


@pytest.fixture
def secured(cluster):
    cluster.scheduler(env_extra={"DISTRACK_API_TOKEN": TOKEN})
    return cluster


def test_the_cli_client_commands_send_the_token(secured, tmp_path):
    env = client_env(secured, DISTRACK_API_TOKEN=TOKEN)
    out = distrack("submit", "echo hi", "--delay_seconds=3600", "--max_attempts=2", env=env)
    assert out.returncode == 0, out.stderr
    task = json.loads(out.stdout)
    assert (task["command"], task["status"], task["max_attempts"]) == ("echo hi", "queued", 2)
    out = distrack("status", task["task_id"], env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["task_id"] == task["task_id"], out.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    out = distrack("cancel", task["task_id"], env=client_env(secured, DISTRACK_API_TOKEN_FILE=str(token_file)))
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "cancelled", out.stderr


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "HTTP 401: Authentication required"), ("wrong", "HTTP 401: Invalid token")],
)
def test_the_cli_client_without_the_right_token_fails_with_the_reason(secured, token, message):
    env = client_env(secured, **({"DISTRACK_API_TOKEN": token} if token else {}))
    out = distrack("submit", "echo hi", env=env)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("distrack submit: ") and message in out.stderr
    assert ("set DISTRACK_API_TOKEN" in out.stderr) is (token is None)


def test_the_cli_client_reports_api_errors_and_unreachable_schedulers(secured):
    env = client_env(secured, DISTRACK_API_TOKEN=TOKEN)
    out = distrack("status", "nope", env=env)
    assert out.returncode == 1 and "HTTP 400" in out.stderr and "is not a UUID" in out.stderr
    out = distrack("submit", "   ", env=env)
    assert out.returncode == 1 and "command must not be empty" in out.stderr
    out = distrack("status", "41ae4338-2c98-414f-822d-86464e8ee5cd", f"--url=127.0.0.1:{free_port()}", env=env)
    assert out.returncode == 1 and "cannot reach the scheduler" in out.stderr
    out = distrack("status", "x", "--url=ftp://host", env=env)
    assert out.returncode == 2 and "scheme must be http or https" in out.stderr


def test_the_benchmark_client_sends_the_token(secured):
    client = SchedulerClient(secured.url, token=TOKEN)
    try:
        assert client.schedule("true", 3600)["status"] == "queued"
    finally:
        client.close()
    anonymous = SchedulerClient(secured.url)
    try:
        with pytest.raises(ApiError) as info:
            anonymous.schedule("true", 3600)
        assert info.value.status == 401
    finally:
        anonymous.close()
