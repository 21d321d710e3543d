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
