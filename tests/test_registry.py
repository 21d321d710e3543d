"""The worker registry: round-robin over live workers with free slots, driven by a fake clock."""

from distrack.coordinator.registry import WorkerRegistry
from distrack.db.store import LiveWorker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry_with(*workers: tuple[str, int]) -> tuple[WorkerRegistry, Clock]:
    clock = Clock()
    reg = WorkerRegistry(refusal_backoff_s=3.0, clock=clock)
    for worker_id, slots in workers:
        assert reg.heartbeat(worker_id, f"{worker_id}:8000", slots) is True
    return reg, clock


def dispatch(reg: WorkerRegistry, task_id: str) -> str | None:
    """Reserve one slot and confirm it, as the dispatcher does for one claimed task."""
    picks = reg.reserve(1)
    if not picks:
        return None
    reg.confirm(picks[0].worker_id, task_id)
    return picks[0].worker_id


def live(worker_id: str, slots: int = 5, active: tuple[str, ...] = ()) -> LiveWorker:
    return LiveWorker(worker_id, f"{worker_id}:8000", slots, len(active), frozenset(active))


def test_round_robin_over_workers():
    reg, _ = registry_with(("a", 5), ("b", 5), ("c", 5))
    assert [dispatch(reg, f"t{i}") for i in range(9)] == ["a", "b", "c"] * 3


def test_a_batch_reservation_takes_one_slot_per_worker_per_round():
    reg, _ = registry_with(("a", 2), ("b", 1), ("c", 2))
    assert [w.worker_id for w in reg.reserve(10)] == ["a", "b", "c", "a", "c"]
    assert reg.free_slots() == 0


def test_unused_reservations_do_not_skip_turns():
    # A claim reserves every free slot but finds one due task: the next claim starts at the next worker.
    reg, _ = registry_with(("a", 5), ("b", 5), ("c", 5))
    picked = []
    for i in range(6):
        picks = reg.reserve(reg.free_slots())
        reg.confirm(picks[0].worker_id, f"t{i}")
        for unused in picks[1:]:
            reg.unreserve(unused.worker_id)
        picked.append(picks[0].worker_id)
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_full_workers_are_skipped_and_nothing_when_all_are_full():
    reg, _ = registry_with(("a", 1), ("b", 2))
    assert [dispatch(reg, t) for t in ("t1", "t2", "t3")] == ["a", "b", "b"]
    assert dispatch(reg, "t4") is None
    assert reg.free_slots() == 0
    reg.release("b", "t2")
    assert reg.free_slots() == 1
    assert dispatch(reg, "t4") == "b"


def test_exclude_skips_workers_already_tried():
    reg, _ = registry_with(("a", 5), ("b", 5))
    assert [w.worker_id for w in reg.reserve(1, exclude={"a"})] == ["b"]
    assert reg.reserve(1, exclude={"a", "b"}) == []


def test_a_refusing_worker_gets_nothing_until_its_next_heartbeat_or_the_backoff():
    reg, clock = registry_with(("a", 5), ("b", 5))
    reg.mark_refusing("a")
    assert [dispatch(reg, t) for t in ("t1", "t2")] == ["b", "b"]
    reg.heartbeat("a", "a:8000", 5)
    assert dispatch(reg, "t3") == "a"
    reg.mark_refusing("a")
    assert reg.free_slots() == 3  # b's 5 less t1 and t2; a counts for nothing
    clock.now += 3.1
    assert reg.free_slots() == 4 + 3  # a is back, less t3


def test_heartbeat_updates_address_and_counts_what_the_worker_runs():
    reg, _ = registry_with(("a", 3))
    assert reg.heartbeat("a", "10.0.0.9:8000", 3, running_task_ids=["x", "y"]) is False
    info = reg.get("a")
    assert info.address == "10.0.0.9:8000" and set(info.in_flight) == {"x", "y"}
    assert reg.free_slots() == 1


def test_a_worker_first_seen_with_running_tasks_has_those_slots_taken():
    # A coordinator that restarted meets workers that are already busy.
    reg, _ = registry_with()
    reg.heartbeat("a", "a:8000", 3, running_task_ids=["t1", "t2"])
    assert reg.free_slots() == 1


def test_sync_takes_the_databases_view_of_workers_and_their_tasks():
    reg, clock = registry_with(("a", 5), ("gone", 5))
    dispatch(reg, "t-old")  # to a
    clock.now += 1
    snapshot_at = clock.now
    clock.now += 1
    removed = reg.sync([live("a", active=("t-other-coordinator",)), live("c")], snapshot_at)
    assert [w.worker_id for w in removed] == ["gone"]
    assert [w.worker_id for w in reg.snapshot()] == ["a", "c"]
    # t-old ended (older than the snapshot, not in it); the other coordinator's task holds a slot.
    assert set(reg.get("a").in_flight) == {"t-other-coordinator"}


def test_sync_keeps_dispatches_newer_than_the_snapshot():
    reg, clock = registry_with(("a", 5))
    snapshot_at = clock.now
    clock.now += 0.5
    dispatch(reg, "t-after")
    reg.sync([live("a")], snapshot_at)
    assert "t-after" in reg.get("a").in_flight


def test_sync_keeps_a_worker_heard_after_the_snapshot_began():
    reg, clock = registry_with()
    snapshot_at = clock.now
    clock.now += 0.1
    reg.heartbeat("new", "new:8000", 5)
    reg.sync([], snapshot_at)
    assert reg.get("new") is not None


def test_turn_survives_workers_leaving():
    reg, _ = registry_with(("a", 5), ("b", 5), ("c", 5))
    assert dispatch(reg, "t1") == "a"  # next turn: b
    reg.remove("b")
    assert dispatch(reg, "t2") == "c"
    assert dispatch(reg, "t3") == "a"


def test_release_and_unreserve_are_idempotent():
    reg, _ = registry_with(("a", 1))
    dispatch(reg, "t1")
    reg.release("a", "t1")
    reg.release("a", "t1")
    reg.unreserve("a", 3)
    assert reg.free_slots() == 1


def test_heard_within_is_about_this_coordinators_own_heartbeats():
    reg, clock = registry_with(("a", 5))
    assert reg.heard_within("a", 1.0)
    clock.now += 2
    assert not reg.heard_within("a", 1.0)
    reg.sync([live("b")], clock.now)
    assert not reg.heard_within("b", 1.0)  # known only from the database
