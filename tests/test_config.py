"""Addresses, database settings from the environment, and the worker's identity."""

import pytest

from distrack.config import Address, database_url_from_env, parse_address, require_database_url
from distrack.errors import ConfigError
from distrack.worker.identity import advertised_address, new_worker_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8081", Address("", 8081)),
        ("8081", Address("", 8081)),
        ("localhost:8081", Address("localhost", 8081)),
        ("0.0.0.0:80", Address("0.0.0.0", 80)),
        ("[::1]:9000", Address("::1", 9000)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":", "host:", "abc", ":0", ":65536", "host:-1", "host:80x"])
def test_parse_address_rejects(text):
    with pytest.raises(ConfigError):
        parse_address(text)


def test_port_zero_only_where_allowed():
    assert parse_address(":0", allow_zero=True) == Address("", 0)


def test_bind_and_dial_targets():
    assert Address("", 8080).bind_target() == "0.0.0.0:8080"
    assert Address("", 8080).dial_target() == "localhost:8080"
    assert Address("::1", 8080).dial_target() == "[::1]:8080"


def test_database_url_prefers_database_url():
    env = {"DATABASE_URL": "postgresql://a@b/c", "POSTGRES_DB": "x"}
    assert database_url_from_env(env) == "postgresql://a@b/c"


def test_database_url_from_seed_variables_with_defaults_and_escaping():
    env = {"POSTGRES_DB": "tasks", "POSTGRES_USER": "me", "POSTGRES_PASSWORD": "p@ss:/word"}
    assert database_url_from_env(env) == "postgresql://me:p%40ss%3A%2Fword@localhost:5432/tasks"
    env.update(POSTGRES_HOST="postgres", POSTGRES_PORT="6543")
    assert database_url_from_env(env) == "postgresql://me:p%40ss%3A%2Fword@postgres:6543/tasks"


def test_no_database_configured_is_a_clear_error():
    assert database_url_from_env({}) is None
    with pytest.raises(ConfigError, match="no database configured"):
        require_database_url({})


def test_worker_address_env_wins():
    addr = advertised_address(Address("", 8000), 8000, Address("coordinator", 8080), "worker")
    assert addr == "worker:8000"


def test_specific_listen_host_is_advertised():
    assert advertised_address(Address("127.0.0.2", 0), 4321, Address("", 8080), None) == "127.0.0.2:4321"


def test_wildcard_listen_advertises_a_reachable_ip_never_any():
    addr = advertised_address(Address("", 8000), 8000, Address("127.0.0.1", 8080), None)
    assert addr == "127.0.0.1:8000"
    addr = advertised_address(Address("0.0.0.0", 8000), 8000, Address("localhost", 8080), None)
    assert not addr.startswith(("0.0.0.0", "[::]"))


def test_worker_ids_are_unique_and_file_name_safe():
    ids = {new_worker_id(8000) for _ in range(100)}
    assert len(ids) == 100
    assert all("/" not in i and " " not in i and "-8000-" in i for i in ids)


# --- the HTTP API token (issue 5)

TOKEN = "0123456789abcdef0123456789abcdef"


def test_no_token_configured_is_none():
    from distrack.apitoken import api_token_from_env

    assert api_token_from_env({}) is None
    assert api_token_from_env({"DISTRACK_API_TOKEN": ""}) is None  # compose's ${DISTRACK_API_TOKEN:-}


def test_token_from_the_environment_or_a_file(tmp_path):
    from distrack.apitoken import api_token_from_env

    assert api_token_from_env({"DISTRACK_API_TOKEN": TOKEN}) == TOKEN
    assert api_token_from_env({"DISTRACK_API_TOKEN": f" {TOKEN}\n"}) == TOKEN  # as the cluster token
    for ending in ("", "\n", "\r\n", "\n\n", "  \n"):
        path = tmp_path / "token"
        path.write_text(TOKEN + ending)
        assert api_token_from_env({"DISTRACK_API_TOKEN_FILE": str(path)}) == TOKEN


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("both", "both DISTRACK_API_TOKEN and DISTRACK_API_TOKEN_FILE are set"),
        ("missing", "cannot read the API token from DISTRACK_API_TOKEN_FILE"),
        ("directory", "cannot read the API token from DISTRACK_API_TOKEN_FILE"),
        ("empty", "is empty"),
        ("newline only", "is empty"),
        ("not utf-8", "not UTF-8 text"),
        ("space inside", "printable ASCII without spaces"),
        ("env with a space", "printable ASCII without spaces"),
        ("env non-ascii", "printable ASCII without spaces"),
    ],
)
def test_unusable_token_settings_are_a_clear_config_error(tmp_path, setup, message):
    from distrack.apitoken import api_token_from_env

    path = tmp_path / "token"
    contents = {"empty": b"", "newline only": b"\n", "not utf-8": b"\xff\xfe" + TOKEN.encode(),
                "space inside": f"{TOKEN} {TOKEN}\n".encode(), "both": TOKEN.encode()}
    if setup in contents:
        path.write_bytes(contents[setup])
    env = {"DISTRACK_API_TOKEN_FILE": str(tmp_path if setup == "directory" else path)}
    if setup == "both":
        env["DISTRACK_API_TOKEN"] = TOKEN
    elif setup.startswith("env"):
        env = {"DISTRACK_API_TOKEN": f"{TOKEN} x" if setup == "env with a space" else f"{TOKEN}é"}
    with pytest.raises(ConfigError, match=message) as info:
        api_token_from_env(env)
    assert TOKEN not in str(info.value)  # an error message ends up in logs


def test_the_scheduler_config_never_shows_its_token():
    from distrack.config import SchedulerConfig

    config = SchedulerConfig(database_url="postgresql://x/y", api_token=TOKEN)
    assert TOKEN not in repr(config) and TOKEN not in str(config)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("", False), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("10.0.0.1", False),
     ("no-such-host.invalid", False)],
)
def test_loopback_hosts(host, loopback):
    from distrack.config import is_loopback_host

    assert is_loopback_host(host) is loopback
