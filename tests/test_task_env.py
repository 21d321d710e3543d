"""The environment and working directory a task gets (distrack.worker.environment), without processes."""

from __future__ import annotations

import logging

import pytest

from distrack.errors import ConfigError
from distrack.worker.environment import DEFAULT_PATH, TaskEnvironment, parse_allow_list, prepare_task_dir

WORKER_ENV = {
    "PATH": "/opt/bin:/usr/bin",
    "LANG": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TZ": "Europe/Paris",
    "HOME": "/home/distrack",
    "DATABASE_URL": "postgresql://distrack:hunter2@db/distrack",
    "POSTGRES_PASSWORD": "hunter2",
    "PGPASSWORD": "hunter2",
    "DISTRACK_CLUSTER_TOKEN": "the-cluster-token-0123456789",
    "DISTRACK_TLS_KEY": "/etc/distrack/node.key",
    "DISTRACK_LOG_LEVEL": "INFO",
    "AWS_REGION": "eu-west-3",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "APP_MODE": "batch",
    "UNRELATED": "x",
}


def test_a_task_gets_a_minimal_base_and_who_it_is(tmp_path):
    env = TaskEnvironment(tmp_path, env=WORKER_ENV).for_task("t-1", 3, "w-1")
    user = env.pop("USER", None)
    assert env.pop("LOGNAME", None) == user
    assert env == {
        "PATH": "/opt/bin:/usr/bin", "LANG": "C.UTF-8", "LC_TIME": "en_GB.UTF-8", "TZ": "Europe/Paris",
        "HOME": str(tmp_path),
        "DISTRACK_TASK_ID": "t-1", "DISTRACK_ATTEMPT": "3", "DISTRACK_WORKER_ID": "w-1",
    }


def test_without_a_path_a_task_gets_a_sane_one(tmp_path):
    assert TaskEnvironment(tmp_path, env={}).for_task("t", 1, "w")["PATH"] == DEFAULT_PATH


def test_the_allow_list_takes_names_and_patterns(tmp_path):
    env = TaskEnvironment(tmp_path, parse_allow_list("APP_MODE, AWS_* HOME"), env=WORKER_ENV).for_task("t", 1, "w")
    assert env["APP_MODE"] == "batch" and env["AWS_REGION"] == "eu-west-3"
    assert env["AWS_SECRET_ACCESS_KEY"] == "aws-secret"  # the operator's pattern asked for it (and is warned)
    assert env["HOME"] == "/home/distrack"  # allow-listed: the worker's own, not the task directory
    assert "UNRELATED" not in env


def test_distracks_own_credentials_never_pass_even_through_a_pattern(tmp_path, caplog):
    task_env = TaskEnvironment(tmp_path, ("*",), env=WORKER_ENV)
    env = task_env.for_task("t", 1, "w")
    for secret in ("DATABASE_URL", "POSTGRES_PASSWORD", "PGPASSWORD", "DISTRACK_CLUSTER_TOKEN", "DISTRACK_TLS_KEY"):
        assert secret not in env
    assert "hunter2" not in repr(env) and "the-cluster-token" not in repr(env)
    assert env["UNRELATED"] == "x" and env["DISTRACK_LOG_LEVEL"] == "INFO"
    with caplog.at_level(logging.INFO, logger="distrack.worker.environment"):
        task_env.log_summary()
    assert "DATABASE_URL" in caplog.text and "hunter2" not in caplog.text
    assert any(r.levelno == logging.WARNING and "AWS_SECRET_ACCESS_KEY" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["DATABASE_URL", "POSTGRES_PASSWORD", "DISTRACK_CLUSTER_TOKEN",
                                  "DISTRACK_CLUSTER_TOKEN_FILE", "PGPASSWORD"])
def test_naming_one_of_distracks_credentials_is_a_config_error(tmp_path, name):
    with pytest.raises(ConfigError, match=f"names {name}"):
        TaskEnvironment(tmp_path, ("APP_MODE", name), env=WORKER_ENV)


def test_an_explicitly_named_secret_looking_variable_passes_without_a_warning(tmp_path, caplog):
    task_env = TaskEnvironment(tmp_path, ("AWS_SECRET_ACCESS_KEY",), env=WORKER_ENV)
    with caplog.at_level(logging.INFO, logger="distrack.worker.environment"):
        task_env.log_summary()
    assert task_env.for_task("t", 1, "w")["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_task_identity_cannot_be_overridden_by_the_allow_list(tmp_path):
    env = TaskEnvironment(tmp_path, ("DISTRACK_TASK_ID",), env={"DISTRACK_TASK_ID": "forged"}).for_task("t", 1, "w")
    assert env["DISTRACK_TASK_ID"] == "t"


def test_the_task_directory_is_made_absolute_and_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task_dir = prepare_task_dir("a/b")
    assert task_dir == tmp_path / "a" / "b" and task_dir.is_dir()


def test_a_task_directory_that_cannot_be_made_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        prepare_task_dir(str(tmp_path / "file" / "tasks"))

