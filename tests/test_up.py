"""`distrack up`: the whole stack in one command, on the embedded PostgreSQL, stopped cleanly."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Api, free_port, pid_alive, wait_for

pytestmark = pytest.mark.slow


class Up:
    def __init__(self, tmp_path: Path, data_dir: Path, workers: int = 2, env_extra: dict | None = None) -> None:
        self.scheduler_port = free_port()
        self.log_path = tmp_path / f"up-{self.scheduler_port}.log"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("POSTGRES_")}
        env.update(env_extra or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distrack",
                "up",
                f"--workers={workers}",
                f"--data_dir={data_dir}",
                f"--scheduler_port={self.scheduler_port}",
                f"--coordinator_port={free_port()}",
                "--worker_port=0",
                f"--output_dir={tmp_path / 'out'}",
                "--heartbeat_interval_s=0.5",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
        self.data_dir = data_dir

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> list[int]:
        wait_for(
            lambda: "Ctrl-C stops everything" in self.log() or self.proc.poll() is not None,
            90,
            what="distrack up to start",
        )
        assert self.proc.poll() is None, self.log()
        return [int(p) for p in re.findall(r"\(pid (\d+)\)", self.log())]

    def postgres_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "pgdata"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_runs_a_task_and_stops_everything(tmp_path, data_dir, sig):
    up = Up(tmp_path, data_dir)
    try:
        children = up.wait_up()
        assert len(children) == 4, up.log()  # coordinator, 2 workers, scheduler
        postgres = up.postgres_pid()
        for line in ("postgres", "coordinator", "worker 1", "worker 2", "scheduler"):
            assert line in up.log()
        api = Api(f"http://127.0.0.1:{up.scheduler_port}")
        doc = api.wait_final(api.schedule("echo from-up")["task_id"])
        assert doc["status"] == "completed"
        assert (tmp_path / "out" / f"{doc['worker_id']}_{doc['task_id']}.txt").read_text() == "from-up\n"
    finally:
        code = up.stop(sig)
    assert code == 0, up.log()
    assert "distrack stopped" in up.log()
    for pid in [*children, postgres]:
        assert not pid_alive(pid), f"pid {pid} outlived distrack up"
    assert not (data_dir / "postmaster.pid").exists()


def test_up_keeps_its_data_between_runs(tmp_path, data_dir):
    first = Up(tmp_path, data_dir, workers=1)
    try:
        first.wait_up()
        api = Api(f"http://127.0.0.1:{first.scheduler_port}")
        task_id = api.wait_final(api.schedule("true")["task_id"])["task_id"]
    finally:
        assert first.stop() == 0, first.log()
    second = Up(tmp_path, data_dir, workers=1)
    try:
        second.wait_up()
        doc = Api(f"http://127.0.0.1:{second.scheduler_port}").status(task_id)
        assert doc["status"] == "completed"
    finally:
        assert second.stop() == 0, second.log()


def test_up_exits_non_zero_and_cleans_up_when_a_port_is_taken(tmp_path, data_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("POSTGRES_")}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "distrack",
                "up",
                "--workers=1",
                f"--data_dir={data_dir}",
                f"--scheduler_port={free_port()}",
                f"--coordinator_port={port}",
                "--worker_port=0",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert out.returncode != 0
    assert f"the coordinator cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert not data_dir.exists(), "PostgreSQL was started although a port was taken"


def test_up_refuses_port_zero_for_the_scheduler(tmp_path, data_dir):
    out = subprocess.run(
        [sys.executable, "-m", "distrack", "up", f"--data_dir={data_dir}", "--scheduler_port=0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "the scheduler needs a fixed port" in out.stderr


def test_a_port_with_connections_in_time_wait_is_free_for_up():
    # What a previous `distrack up` leaves behind: the server side closed first, so its port has
    # connections in TIME_WAIT. gunicorn and gRPC bind it all the same, so the port check must too.
    import socket

    from distrack.up import _check_port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    with pytest.raises(RuntimeError, match="Address already in use"):
        _check_port_free("127.0.0.1", port, "scheduler")  # still listening: taken
    accepted.close()
    client.close()
    server.close()
    _check_port_free("127.0.0.1", port, "scheduler")  # only TIME_WAIT left: free


def test_up_passes_the_api_token_to_its_scheduler(tmp_path, data_dir):
    token = "up-token-0123456789abcdef"
    up = Up(tmp_path, data_dir, workers=1, env_extra={"DISTRACK_API_TOKEN": token})
    try:
        up.wait_up()
        url = f"http://127.0.0.1:{up.scheduler_port}"
        assert Api(url).request("POST", "/schedule", {"command": "true"})[0] == 401
        api = Api(url, token=token)
        assert api.wait_final(api.schedule("echo with-token")["task_id"])["status"] == "completed"
        # Its hint shows how to send the token without printing it.
        assert '-H "Authorization: Bearer $DISTRACK_API_TOKEN"' in up.log()
    finally:
        assert up.stop() == 0, up.log()
    assert token not in up.log()


def test_up_refuses_a_bad_token_file_before_starting_anything(tmp_path, data_dir):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("POSTGRES_")}
    out = subprocess.run(
        [sys.executable, "-m", "distrack", "up", f"--data_dir={data_dir}", f"--scheduler_port={free_port()}"],
        env={**env, "DISTRACK_API_TOKEN_FILE": str(tmp_path / "missing")},
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "distrack up: cannot read the API token from DISTRACK_API_TOKEN_FILE" in out.stderr
    assert not data_dir.exists(), "PostgreSQL was started although the token file is missing"
