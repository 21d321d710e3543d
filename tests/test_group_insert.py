"""The scheduler's group insert: concurrent POST /schedule requests share a statement and a commit."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from helpers import wait_for

from distrack.errors import DatabaseUnavailable, DataRejected
from distrack.scheduler.app import new_tasks_json, rfc3339
from distrack.scheduler.group_insert import GroupInserter
from distrack.tasks import TaskSpec


class GatedInsert:
    """insert_many that records each group and holds the first one until released."""

    def __init__(self, fail: type[Exception] | None = None) -> None:
        self.groups: list[list[str]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, specs):
        self.groups.append([s.command for s in specs])
        if len(self.groups) == 1:
            self.first_started.set()
            assert self.release.wait(10)
        if self.fail is not None and len(self.groups) > 1:
            raise self.fail("the database went away")
        if any("bad" in s.command for s in specs):
            raise DataRejected("the database rejected the data")
        return [f"stored {s.command}" for s in specs]


def insert_while_the_first_is_held(insert: GatedInsert, inserter: GroupInserter, commands: list[str]) -> dict:
    """Starts an insert of 'first', then `commands` from one thread each while it is held."""
    outcomes: dict[str, object] = {}

    def one(command: str) -> None:
        try:
            outcomes[command] = inserter.insert(TaskSpec(command))
        except Exception as exc:  # the outcome under test
            outcomes[command] = exc

    with ThreadPoolExecutor(len(commands) + 1) as pool:
        pool.submit(one, "first")
        assert insert.first_started.wait(10)
        for command in commands:
            pool.submit(one, command)
        # Everyone is queued behind the held insert before it ends.
        wait_for(lambda: len(inserter._waiting) == len(commands), what="the others to queue")
        insert.release.set()
    return outcomes


def test_requests_arriving_during_an_insert_go_together_in_the_next_one():
    insert = GatedInsert()
    commands = [f"echo {i}" for i in range(10)]
    outcomes = insert_while_the_first_is_held(insert, GroupInserter(insert), commands)
    assert insert.groups[0] == ["first"]
    assert len(insert.groups) == 2 and sorted(insert.groups[1]) == sorted(commands)
    assert outcomes == {c: f"stored {c}" for c in ["first", *commands]}  # each gets its own task back


def test_a_group_is_never_larger_than_its_limit():
    insert = GatedInsert()
    commands = [f"echo {i}" for i in range(10)]
    outcomes = insert_while_the_first_is_held(insert, GroupInserter(insert, max_group=4), commands)
    assert [len(g) for g in insert.groups] == [1, 4, 4, 2]
    assert outcomes == {c: f"stored {c}" for c in ["first", *commands]}


def test_a_task_the_database_refuses_fails_alone():
    insert = GatedInsert()
    outcomes = insert_while_the_first_is_held(insert, GroupInserter(insert), ["echo a", "echo bad", "echo b"])
    assert isinstance(outcomes["echo bad"], DataRejected)
    assert outcomes["echo a"] == "stored echo a" and outcomes["echo b"] == "stored echo b"
    # The shared statement failed, then each went again on its own.
    assert sorted(insert.groups[2:]) == [["echo a"], ["echo b"], ["echo bad"]]


def test_an_outage_fails_everyone_in_the_group_and_the_next_group_goes_on():
    insert = GatedInsert(fail=DatabaseUnavailable)
    inserter = GroupInserter(insert)
    outcomes = insert_while_the_first_is_held(insert, inserter, ["echo a", "echo b"])
    assert outcomes["first"] == "stored first"
    assert all(isinstance(outcomes[c], DatabaseUnavailable) for c in ("echo a", "echo b"))
    insert.fail = None
    assert inserter.insert(TaskSpec("echo c")) == "stored echo c"  # nothing left stuck


def test_a_lone_request_is_written_at_once_alone():
    insert = GatedInsert()
    insert.release.set()
    inserter = GroupInserter(insert)
    assert [inserter.insert(TaskSpec(f"echo {i}")) for i in range(3)] == [f"stored echo {i}" for i in range(3)]
    assert insert.groups == [["echo 0"], ["echo 1"], ["echo 2"]]


def test_concurrent_inserts_into_postgres_each_get_their_own_task(store):
    inserter = GroupInserter(lambda tasks: new_tasks_json(tasks, store.insert_tasks(tasks)))  # as the API's
    commands = [f"echo {i}" for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        docs = [json.loads(text) for text in pool.map(lambda c: inserter.insert(TaskSpec(c, 3600, 2, 5.0)), commands)]
    assert [d["command"] for d in docs] == commands
    assert len({d["task_id"] for d in docs}) == 200
    for doc in docs:
        row = store.get_task(doc["task_id"])
        assert row["command"] == doc["command"] and row["status"] == doc["status"] == "queued"
        assert doc["max_attempts"] == 2 and doc["timeout_seconds"] == 5.0 and doc["attempts"] == 0
        assert doc["scheduled_at"] == rfc3339(row["scheduled_at"])

