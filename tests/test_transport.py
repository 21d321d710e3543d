"""distrack.transport: settings, the cluster token check, and (mutual) TLS over real loopback sockets.

The servers here are in-process gRPC servers built with the same `add_port` and interceptors the
services use; tests/test_security.py does the same against the real processes.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from certs import CertificateAuthority

from distrack.errors import ConfigError
from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.transport import (
    TokenServerInterceptor,
    TransportSecurity,
    add_port,
    client_channel,
    describe_rpc_error,
    load_security,
    security_from_env,
    server_interceptors,
)

TOKEN = "s3cret-token-for-the-test-0123456789"


class CountingWorker(distrack_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def SubmitTask(self, request, context):
        with self.lock:
            self.calls += 1
        return distrack_pb2.TaskResponse(accepted=True)


@pytest.fixture
def serve():
    servers = []

    def start(security: TransportSecurity) -> tuple[int, CountingWorker]:
        server = grpc.server(ThreadPoolExecutor(2), interceptors=server_interceptors(security))
        servicer = CountingWorker()
        distrack_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = add_port(server, "127.0.0.1:0", security)
        assert port
        server.start()
        servers.append(server)
        return port, servicer

    yield start
    for server in servers:
        server.stop(0).wait()


def call_error(port: int, security: TransportSecurity) -> grpc.RpcError | None:
    """What one SubmitTask over a fresh channel ends with: None if it went through."""
    channel = client_channel(f"127.0.0.1:{port}", security)
    try:
        stub = distrack_pb2_grpc.WorkerStub(channel)
        stub.SubmitTask(distrack_pb2.TaskRequest(task_id=str(uuid.uuid4()), command="true"), timeout=5)
        return None
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


def call(port: int, security: TransportSecurity) -> grpc.StatusCode:
    error = call_error(port, security)
    return grpc.StatusCode.OK if error is None else error.code()


@pytest.fixture
def pki(tmp_path):
    ca = CertificateAuthority(tmp_path / "pki")
    other = CertificateAuthority(tmp_path / "other", name="some other CA")
    return {
        "ca": ca,
        "server": ca.issue("server"),
        "client": ca.issue("client"),
        "stranger": other.issue("stranger"),
        "other_ca": other,
        "named": ca.issue("named", sans=("distrack-node",)),
    }


# --- settings


def test_no_settings_means_plaintext_without_a_token():
    security = security_from_env({})
    assert security == TransportSecurity() and not security.tls and security.token is None
    assert security.describe() == "plaintext, no cluster token"


def test_the_token_comes_from_the_environment_or_a_file_and_never_shows_in_repr(tmp_path):
    assert security_from_env({"DISTRACK_CLUSTER_TOKEN": f" {TOKEN}\n"}).token == TOKEN
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    security = security_from_env({"DISTRACK_CLUSTER_TOKEN_FILE": str(path)})
    assert security.token == TOKEN
    assert TOKEN not in repr(security) and TOKEN not in security.describe()
    # The flag wins over the variable.
    assert security_from_env({"DISTRACK_CLUSTER_TOKEN_FILE": "/nowhere"}, token_file=str(path)).token == TOKEN
    # An empty variable (compose's `${DISTRACK_CLUSTER_TOKEN:-}`) is no token at all.
    assert security_from_env({"DISTRACK_CLUSTER_TOKEN": ""}).token is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DISTRACK_CLUSTER_TOKEN": TOKEN, "DISTRACK_CLUSTER_TOKEN_FILE": "{token_file}"}, "not both"),
        ({"DISTRACK_CLUSTER_TOKEN_FILE": "{empty_file}"}, "is empty"),
        ({"DISTRACK_CLUSTER_TOKEN_FILE": "{tmp}/missing"}, "cannot read the cluster token file"),
        ({"DISTRACK_CLUSTER_TOKEN_FILE": "{tmp}"}, "cannot read the cluster token file"),
        ({"DISTRACK_CLUSTER_TOKEN": "   "}, "is empty"),
        ({"DISTRACK_CLUSTER_TOKEN": "two words-but-long-enough"}, "printable ASCII"),
        ({"DISTRACK_CLUSTER_TOKEN": "caf\u00e9-token-long-enough"}, "printable ASCII"),
    ],
)
def test_bad_token_settings_are_config_errors(tmp_path, env, message):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "empty").write_text("\n")
    values = {k: v.format(token_file=tmp_path / "token", empty_file=tmp_path / "empty", tmp=tmp_path)
              for k, v in env.items()}
    with pytest.raises(ConfigError, match=message):
        security_from_env(values)


def test_a_short_token_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert security_from_env({"DISTRACK_CLUSTER_TOKEN": "short"}).token == "short"
    assert "shorter than 16" in caplog.text and "short" not in caplog.text.replace("shorter", "")


def test_tls_settings_are_read_and_checked(pki):
    server = pki["server"]
    security = security_from_env({"DISTRACK_TLS_CERT": str(server.cert), "DISTRACK_TLS_KEY": str(server.key),
                                  "DISTRACK_TLS_CA": str(pki["ca"].path)})
    assert security.mutual_tls and security.cert_pem == server.cert.read_bytes()
    assert security.describe() == "mutual TLS, no cluster token"
    security.require_server_credentials()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cert_file": "server.cert"}, r"DISTRACK_TLS_CERT \(--tls_cert\) is set but DISTRACK_TLS_KEY"),
        ({"key_file": "server.key"}, r"DISTRACK_TLS_KEY \(--tls_key\) is set but DISTRACK_TLS_CERT"),
        ({"cert_file": "missing", "key_file": "server.key"}, "cannot read the TLS certificate"),
        ({"cert_file": "server.cert", "key_file": "missing"}, "cannot read the TLS key"),
        ({"cert_file": "not_pem", "key_file": "server.key"}, "is not PEM"),
        ({"cert_file": "server.cert", "key_file": "client.key"}, "does not go with the certificate"),
        ({"ca_file": "missing"}, "cannot read the TLS CA"),
        ({"ca_file": "not_pem"}, "is not PEM"),
        ({"server_name": "distrack-node"}, "only applies with TLS"),
    ],
)
def test_bad_tls_settings_are_config_errors(pki, tmp_path, settings, message):
    (tmp_path / "not_pem").write_text("hello\n")
    files = {"server.cert": pki["server"].cert, "server.key": pki["server"].key, "client.key": pki["client"].key,
             "missing": tmp_path / "missing", "not_pem": tmp_path / "not_pem"}
    values = {k: (str(files[v]) if k != "server_name" else v) for k, v in settings.items()}
    with pytest.raises(ConfigError, match=message):
        load_security(**values)


def test_a_service_with_a_ca_but_no_certificate_is_a_config_error(pki):
    security = load_security(ca_file=str(pki["ca"].path))
    assert security.tls and not security.mutual_tls  # fine for a client...
    with pytest.raises(ConfigError, match="needs DISTRACK_TLS_CERT and DISTRACK_TLS_KEY"):
        security.require_server_credentials()  # ...not for a coordinator or worker


# --- the cluster token


def test_calls_without_the_right_token_are_refused_before_the_handler(serve, caplog):
    port, servicer = serve(TransportSecurity(token=TOKEN))
    with caplog.at_level(logging.WARNING, logger="distrack.transport"):
        assert call(port, TransportSecurity()) == grpc.StatusCode.UNAUTHENTICATED
        assert call(port, TransportSecurity(token="wrong-" + TOKEN)) == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.calls == 0
    assert call(port, TransportSecurity(token=TOKEN)) == grpc.StatusCode.OK
    assert servicer.calls == 1
    assert re.search(r"refused /\S*Worker/SubmitTask from ipv4:127\.0\.0\.1:\d+: no cluster token", caplog.text)
    assert "no cluster token" in caplog.text and "wrong cluster token" in caplog.text
    assert TOKEN not in caplog.text


def test_a_token_that_is_a_prefix_or_extension_of_the_right_one_is_refused(serve):
    port, servicer = serve(TransportSecurity(token=TOKEN))
    for token in (TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
        assert call(port, TransportSecurity(token=token)) == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.calls == 0


def test_refusals_from_one_peer_are_logged_once_per_interval_with_a_count(serve, caplog):
    port, _ = serve(TransportSecurity(token=TOKEN))
    with caplog.at_level(logging.WARNING, logger="distrack.transport"):
        for _ in range(5):
            assert call(port, TransportSecurity()) == grpc.StatusCode.UNAUTHENTICATED
    assert caplog.text.count("refused ") == 1


def test_the_refusal_log_reports_how_many_were_held_back():
    now = [0.0]
    interceptor = TokenServerInterceptor(TOKEN, clock=lambda: now[0])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("distrack.transport")
    logger.addHandler(handler)
    try:
        for _ in range(4):
            interceptor._log_refusal("ipv4:10.0.0.9:5000", "/m", "no cluster token")
        now[0] = 61.0
        interceptor._log_refusal("ipv4:10.0.0.9:5001", "/m", "no cluster token")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "refused /m from ipv4:10.0.0.9:5000: no cluster token",
        "refused /m from ipv4:10.0.0.9:5001: no cluster token (3 more refused from there since the last report)",
    ]


def test_describe_names_a_token_mismatch():
    class Error(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAUTHENTICATED

        def details(self):
            return "wrong cluster token"

    assert "DISTRACK_CLUSTER_TOKEN" in describe_rpc_error(Error())


# --- TLS


def mtls(pki, name: str = "client", **extra) -> TransportSecurity:
    cert, key = pki[name].cert, pki[name].key
    return load_security(cert_file=str(cert), key_file=str(key), ca_file=str(pki["ca"].path), **extra)


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(serve, pki):
    port, servicer = serve(mtls(pki, "server"))
    assert call(port, mtls(pki)) == grpc.StatusCode.OK
    # No client certificate: refused in the handshake.
    assert call(port, load_security(ca_file=str(pki["ca"].path))) == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA: refused in the handshake.
    stranger = load_security(cert_file=str(pki["stranger"].cert), key_file=str(pki["stranger"].key),
                             ca_file=str(pki["ca"].path))
    assert call(port, stranger) == grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port.
    assert call(port, TransportSecurity()) == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 1


def test_clients_check_the_server_against_the_ca(serve, pki):
    port, servicer = serve(mtls(pki, "server"))
    # A client that trusts another CA does not talk to this server.
    other = load_security(cert_file=str(pki["client"].cert), key_file=str(pki["client"].key),
                          ca_file=str(pki["other_ca"].path))
    assert call(port, other) == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 0


def test_tls_without_a_ca_on_the_server_asks_no_client_certificate(serve, pki):
    server = pki["server"]
    port, servicer = serve(load_security(cert_file=str(server.cert), key_file=str(server.key)))
    assert call(port, load_security(ca_file=str(pki["ca"].path))) == grpc.StatusCode.OK
    assert call(port, TransportSecurity()) == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 1


def test_the_server_name_is_checked_and_can_be_overridden(serve, pki):
    # The certificate names only `distrack-node`, not the address dialled.
    named = pki["named"]
    port, servicer = serve(load_security(cert_file=str(named.cert), key_file=str(named.key),
                                         ca_file=str(pki["ca"].path)))
    error = call_error(port, mtls(pki))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert "TLS handshake failed" in describe_rpc_error(error)  # what a worker's log then says
    assert call(port, mtls(pki, server_name="distrack-node")) == grpc.StatusCode.OK
    assert call(port, mtls(pki, server_name="someone-else")) == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 1


def test_token_and_mutual_tls_together(serve, pki):
    server = mtls(pki, "server")
    port, servicer = serve(load_security(token=TOKEN, cert_file=server.cert_file, key_file=server.key_file,
                                         ca_file=server.ca_file))
    client = mtls(pki)
    assert call(port, client) == grpc.StatusCode.UNAUTHENTICATED
    with_token = load_security(token=TOKEN, cert_file=client.cert_file, key_file=client.key_file,
                               ca_file=client.ca_file)
    assert call(port, with_token) == grpc.StatusCode.OK
    assert servicer.calls == 1
