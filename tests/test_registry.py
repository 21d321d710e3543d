"""The worker registry: round-robin over live workers with free slots, driven by a fake clock."""

from distrack.coordinator.registry import WorkerRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry_with(*workers: tuple[str, int], ttl: float = 9.0) -> tuple[WorkerRegistry, Clock]:
    clock = Clock()
    reg = WorkerRegistry(ttl, clock=clock)
    for worker_id, slots in workers:
        assert reg.heartbeat(worker_id, f"{worker_id}:8000", slots) is True
    return reg, clock


def test_round_robin_over_workers():
    reg, _ = registry_with(("a", 5), ("b", 5), ("c", 5))
    picks = [reg.reserve(f"t{i}").worker_id for i in range(9)]
    assert picks == ["a", "b", "c"] * 3


def test_full_workers_are_skipped_and_none_when_all_full():
    reg, _ = registry_with(("a", 1), ("b", 2))
    assert [reg.reserve(t).worker_id for t in ("t1", "t2", "t3")] == ["a", "b", "b"]
    assert reg.reserve("t4") is None
    assert reg.free_slots() == 0
    reg.release("b", "t2")
    assert reg.free_slots() == 1
    assert reg.reserve("t4").worker_id == "b"


def test_exclude_skips_workers_already_tried():
    reg, _ = registry_with(("a", 5), ("b", 5))
    assert reg.reserve("t1", exclude={"a"}).worker_id == "b"
    assert reg.reserve("t2", exclude={"a", "b"}) is None


def test_heartbeat_of_known_worker_is_not_new_and_updates_address():
    reg, _ = registry_with(("a", 5))
    assert reg.heartbeat("a", "10.0.0.9:8000", 7) is False
    info = reg.get("a")
    assert (info.address, info.slots) == ("10.0.0.9:8000", 7)


def test_silent_workers_expire_and_turn_order_survives_removal():
    reg, clock = registry_with(("a", 5), ("b", 5), ("c", 5))
    assert reg.reserve("t1").worker_id == "a"  # next turn: b
    clock.now += 5
    reg.heartbeat("a", "a:8000", 5)
    reg.heartbeat("c", "c:8000", 5)
    clock.now += 5  # b silent for 10 s > ttl 9 s
    lost = reg.expire()
    assert [(w.worker_id, round(w.silent_s)) for w in lost] == [("b", 10)]
    assert [w.worker_id for w in reg.snapshot()] == ["a", "c"]
    assert reg.reserve("t2").worker_id == "c"
    assert reg.reserve("t3").worker_id == "a"


def test_heartbeat_frees_slots_whose_final_report_was_lost():
    reg, clock = registry_with(("a", 2), ttl=9.0)
    reg.reserve("old")
    reg.reserve("new")
    assert reg.free_slots() == 0
    clock.now += 10
    reg.heartbeat("a", "a:8000", 2, running_task_ids=["new"])
    # "old" is not running any more and was dispatched long ago: its slot is free again.
    # "new" is still running: it keeps its slot.
    assert set(reg.get("a").in_flight) == {"new"}


def test_heartbeat_keeps_recent_dispatches_not_yet_seen_running():
    reg, clock = registry_with(("a", 2))
    reg.reserve("just-sent")
    clock.now += 1
    reg.heartbeat("a", "a:8000", 2, running_task_ids=[])
    assert "just-sent" in reg.get("a").in_flight


def test_release_task_finds_its_worker_and_is_idempotent():
    reg, _ = registry_with(("a", 1), ("b", 1))
    reg.reserve("t1")
    reg.reserve("t2")
    reg.release_task("t2")
    reg.release_task("t2")
    assert reg.free_slots() == 1


def test_a_worker_first_seen_with_running_tasks_has_those_slots_taken():
    # A coordinator that restarted meets workers that are already busy.
    reg, _ = registry_with()
    reg.heartbeat("a", "a:8000", 3, running_task_ids=["t1", "t2"])
    assert reg.free_slots() == 1
