"""The API token in-process (Falcon's TestClient over a real database): who gets in, who gets 401."""

import uuid

import falcon.testing
import pytest

from distrack.db.pool import make_pool
from distrack.db.store import TaskStore
from distrack.errors import ConfigError
from distrack.scheduler import auth
from distrack.scheduler.app import create_app
from distrack.scheduler.server import MIN_API_TOKEN_CHARS, exposure_warning, short_token_warning

TOKEN = "Zm9vYmFy-0123456789_abcdef.~+/="  # every character class a bearer token (RFC 6750) may use


@pytest.fixture(scope="module")
def module_store(module_db_url):
    pool = make_pool(module_db_url, max_size=2, name="test")
    pool.wait(10)
    yield TaskStore(pool)
    pool.close()


@pytest.fixture
def client(module_store):
    return falcon.testing.TestClient(create_app(module_store, max_body_bytes=4096, api_token=TOKEN))


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# Every route the app has, with a request that would succeed (or fail on its input) once let in.
ROUTES = [
    ("POST", "/schedule", '{"command": "true"}'),
    ("POST", "/tasks", '{"tasks": [{"command": "true"}]}'),
    ("GET", f"/status?task_id={uuid.uuid4()}", None),
    ("GET", f"/tasks/{uuid.uuid4()}", None),
    ("POST", f"/tasks/{uuid.uuid4()}/cancel", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no/such/path", None),
    ("DELETE", "/schedule", None),
]


def call(client, method, path, body=None, headers=None):
    path, _, query = path.partition("?")
    return client.simulate_request(method, path, query_string=query or None, body=body, headers=headers or {})


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_but_health_needs_the_token(client, method, path, body):
    resp = call(client, method, path, body)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == 'Bearer realm="distrack"'
    assert resp.json == {"title": "Authentication required",
                         "description": "send the API token as 'Authorization: Bearer <token>'"}
    assert TOKEN not in resp.text
    allowed = call(client, method, path, body, bearer())
    assert allowed.status_code != 401, allowed.text


@pytest.mark.parametrize(
    "header",
    [
        "Bearer wrong",
        "Bearer ",
        "Bearer",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN.upper()}",
        f"Bearer x{TOKEN}",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN} {TOKEN}",
        f"Bearer {TOKEN}, Bearer {TOKEN}",  # two headers joined by a proxy
        "Bearer \u00e9\u00e8",
    ],
)
def test_a_wrong_token_or_scheme_is_401(client, header):
    resp = client.simulate_post("/schedule", body='{"command": "true"}', headers={"Authorization": header})
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == 'Bearer realm="distrack", error="invalid_token"'
    assert resp.json["title"] == "Invalid token"
    assert TOKEN not in resp.text


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ", f" Bearer {TOKEN}"])
def test_the_right_token_gets_in_whatever_the_case_of_the_scheme(client, header):
    resp = client.simulate_post("/schedule", body='{"command": "true"}', headers={"Authorization": header})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path", ["/health", "/health/"])
def test_health_needs_no_token(client, path):
    assert client.simulate_get(path).status_code == 200
    assert client.simulate_get(path, headers=bearer("wrong")).status_code == 200


def test_a_wrong_method_on_health_is_405_not_401(client):
    assert client.simulate_post("/health").status_code == 405


def test_the_token_is_checked_before_the_body_is_read(client):
    """A client without the token cannot make the server read (or parse) a body."""
    too_big = '{"command": "' + "x" * 10_000 + '"}'
    assert client.simulate_post("/schedule", body=too_big).status_code == 401
    assert client.simulate_post("/schedule", body="{not json").status_code == 401
    assert client.simulate_post("/schedule", body=too_big, headers=bearer()).status_code == 413


def test_tokens_are_compared_in_constant_time_as_bytes(client, monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert client.simulate_get("/openapi.json", headers=bearer("nope")).status_code == 401
    assert client.simulate_get("/openapi.json", headers=bearer()).status_code == 200
    assert calls == [(b"nope", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_without_a_token_everything_is_open(module_store):
    client = falcon.testing.TestClient(create_app(module_store))
    assert client.simulate_post("/schedule", body='{"command": "true"}').status_code == 200
    assert client.simulate_get("/openapi.json").status_code == 200
    assert "security" not in client.simulate_get("/openapi.json").json


def test_an_empty_token_is_refused_by_the_middleware():
    with pytest.raises(ValueError, match="empty token"):
        auth.BearerAuth("")


def test_the_openapi_document_declares_the_token(client):
    doc = client.simulate_get("/openapi.json", headers=bearer()).json
    assert doc["security"] == [{"bearerToken": []}]
    scheme = doc["components"]["securitySchemes"]["bearerToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "401" in doc["paths"]["/schedule"]["post"]["responses"]


@pytest.mark.parametrize(
    ("host", "token", "warns"),
    [("", None, True), ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.10", None, True),
     ("", TOKEN, False), ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False), ("::1", None, False),
     ("localhost", None, False)],
)
def test_listening_beyond_loopback_without_a_token_warns(host, token, warns):
    from distrack.config import Address

    warning = exposure_warning(Address(host, 8081), token)
    assert (warning is not None) is warns
    if warns:
        assert "no API token" in warning and "DISTRACK_API_TOKEN" in warning


def test_the_app_gunicorn_loads_by_itself_reads_the_token_from_the_environment(monkeypatch, tmp_path):
    """`gunicorn 'distrack.scheduler.app:create_app_from_env()'` is protected the same way."""
    from distrack.scheduler import app as app_module

    pools = []
    monkeypatch.setattr(app_module, "make_pool", lambda url, **kw: pools.append(url) or object())
    monkeypatch.setenv("DATABASE_URL", "postgresql://nowhere/none")
    monkeypatch.delenv("DISTRACK_API_TOKEN_FILE", raising=False)
    monkeypatch.setenv("DISTRACK_API_TOKEN", TOKEN)
    client = falcon.testing.TestClient(app_module.create_app_from_env())
    assert client.simulate_get("/openapi.json").status_code == 401
    assert client.simulate_get("/openapi.json", headers=bearer()).status_code == 200
    # A bad setting fails before any pool is made.
    monkeypatch.delenv("DISTRACK_API_TOKEN")
    monkeypatch.setenv("DISTRACK_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read the API token"):
        app_module.create_app_from_env()
    assert pools == ["postgresql://nowhere/none"]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 2_147_484, "10", True, None])
def test_the_app_gunicorn_loads_by_itself_refuses_a_bad_statement_timeout(monkeypatch, bad):
    from distrack.scheduler import app as app_module

    pools = []
    monkeypatch.setattr(app_module, "make_pool", lambda url, **kw: pools.append(kw) or object())
    monkeypatch.setenv("DATABASE_URL", "postgresql://nowhere/none")
    monkeypatch.setenv("DISTRACK_API_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="statement_timeout_s must be a number of seconds greater than 0"):
        app_module.create_app_from_env(statement_timeout_s=bad)
    assert pools == []
    app_module.create_app_from_env(statement_timeout_s=2)
    assert pools == [{"name": "scheduler", "statement_timeout_s": 2.0}]


def test_a_short_token_is_accepted_with_a_warning():
    assert short_token_warning(None) is None
    assert short_token_warning("x" * MIN_API_TOKEN_CHARS) is None
    warning = short_token_warning("x" * (MIN_API_TOKEN_CHARS - 1))
    assert warning and "shorter than 16 characters" in warning and "x" * 15 not in warning
