"""Security for distrack's gRPC traffic: a shared cluster token, and optional (mutual) TLS.

Both directions use the same settings: the coordinator calling workers (SubmitTask, CancelTask) and
workers calling the coordinator (Heartbeat, UpdateTaskStatus, Deregister). With a cluster token,
every call carries `authorization: Bearer <token>` as metadata (a client interceptor, so it works on
plaintext and TLS channels alike) and every server refuses a call without it with UNAUTHENTICATED
before the request is even parsed. With a certificate and key, servers listen with TLS; with a CA
as well, they require client certificates signed by it (mutual TLS) and clients check servers
against it. Every distrack process is both a server and a client, so it presents one certificate
in both roles.

The files are read once, at start, so a wrong path or a key that does not match its certificate
stops the service with a ConfigError instead of failing every call later.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from distrack.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_ENV = "DISTRACK_CLUSTER_TOKEN"
TOKEN_FILE_ENV = "DISTRACK_CLUSTER_TOKEN_FILE"
CERT_ENV = "DISTRACK_TLS_CERT"
KEY_ENV = "DISTRACK_TLS_KEY"
CA_ENV = "DISTRACK_TLS_CA"
SERVER_NAME_ENV = "DISTRACK_TLS_SERVER_NAME"

METADATA_KEY = "authorization"
SCHEME = "Bearer "
# Shorter tokens are accepted (a test cluster may use one) but warned about: the token is the only
# thing between the network and a worker that runs shell commands.
MIN_TOKEN_CHARS = 16
# A refused caller is logged once per this many seconds per (peer, reason): a misconfigured worker
# heartbeats several times a second and must not flood the log.
REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class TransportSecurity:
    """How a process secures its gRPC calls and its gRPC server. The default is none at all."""

    token: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    # The name clients check server certificates against, instead of the host they dial.
    server_name: str | None = None
    cert_pem: bytes | None = field(default=None, repr=False, compare=False)
    key_pem: bytes | None = field(default=None, repr=False, compare=False)
    ca_pem: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def tls(self) -> bool:
        return bool(self.cert_pem or self.ca_pem)

    @property
    def mutual_tls(self) -> bool:
        return bool(self.cert_pem and self.ca_pem)

    def describe(self) -> str:
        """One line for the start-up log; never the token."""
        if self.mutual_tls:
            tls = "mutual TLS"
        elif self.cert_pem:
            tls = "TLS (no client certificates)"
        elif self.ca_pem:
            tls = "TLS client only"
        else:
            tls = "plaintext"
        if self.server_name:
            tls += f", server name {self.server_name}"
        return f"{tls}, {'cluster token required' if self.token else 'no cluster token'}"

    def require_server_credentials(self) -> None:
        """A distrack service listens as well as dials: a CA alone would leave its own port plaintext."""
        if self.ca_pem and not self.cert_pem:
            raise ConfigError(
                f"{CA_ENV} (--tls_ca) is set without a certificate: a coordinator or worker also serves gRPC, "
                f"so it needs {CERT_ENV} and {KEY_ENV} (--tls_cert, --tls_key) too"
            )


def load_security(
    *,
    token: str | None = None,
    token_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    ca_file: str | None = None,
    server_name: str | None = None,
) -> TransportSecurity:
    """Checks and reads the settings; raises ConfigError with what is wrong."""
    if token and token_file:
        raise ConfigError(f"set {TOKEN_ENV} or {TOKEN_FILE_ENV} (--cluster_token_file), not both")
    if token_file:
        token = _read_token_file(token_file)
    elif token is not None:
        token = _check_token(token.strip(), TOKEN_ENV)
    cert_pem = key_pem = ca_pem = None
    if cert_file or key_file:
        cert_pem, key_pem = load_cert_pair(cert_file, key_file, what="TLS", cert_env=f"{CERT_ENV} (--tls_cert)",
                                           key_env=f"{KEY_ENV} (--tls_key)")
    if ca_file:
        ca_pem = load_ca(ca_file)
    if server_name and not (cert_pem or ca_pem):
        raise ConfigError(f"{SERVER_NAME_ENV} (--tls_server_name) only applies with TLS ({CERT_ENV}, {CA_ENV})")
    return TransportSecurity(token=token or None, cert_file=cert_file, key_file=key_file, ca_file=ca_file,
                             server_name=server_name or None, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


def security_from_env(
    env: Mapping[str, str] | None = None,
    *,
    token_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    ca_file: str | None = None,
    server_name: str | None = None,
) -> TransportSecurity:
    """The settings from flags (the keyword arguments) and else the environment.

    An empty variable counts as unset, so `DISTRACK_CLUSTER_TOKEN: ${DISTRACK_CLUSTER_TOKEN:-}` in a
    compose file passes the token through when there is one and nothing when there is none.
    """
    env = os.environ if env is None else env

    def pick(flag: str | None, name: str) -> str | None:
        return flag or env.get(name, "").strip() or None

    return load_security(
        token=env.get(TOKEN_ENV) or None,
        token_file=pick(token_file, TOKEN_FILE_ENV),
        cert_file=pick(cert_file, CERT_ENV),
        key_file=pick(key_file, KEY_ENV),
        ca_file=pick(ca_file, CA_ENV),
        server_name=pick(server_name, SERVER_NAME_ENV),
    )


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the cluster token file {path!r}: {_reason(exc)}") from None
    return _check_token(text.strip(), f"the cluster token file {path!r}")


def _check_token(token: str, source: str) -> str:
    if not token:
        raise ConfigError(f"{source} is empty")
    # It travels as a gRPC metadata value, which only printable ASCII may be.
    if not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(f"{source} must be printable ASCII without spaces (e.g. from `openssl rand -hex 32`)")
    if len(token) < MIN_TOKEN_CHARS:
        log.warning("the cluster token is shorter than %d characters; use a long random one "
                    "(e.g. `openssl rand -hex 32`)", MIN_TOKEN_CHARS)
    return token


def load_cert_pair(cert_file: str | None, key_file: str | None, *, what: str, cert_env: str,
                   key_env: str) -> tuple[bytes, bytes]:
    """Reads a PEM certificate (chain) and its private key, and checks that they belong together."""
    if not cert_file or not key_file:
        given, missing = (cert_env, key_env) if cert_file else (key_env, cert_env)
        raise ConfigError(f"{what}: {given} is set but {missing} is not; give both the certificate and its key")
    cert_pem = _read_pem(cert_file, f"{what} certificate")
    key_pem = _read_pem(key_file, f"{what} key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The empty password makes an encrypted key fail here rather than prompt on the terminal.
        context.load_cert_chain(cert_file, key_file, password=b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{what}: the key {key_file!r} does not go with the certificate {cert_file!r}, or one "
                          f"of them is not PEM or is encrypted ({_reason(exc)})") from None
    return cert_pem, key_pem


def load_ca(ca_file: str) -> bytes:
    ca_pem = _read_pem(ca_file, "TLS CA")
    try:
        ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS CA {ca_file!r} holds no usable certificate ({_reason(exc)})") from None
    return ca_pem


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path!r}: {_reason(exc)}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"the {what} {path!r} is not PEM")
    return data


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


# --- clients


def reconnect_options(reconnect_s: float) -> list[tuple[str, int]]:
    """Channel options that retry a lost connection about every `reconnect_s` (gRPC adds +-20%
    jitter). gRPC's default backoff grows by 1.6 a try up to 2 minutes, so a peer back after an outage of
    a few seconds would stay unreached for seconds more: long enough for a coordinator to declare a live
    worker lost. Also bounded: how long one connection attempt may hang on a peer that drops it instead
    of refusing it (gRPC's "min reconnect backoff" is that timeout, 20 s by default), and how soon the
    peer's name is looked up again (30 s by default; a restarted container may have a new address)."""
    max_ms = max(int(reconnect_s * 1000), 1)
    return [
        ("grpc.initial_reconnect_backoff_ms", min(max_ms, 1000)),
        ("grpc.max_reconnect_backoff_ms", max_ms),
        ("grpc.min_reconnect_backoff_ms", max(max_ms, 1000)),
        ("grpc.dns_min_time_between_resolutions_ms", max_ms),
    ]


def client_channel(target: str, security: TransportSecurity, *, reconnect_s: float | None = None) -> grpc.Channel:
    """A channel to `target` that uses TLS and sends the cluster token as `security` says, and
    reconnects about every `reconnect_s` once a connection is lost (gRPC's default when None)."""
    options = reconnect_options(reconnect_s) if reconnect_s is not None else []
    if security.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.ca_pem, private_key=security.key_pem, certificate_chain=security.cert_pem
        )
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if security.token:
        channel = grpc.intercept_channel(channel, TokenClientInterceptor(security.token))
    return channel


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                             "compression")),
    grpc.ClientCallDetails,
):
    pass


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the cluster token to every call, whatever its kind."""

    def __init__(self, token: str) -> None:
        self._entry = (METADATA_KEY, SCHEME + token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)


# --- servers


def server_interceptors(security: TransportSecurity) -> list[grpc.ServerInterceptor]:
    return [TokenServerInterceptor(security.token)] if security.token else []


def add_port(server: grpc.Server, address: str, security: TransportSecurity) -> int:
    """Binds `server` to `address`, with TLS when `security` has a certificate; returns the port (0 if
    it could not bind)."""
    if security.cert_pem:
        credentials = grpc.ssl_server_credentials(
            [(security.key_pem, security.cert_pem)],
            root_certificates=security.ca_pem,
            require_client_auth=security.ca_pem is not None,
        )
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that does not carry the cluster token."""

    def __init__(self, token: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._expected = (SCHEME + token).encode()
        self._clock = clock
        self._lock = threading.Lock()
        # (peer host, reason) -> [when last logged, refusals since]
        self._logged: dict[tuple[str, str], list[float]] = {}

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        presented = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
        if presented is not None and hmac.compare_digest(presented, self._expected):
            return continuation(handler_call_details)
        reason = "no cluster token" if presented is None else "wrong cluster token"
        method = handler_call_details.method
        handler = continuation(handler_call_details)

        # The request is never deserialized: an unauthenticated caller gets no parser to poke at.
        def refuse(_request: object, context: grpc.ServicerContext) -> None:
            self._log_refusal(context.peer(), method, reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _log_refusal(self, peer: str, method: str, reason: str) -> None:
        host = peer.rsplit(":", 1)[0]
        now = self._clock()
        with self._lock:
            entry = self._logged.setdefault((host, reason), [float("-inf"), 0])
            entry[1] += 1
            if now - entry[0] < REFUSAL_LOG_INTERVAL_S:
                return
            count, entry[0], entry[1] = entry[1], now, 0
        more = f" ({count - 1} more refused from there since the last report)" if count > 1 else ""
        log.warning("refused %s from %s: %s%s", method, peer, reason, more)


# What gRPC's own message says when a handshake failed on this side (a server refusing ours only
# shows as a closed socket, like any network failure).
TLS_FAILURE_WORDS = ("ssl", "handshake", "certificate", "verification")


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """A failed call in one line, with a hint for the failures that are configuration, not weather."""
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"UNAUTHENTICATED ({exc.details()}): the other side requires a different cluster token; "
                f"check {TOKEN_ENV} / {TOKEN_FILE_ENV} on both")
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and any(word in details.lower() for word in TLS_FAILURE_WORDS):
        return f"UNAVAILABLE: TLS handshake failed ({details}); check the certificates, CA and server name"
    return code.name
