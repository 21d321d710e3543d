"""Issue 5 against real processes on loopback: the cluster token, (mutual) TLS, the scheduler over
HTTPS, and the environment tasks run in.

Each attack is paired with the same call made with the right credentials, which goes through: that
is what shows the refusal comes from the check and not from something else in the way.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest
from certs import CertificateAuthority
from helpers import TEST_HEARTBEAT_S, Api, RecordingCoordinator, Service, free_port, wait_for

from distrack import up
from distrack.cli import main
from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.transport import TransportSecurity, add_port, client_channel, load_security, server_interceptors

TOKEN = secrets.token_hex(16)
WRONG = secrets.token_hex(16)
Status = distrack_pb2.TaskStatus


def rpc_code(fn, request) -> grpc.StatusCode:
    try:
        fn(request, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def worker_stub(port: int, security: TransportSecurity) -> distrack_pb2_grpc.WorkerStub:
    return distrack_pb2_grpc.WorkerStub(client_channel(f"127.0.0.1:{port}", security))


def coordinator_stub(port: int, security: TransportSecurity) -> distrack_pb2_grpc.CoordinatorStub:
    return distrack_pb2_grpc.CoordinatorStub(client_channel(f"127.0.0.1:{port}", security))


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def query(db_url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


# --- a worker: nobody without the token hands it a task


def serve_coordinator(coordinator: RecordingCoordinator) -> tuple[grpc.Server, int]:
    """A started in-test coordinator on a free loopback port that requires the cluster token."""
    server = grpc.server(ThreadPoolExecutor(4), interceptors=server_interceptors(TransportSecurity(token=TOKEN)))
    distrack_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    port = add_port(server, "127.0.0.1:0", TransportSecurity())
    server.start()
    return server, port


@pytest.fixture
def lone_worker(tmp_path):
    """A worker process with a cluster token, heartbeating to an in-test coordinator that requires it."""
    coordinator = RecordingCoordinator()
    server, coordinator_port = serve_coordinator(coordinator)
    port = free_port()
    env = dict(os.environ, DISTRACK_CLUSTER_TOKEN=TOKEN)
    service = Service("worker", [
        "worker", f"--worker_port=127.0.0.1:{port}", f"--coordinator=127.0.0.1:{coordinator_port}",
        f"--output_dir={tmp_path / 'out'}", f"--heartbeat_interval_s={TEST_HEARTBEAT_S}", "--shutdown_grace_s=1",
    ], env, tmp_path)
    try:
        wait_for(lambda: coordinator.heartbeats, 20, what="the worker's first heartbeat (with the token)")
        yield service, port, coordinator, tmp_path / "out"
    finally:
        service.stop()
        server.stop(0).wait()


def test_a_worker_refuses_a_task_from_anyone_without_the_token(lone_worker, tmp_path):
    service, port, coordinator, output_dir = lone_worker
    ran = tmp_path / "ran"
    tag = uuid.uuid4().hex
    refused = []
    for security in (TransportSecurity(), TransportSecurity(token=WRONG)):
        task_id = str(uuid.uuid4())
        refused.append(task_id)
        request = distrack_pb2.TaskRequest(task_id=task_id, command=f"touch {ran}; sleep 30 # {tag}", attempt=1,
                                           lease=1)
        stub = worker_stub(port, security)
        assert rpc_code(stub.SubmitTask, request) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.CancelTask, distrack_pb2.CancelTaskRequest(task_id=task_id)) == \
            grpc.StatusCode.UNAUTHENTICATED
    # The same call with the token runs (this coordinator records any start): only the token said no.
    allowed = str(uuid.uuid4())
    reply = worker_stub(port, TransportSecurity(token=TOKEN)).SubmitTask(
        distrack_pb2.TaskRequest(task_id=allowed, command=f"echo {tag} > {tmp_path / 'allowed'}", attempt=1, lease=1),
        timeout=5)
    assert reply.accepted
    wait_for(lambda: any(r.task_id == allowed and r.status == Status.COMPLETED for r in coordinator.reports),
             what="the allowed task to complete")
    assert (tmp_path / "allowed").read_text().strip() == tag
    # Nothing of the refused ones: no start reported, no output file, no file touched, no process.
    assert not [r for r in coordinator.reports if r.task_id in refused]
    assert not [p for p in output_dir.iterdir() if any(t in p.name for t in refused)]
    assert not ran.exists()
    assert processes_mentioning(tag) == []
    assert "no cluster token" in service.log() and "wrong cluster token" in service.log()
    assert TOKEN not in service.log() and WRONG not in service.log()


def test_a_worker_with_a_token_refused_by_its_coordinator_says_so(tmp_path):
    server, coordinator_port = serve_coordinator(RecordingCoordinator())
    service = Service("worker", [
        "worker", "--worker_port=127.0.0.1:0", f"--coordinator=127.0.0.1:{coordinator_port}",
        f"--output_dir={tmp_path / 'out'}", f"--heartbeat_interval_s={TEST_HEARTBEAT_S}",
    ], dict(os.environ, DISTRACK_CLUSTER_TOKEN=WRONG), tmp_path)
    try:
        wait_for(lambda: "UNAUTHENTICATED" in service.log(), 20, what="the worker to log the refusal")
        line = next(line for line in service.log().splitlines() if "UNAUTHENTICATED" in line)
        assert "heartbeat to 127.0.0.1:" in line and "DISTRACK_CLUSTER_TOKEN" in line and WRONG not in line
    finally:
        service.stop()
        server.stop(0).wait()


# --- the coordinator: nobody without the token reports or heartbeats


def test_a_cluster_with_a_token_runs_a_task_end_to_end(cluster):
    cluster.env["DISTRACK_CLUSTER_TOKEN"] = TOKEN
    coordinator = cluster.coordinator()
    worker = cluster.worker()
    cluster.scheduler()
    api = Api(cluster.url)
    doc = api.wait_final(api.schedule("echo through-the-token")["task_id"])
    assert doc["status"] == "completed", doc
    out = cluster.output_dir / f"{doc['worker_id']}_{doc['task_id']}.txt"
    assert out.read_text() == "through-the-token\n"
    assert "cluster token required" in coordinator.log() and "cluster token required" in worker.log()
    assert TOKEN not in cluster.logs()
    assert "refused" not in coordinator.log()


def test_forged_reports_heartbeats_and_leaving_are_refused_by_the_coordinator(cluster):
    cluster.env["DISTRACK_CLUSTER_TOKEN"] = TOKEN
    coordinator = cluster.coordinator()
    worker = cluster.worker("--shutdown_grace_s=1")
    worker_id = cluster.worker_id(worker)
    cluster.wait_joined(1)
    (task_id,) = query(cluster.db_url, "INSERT INTO tasks (id, command, scheduled_at) "
                                       "VALUES (gen_random_uuid(), 'sleep 30', now()) RETURNING id")[0]
    wait_for(lambda: query(cluster.db_url, "SELECT status FROM tasks WHERE id = %s", task_id)[0][0] == "running",
             what="the task to run")
    (lease,) = query(cluster.db_url, "SELECT lease FROM tasks WHERE id = %s", task_id)[0]

    def row() -> tuple:
        return query(cluster.db_url, "SELECT status, exit_code, completed_at, failed_at, worker_id, lease "
                                     "FROM tasks WHERE id = %s", task_id)[0]

    before = row()
    forged = distrack_pb2.TaskStatusUpdate(task_id=str(task_id), worker_id=worker_id, status=Status.FAILED,
                                           attempt=1, lease=lease, exit_code=99, error="forged")
    intruder = distrack_pb2.HeartbeatRequest(worker_id="intruder", address="127.0.0.1:1", slots=50)
    for security in (TransportSecurity(), TransportSecurity(token=WRONG)):
        stub = coordinator_stub(cluster.coordinator_port, security)
        assert rpc_code(stub.UpdateTaskStatus, forged) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.Heartbeat, intruder) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.Deregister, distrack_pb2.DeregisterRequest(worker_id=worker_id)) == \
            grpc.StatusCode.UNAUTHENTICATED
    assert row() == before and before[0] == "running"
    workers = {r[0] for r in query(cluster.db_url, "SELECT worker_id FROM workers")}
    assert workers == {worker_id}
    assert "no cluster token" in coordinator.log() and "wrong cluster token" in coordinator.log()
    # With the token, the very same forged report is recorded: the token is what kept it out.
    trusted = coordinator_stub(cluster.coordinator_port, TransportSecurity(token=TOKEN))
    assert trusted.UpdateTaskStatus(forged, timeout=5).recorded
    assert row()[:2] == ("failed", 99)


def test_with_mismatched_tokens_a_worker_never_joins_and_both_logs_say_why(cluster):
    coordinator = cluster.coordinator(env_extra={"DISTRACK_CLUSTER_TOKEN": TOKEN})
    worker = cluster.worker(env_extra={"DISTRACK_CLUSTER_TOKEN": WRONG})
    wait_for(lambda: "wrong cluster token" in coordinator.log(), 20, what="the coordinator to refuse the worker")
    wait_for(lambda: "UNAUTHENTICATED" in worker.log(), 20, what="the worker to say it was refused")
    assert "DISTRACK_CLUSTER_TOKEN" in worker.log()
    assert query(cluster.db_url, "SELECT count(*) FROM workers")[0][0] == 0
    assert TOKEN not in cluster.logs() and WRONG not in cluster.logs()


def test_a_dispatch_a_worker_refuses_for_its_token_goes_back_to_the_queue_and_runs_elsewhere(cluster):
    # A coordinator without the token still records a worker that has one (it checks nothing), but
    # that worker refuses its dispatches: the task must neither be lost nor cost an attempt.
    coordinator = cluster.coordinator()
    cluster.worker(env_extra={"DISTRACK_CLUSTER_TOKEN": TOKEN})
    cluster.wait_joined(1)
    cluster.scheduler()
    api = Api(cluster.url)
    task = api.schedule("echo finally")
    wait_for(lambda: "UNAUTHENTICATED" in coordinator.log(), 20, what="the worker to refuse the dispatch")
    doc = api.status(task["task_id"])
    assert doc["status"] in ("queued", "picked") and doc["attempts"] == 0
    cluster.worker()  # no token: takes the coordinator's calls
    doc = api.wait_final(task["task_id"], timeout=30)
    assert doc["status"] == "completed" and doc["attempts"] == 1


# --- TLS


@pytest.fixture
def pki(tmp_path):
    return CertificateAuthority(tmp_path / "pki")


def test_a_mutual_tls_cluster_with_a_token_runs_a_task_and_refuses_other_clients(cluster, pki, tmp_path):
    # One certificate for every node, naming none of their addresses: the coordinator dials workers
    # at the IP they advertise, so the name is checked through DISTRACK_TLS_SERVER_NAME.
    node = pki.issue("node", sans=("distrack-node",))
    cluster.env.update(DISTRACK_CLUSTER_TOKEN=TOKEN, DISTRACK_TLS_CERT=str(node.cert), DISTRACK_TLS_KEY=str(node.key),
                       DISTRACK_TLS_CA=str(pki.path), DISTRACK_TLS_SERVER_NAME="distrack-node")
    coordinator = cluster.coordinator()
    worker = cluster.worker()
    cluster.scheduler()
    api = Api(cluster.url)
    doc = api.wait_final(api.schedule("echo over-tls")["task_id"])
    assert doc["status"] == "completed", doc
    assert "mutual TLS, server name distrack-node, cluster token required" in coordinator.log()
    assert "mutual TLS" in worker.log()

    client = pki.issue("client", sans=("client",))
    request = distrack_pb2.TaskRequest(task_id=str(uuid.uuid4()), command="true", attempt=1, lease=1)
    attempts = {
        "plaintext": TransportSecurity(token=TOKEN),
        "no client certificate": load_security(token=TOKEN, ca_file=str(pki.path), server_name="distrack-node"),
        "certificate, no token": load_security(cert_file=str(client.cert), key_file=str(client.key),
                                               ca_file=str(pki.path), server_name="distrack-node"),
    }
    codes = {name: rpc_code(worker_stub(worker.port, sec).SubmitTask, request) for name, sec in attempts.items()}
    assert codes == {"plaintext": grpc.StatusCode.UNAVAILABLE, "no client certificate": grpc.StatusCode.UNAVAILABLE,
                     "certificate, no token": grpc.StatusCode.UNAUTHENTICATED}
    # The coordinator's port too.
    beat = distrack_pb2.HeartbeatRequest(worker_id="intruder", address="127.0.0.1:1", slots=1)
    codes = {name: rpc_code(coordinator_stub(cluster.coordinator_port, sec).Heartbeat, beat)
             for name, sec in attempts.items()}
    assert codes == {"plaintext": grpc.StatusCode.UNAVAILABLE, "no client certificate": grpc.StatusCode.UNAVAILABLE,
                     "certificate, no token": grpc.StatusCode.UNAUTHENTICATED}
    assert query(cluster.db_url, "SELECT count(*) FROM workers WHERE worker_id = 'intruder'")[0][0] == 0


def test_a_worker_that_does_not_trust_the_coordinators_certificate_never_joins(cluster, pki, tmp_path):
    node = pki.issue("node")
    cluster.env.update(DISTRACK_TLS_CERT=str(node.cert), DISTRACK_TLS_KEY=str(node.key), DISTRACK_TLS_CA=str(pki.path))
    cluster.coordinator()
    stranger_ca = CertificateAuthority(tmp_path / "other", name="other CA")
    stranger = stranger_ca.issue("stranger")
    worker = cluster.worker(env_extra={"DISTRACK_TLS_CERT": str(stranger.cert), "DISTRACK_TLS_KEY": str(stranger.key),
                                       "DISTRACK_TLS_CA": str(stranger_ca.path)})
    wait_for(lambda: "TLS handshake failed" in worker.log(), 20, what="the worker to log the failed handshake")
    assert query(cluster.db_url, "SELECT count(*) FROM workers")[0][0] == 0


# --- configuration mistakes stop a service at start


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["worker"], {"DISTRACK_CLUSTER_TOKEN": TOKEN, "DISTRACK_CLUSTER_TOKEN_FILE": "{token}"}, "not both"),
        (["coordinator"], {"DISTRACK_CLUSTER_TOKEN_FILE": "{empty}"}, "is empty"),
        (["worker", "--cluster_token_file={missing}"], {}, "cannot read the cluster token file"),
        (["worker", "--tls_cert={cert}"], {}, "DISTRACK_TLS_KEY (--tls_key) is not"),
        (["coordinator"], {"DISTRACK_TLS_CA": "{ca}"}, "needs DISTRACK_TLS_CERT and DISTRACK_TLS_KEY"),
        (["worker"], {"DISTRACK_TLS_CERT": "{cert}", "DISTRACK_TLS_KEY": "{missing}"}, "cannot read the TLS key"),
        (["worker"], {"DISTRACK_TASK_ENV_ALLOW": "APP_*,DATABASE_URL"}, "names DATABASE_URL"),
        (["worker", "--task_env_allow=DISTRACK_CLUSTER_TOKEN"], {}, "names DISTRACK_CLUSTER_TOKEN"),
        (["scheduler", "--https_cert={cert}"], {}, "DISTRACK_HTTPS_KEY"),
        (["scheduler"], {"DISTRACK_HTTPS_CERT": "{cert}", "DISTRACK_HTTPS_KEY": "{other_key}"}, "does not go with"),
    ],
)
def test_a_misconfiguration_is_one_clear_line_and_exit_2(pki, tmp_path, monkeypatch, capsys, argv, env, message):
    node, other = pki.issue("node"), pki.issue("other")
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "empty").write_text("")
    files = {"token": tmp_path / "token", "empty": tmp_path / "empty", "missing": tmp_path / "missing",
             "cert": node.cert, "other_key": other.key, "ca": pki.path}
    for name in ("DISTRACK_CLUSTER_TOKEN", "DISTRACK_CLUSTER_TOKEN_FILE", "DISTRACK_TLS_CERT", "DISTRACK_TLS_KEY",
                 "DISTRACK_TLS_CA", "DISTRACK_TLS_SERVER_NAME", "DISTRACK_HTTPS_CERT", "DISTRACK_HTTPS_KEY",
                 "DISTRACK_TASK_ENV_ALLOW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # never reached
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**files))
    assert main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and TOKEN not in err[0], err


# --- the scheduler over HTTPS


def test_the_scheduler_serves_https_with_its_certificate(cluster, pki):
    server = pki.issue("scheduler")
    cluster.scheduler(f"--https_cert={server.cert}", f"--https_key={server.key}")
    context = ssl.create_default_context(cafile=str(pki.path))
    base = f"https://127.0.0.1:{cluster.scheduler_port}"
    with urllib.request.urlopen(f"{base}/health", context=context, timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    req = urllib.request.Request(f"{base}/schedule", data=b'{"command": "true"}', method="POST")
    with urllib.request.urlopen(req, context=context, timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "queued"
    # `distrack up` sees it come up too (its probe does not need the CA).
    up._wait_for_http(f"{base}/health", up.Child("scheduler", [], base), time.monotonic() + 10)
    # A client that does not trust the CA stops at the handshake; plain HTTP gets no answer.
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen(f"{base}/health", context=ssl.create_default_context(), timeout=10)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    conn = http.client.HTTPConnection("127.0.0.1", cluster.scheduler_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()


# --- what a task sees


def test_a_task_runs_in_its_directory_with_a_clean_environment(cluster, tmp_path):
    task_dir = tmp_path / "tasks"
    cluster.env.update(DISTRACK_CLUSTER_TOKEN=TOKEN, POSTGRES_PASSWORD="hunter2", APP_MODE="batch",
                       APP_REGION="eu", NOT_ALLOWED="nope",
                       DISTRACK_TASK_ENV_ALLOW="DISTRACK_TEST_CLUSTER,APP_*")
    cluster.coordinator()
    cluster.worker(f"--task_dir={task_dir}")
    cluster.scheduler()
    api = Api(cluster.url)
    doc = api.wait_final(api.schedule("env; echo PWD_IS=$(pwd); touch made-here")["task_id"])
    assert doc["status"] == "completed", doc
    out = (cluster.output_dir / f"{doc['worker_id']}_{doc['task_id']}.txt").read_text()
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["PWD_IS"] == str(task_dir) and (task_dir / "made-here").exists()
    assert env["HOME"] == str(task_dir)
    assert env["APP_MODE"] == "batch" and env["APP_REGION"] == "eu"
    assert env["DISTRACK_TASK_ID"] == doc["task_id"] and env["DISTRACK_WORKER_ID"] == doc["worker_id"]
    for hidden in ("DATABASE_URL", "POSTGRES_PASSWORD", "DISTRACK_CLUSTER_TOKEN", "NOT_ALLOWED", "PYTHONUNBUFFERED"):
        assert hidden not in env, hidden
    assert TOKEN not in out and "hunter2" not in out and cluster.db_url not in out



# How a task would read a process's environment; the task's own shell is the control.
READ_ENVIRON = """
if cat /proc/$PPID/environ > /dev/null 2>&1; then echo WORKER_ENVIRON=read; else echo WORKER_ENVIRON=refused; fi
if cat /proc/$$/environ > /dev/null 2>&1; then echo OWN_ENVIRON=read; else echo OWN_ENVIRON=refused; fi
"""


def test_a_task_cannot_read_the_workers_own_environment_in_proc(tmp_path):
    # As an ordinary user, as workers should run: root (here) has CAP_SYS_PTRACE and reads anything.
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="distrack-shield-"))
    home.chmod(0o777)
    coordinator = RecordingCoordinator()
    server, coordinator_port = serve_coordinator(coordinator)
    port = free_port()
    env = dict(os.environ, DISTRACK_CLUSTER_TOKEN=TOKEN, DATABASE_URL="postgresql://distrack:hunter2@db/distrack")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*as_user, sys.executable, "-m", "distrack", "worker", f"--worker_port=127.0.0.1:{port}",
             f"--coordinator=127.0.0.1:{coordinator_port}", f"--output_dir={home / 'out'}",
             f"--heartbeat_interval_s={TEST_HEARTBEAT_S}", "--shutdown_grace_s=1"],
            env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_for(lambda: coordinator.heartbeats, 20, what="the worker's first heartbeat")
        task_id = str(uuid.uuid4())
        reply = worker_stub(port, TransportSecurity(token=TOKEN)).SubmitTask(
            distrack_pb2.TaskRequest(task_id=task_id, command=READ_ENVIRON, attempt=1, lease=1), timeout=5)
        assert reply.accepted
        wait_for(lambda: any(r.task_id == task_id and r.status == Status.COMPLETED for r in coordinator.reports),
                 what="the task to complete")
        (output,) = (home / "out").glob(f"*_{task_id}.txt")
        out = output.read_text()
        # The read works on a process that is not shielded (the task's own shell)...
        assert "OWN_ENVIRON=read" in out, out
        # ...and not on the worker, whose environment holds DATABASE_URL and the token.
        assert "WORKER_ENVIRON=refused" in out, out
        assert "non-dumpable" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop(0).wait()
        shutil.rmtree(home, ignore_errors=True)


def test_every_distrack_command_shields_its_process_first(tmp_path):
    # The other services hold secrets too, and a task may run as their user (as under distrack up).
    probe = ("import ctypes, sys\nfrom distrack.cli import main\nrc = main(sys.argv[1:])\n"
             "print(rc, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")  # PR_GET_DUMPABLE
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("POSTGRES_")}
    for command in ("coordinator", "scheduler", "migrate", "worker"):
        argv = [command] + (["--cluster_token_file=/nonexistent"] if command == "worker" else [])
        out = subprocess.run([sys.executable, "-c", probe, *argv], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
        assert out.stdout.split() == ["2", "0"], (command, out.stdout, out.stderr)
