"""The coordinator's gRPC handlers, served in-process over a real database and called over a socket."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import serve_in_test, wait_for

from distrack.config import CoordinatorConfig
from distrack.coordinator.registry import WorkerRegistry
from distrack.coordinator.service import CoordinatorService
from distrack.db.pool import make_pool
from distrack.db.store import Attempt, TaskStore
from distrack.rpc import distrack_pb2, distrack_pb2_grpc

Status = distrack_pb2.TaskStatus


class Served:
    def __init__(self, store: TaskStore, db_url: str) -> None:
        self.store = store
        self.registry = WorkerRegistry()
        self.db_failures = 0
        self.slots_freed = 0
        self.wakeup = threading.Event()
        config = CoordinatorConfig(database_url=db_url, heartbeat_interval_s=0.2)

        def on_db_failure() -> None:
            self.db_failures += 1

        def on_slots_freed() -> None:
            self.slots_freed += 1

        self.service = CoordinatorService(store, self.registry, config, self.wakeup, on_db_failure, on_slots_freed)
        self.server = grpc.server(ThreadPoolExecutor(4))
        distrack_pb2_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = distrack_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()

    def report(self, attempt: Attempt, status: int, **extra) -> bool:
        update = distrack_pb2.TaskStatusUpdate(task_id=str(attempt.task_id), worker_id=attempt.worker_id,
                                               status=status, lease=attempt.lease, **extra)
        return self.stub.UpdateTaskStatus(update, timeout=5).recorded

    def heartbeat(self, worker_id: str, running=(), unfinished=(), slots: int = 5, prefetch: int = 0) -> list[str]:
        return list(self.heartbeat_reply(worker_id, running, unfinished, slots, prefetch).stop_task_ids)

    def heartbeat_reply(self, worker_id: str, running=(), unfinished=(), slots: int = 5, prefetch: int = 0
                        ) -> distrack_pb2.HeartbeatResponse:
        return self.stub.Heartbeat(distrack_pb2.HeartbeatRequest(
            worker_id=worker_id, address=f"{worker_id}:1", slots=slots, running_task_ids=list(running),
            unfinished_task_ids=list(unfinished), prefetch=prefetch), timeout=5)


@pytest.fixture
def served(store, db_url):
    s = Served(store, db_url)
    yield s
    s.close()


def claim(store: TaskStore, worker_id: str = "w1") -> Attempt:
    (task,) = store.claim_due([worker_id])
    return Attempt(task.id, task.lease, worker_id)


def test_a_start_refused_because_of_a_cancel_cancels_the_task_at_once(served, store):
    tid = store.insert_task("sleep 100", 0)["id"]
    a = claim(store)
    store.cancel_task(tid)
    assert served.report(a, Status.INPROGRESS) is False  # the worker must not start it
    row = store.get_task(tid)
    assert row["status"] == "cancelled" and row["attempts"] == 0


def test_the_retry_of_a_start_whose_answer_was_lost_is_accepted(served, store):
    tid = store.insert_task("sleep 100", 0)["id"]
    a = claim(store)
    assert served.report(a, Status.INPROGRESS) is True
    assert served.report(a, Status.INPROGRESS) is True  # the same owner again: still fine
    assert store.get_task(tid)["attempts"] == 1
    # ...but once a cancel is asked, even the owner's retry stops it, and the task is cancelled.
    store.cancel_task(tid)
    assert served.report(a, Status.INPROGRESS) is False
    assert store.get_task(tid)["status"] == "cancelled"


def test_a_stale_report_is_refused_and_changes_nothing(served, store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim(store)
    served.report(a, Status.INPROGRESS)
    stale = Attempt(tid, a.lease - 1, a.worker_id)
    assert served.report(stale, Status.FAILED, exit_code=1) is False
    assert served.report(Attempt(tid, a.lease, "someone-else"), Status.COMPLETED) is False
    assert store.get_task(tid)["status"] == "running"
    assert served.report(a, Status.COMPLETED) is True


def test_a_task_given_back_before_it_started_is_queued_again_at_no_cost(served, store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim(store)
    assert served.report(Attempt(tid, a.lease - 1, a.worker_id), Status.RETURNED) is False  # stale: ignored
    assert store.get_task(tid)["status"] == "picked"
    assert served.report(a, Status.RETURNED) is True
    row = store.get_task(tid)
    assert row["status"] == "queued" and row["attempts"] == 0 and row["worker_id"] is None
    assert row["picked_at"] is None and row["started_at"] is None
    again = claim(store, "w2")  # and due again at once
    assert again.task_id == tid and again.lease > a.lease


def test_a_task_given_back_after_its_cancel_was_asked_ends_cancelled(served, store):
    tid = store.insert_task("echo", 0)["id"]
    a = claim(store)
    store.cancel_task(tid)  # the worker, told to stop it while it waited for a slot, gives it back
    assert served.report(a, Status.RETURNED) is True
    row = store.get_task(tid)
    assert row["status"] == "cancelled" and row["attempts"] == 0 and row["started_at"] is None


def test_ends_tell_of_freed_slots_and_wake_the_claim_loop_only_for_what_they_put_back_in_the_queue(served, store):
    # Freed slots are the dispatcher's to weigh (it wakes its loop if tasks wait for them). A retry or
    # a task given back is in the queue unannounced (the NOTIFY is on INSERT): that wakes the loop.
    ids = {name: store.insert_task("echo", 0, max_attempts=2 if name == "retried" else 1)["id"]
           for name in ("done", "failed", "retried", "given back")}
    claimed = {a.task_id: a for a in (claim(store) for _ in ids)}
    attempt = {name: claimed[task_id] for name, task_id in ids.items()}
    for name in ("done", "failed", "retried"):
        assert served.report(attempt[name], Status.INPROGRESS) is True
    assert served.report(attempt["done"], Status.COMPLETED, exit_code=0) is True
    assert (served.slots_freed, served.wakeup.is_set()) == (1, False)
    assert served.report(attempt["failed"], Status.FAILED, exit_code=1) is True  # its last attempt
    assert (served.slots_freed, served.wakeup.is_set()) == (2, False)
    assert served.report(attempt["retried"], Status.FAILED, exit_code=1) is True
    assert store.get_task(ids["retried"])["status"] == "queued"
    assert (served.slots_freed, served.wakeup.is_set()) == (3, True)
    served.wakeup.clear()
    assert served.report(attempt["given back"], Status.RETURNED) is True
    assert (served.slots_freed, served.wakeup.is_set()) == (4, True)


def test_runs_a_heartbeat_no_longer_lists_wake_the_claim_loop_when_retried(served, store, sql_conn):
    final, retried = (store.insert_task("sleep 100", 0, max_attempts=n)["id"] for n in (1, 2))
    served.heartbeat("w1")
    for _ in range(2):
        served.report(claim(store), Status.INPROGRESS)
    sql_conn.execute("UPDATE tasks SET started_at = now() - interval '1 minute' WHERE id = %s", (final,))
    served.wakeup.clear()  # set by the first heartbeat: a new worker's slots
    served.heartbeat("w1")
    assert store.get_task(final)["status"] == "failed"
    assert (served.slots_freed, served.wakeup.is_set()) == (1, False)
    sql_conn.execute("UPDATE tasks SET started_at = now() - interval '1 minute' WHERE id = %s", (retried,))
    served.heartbeat("w1")
    assert store.get_task(retried)["status"] == "queued"
    assert (served.slots_freed, served.wakeup.is_set()) == (2, True)


def test_a_recorded_heartbeat_tells_the_worker_its_ttl(served):
    assert served.heartbeat_reply("w1").worker_ttl_s == pytest.approx(0.2 * 3)


def test_a_workers_prefetch_counts_as_room_for_tasks(served, store):
    served.heartbeat("w1", slots=2, prefetch=3)
    assert served.registry.free_slots() == 5
    worker = next(w for w in store.live_workers(60) if w.worker_id == "w1")
    assert worker.takes == 5


def test_a_heartbeat_ends_running_attempts_the_worker_no_longer_lists(served, store, sql_conn):
    listed = store.insert_task("sleep 100", 0)["id"]
    lost = store.insert_task("sleep 100", 0)["id"]
    recent = store.insert_task("sleep 100", 0)["id"]
    served.heartbeat("w1")
    for _ in range(3):
        served.report(claim(store), Status.INPROGRESS)
    sql_conn.execute("UPDATE tasks SET started_at = now() - interval '1 minute' WHERE id <> %s", (recent,))
    served.heartbeat("w1", running=[str(listed)], unfinished=[str(listed)])
    assert store.get_task(listed)["status"] == "running"
    assert store.get_task(recent)["status"] == "running"  # its start may postdate the heartbeat
    row = store.get_task(lost)
    assert row["status"] == "failed" and "no longer runs it" in row["error"]


def test_a_heartbeat_lists_the_runs_to_stop(served, store):
    mine = store.insert_task("sleep 100", 0)["id"]
    a = claim(store)
    served.report(a, Status.INPROGRESS)
    stranger = str(uuid.uuid4())
    listed = [str(mine), stranger]
    reply = served.heartbeat_reply("w1", running=listed, unfinished=listed)
    assert list(reply.stop_task_ids) == [stranger] and not reply.cancel_task_ids
    store.cancel_task(mine)
    reply = served.heartbeat_reply("w1", running=listed, unfinished=listed)
    # A cancel is in both lists: a worker that does not know cancel_task_ids still stops it.
    assert sorted(reply.stop_task_ids) == sorted([str(mine), stranger]) and list(reply.cancel_task_ids) == [str(mine)]


def test_a_heartbeat_does_not_tell_a_worker_to_stop_runs_that_already_ended(served, store):
    # The run ended and its final report was recorded; the worker lists the task as unfinished until
    # the report's answer reaches it. Nothing runs to be stopped, and nothing need be said (under load
    # this used to log a "telling ... to stop" line for every heartbeat).
    store.insert_task("echo done", 0)
    a = claim(store)
    assert served.report(a, Status.COMPLETED, started_at=time.time())
    assert served.heartbeat("w1", running=[], unfinished=[str(a.task_id)]) == []


def test_a_heartbeat_that_cannot_be_recorded_holds_back_the_rescue(db_url):
    pool = make_pool("postgresql://nobody@127.0.0.1:1/none", max_size=1)
    s = Served(TaskStore(pool), db_url)
    try:
        assert s.heartbeat("w1") == []
        assert s.db_failures == 1
        assert s.registry.get("w1") is None  # not on record, so not dispatched to
        # Known from before the outage: still dispatched to, but no ttl, so it starts no task that
        # waits for a slot on the strength of a heartbeat the database never saw.
        s.registry.heartbeat("w1", "w1:1", 5)
        reply = s.heartbeat_reply("w1")
        assert s.db_failures == 2 and s.registry.get("w1") is not None and reply.worker_ttl_s == 0
    finally:
        s.close()
        pool.close()


def test_malformed_reports_are_invalid_argument(served):
    for update in (distrack_pb2.TaskStatusUpdate(task_id="nope", worker_id="w", status=Status.COMPLETED),
                   distrack_pb2.TaskStatusUpdate(task_id=str(uuid.uuid4()), worker_id="", status=Status.COMPLETED),
                   distrack_pb2.TaskStatusUpdate(task_id=str(uuid.uuid4()), worker_id="w", status=99)):
        with pytest.raises(grpc.RpcError) as info:
            served.stub.UpdateTaskStatus(update, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_report_with_an_impossible_start_time_fails_alone(served, store):
    # One such report used to fail its whole batch (PostgreSQL refuses to_timestamp of it), so the
    # good reports sent with it were lost too.
    for started_at in (float("nan"), float("inf"), -1.0, 1e300):
        store.insert_task("echo", 0)
        store.insert_task("echo", 0)
        victim, good = claim(store), claim(store)
        bad = distrack_pb2.TaskStatusUpdate(task_id=str(victim.task_id), worker_id="w1", status=Status.COMPLETED,
                                            lease=victim.lease, started_at=started_at)
        fine = distrack_pb2.TaskStatusUpdate(task_id=str(good.task_id), worker_id="w1", status=Status.COMPLETED,
                                             lease=good.lease, started_at=time.time())
        acks = served.stub.ReportTasks(distrack_pb2.TaskStatusReports(updates=[bad, fine]), timeout=5).acks
        assert "started_at" in acks[0].error and not acks[0].recorded
        assert not acks[1].error and acks[1].recorded
        assert store.get_task(good.task_id)["status"] == "completed"
        assert store.get_task(victim.task_id)["status"] == "picked"


def test_a_heartbeat_with_malformed_task_ids_is_invalid_argument(served):
    for field in ("running_task_ids", "unfinished_task_ids"):
        request = distrack_pb2.HeartbeatRequest(worker_id="w1", address="w1:1", slots=1, **{field: ["nope"]})
        with pytest.raises(grpc.RpcError) as info:
            served.stub.Heartbeat(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_new_task_due_after_the_loops_own_wake_up_does_not_wake_it():
    import threading
    import time

    from distrack.config import CoordinatorConfig
    from distrack.coordinator.dispatcher import Dispatcher
    from distrack.coordinator.registry import WorkerRegistry

    wakeup = threading.Event()
    dispatcher = Dispatcher(None, WorkerRegistry(), CoordinatorConfig(database_url="unused"), wakeup)
    try:
        dispatcher._sleep_until = time.monotonic() + 30  # asleep, waking in 30 s by itself
        dispatcher.on_notify("distrack_task_queued", str(time.time() + 3600))
        assert not wakeup.is_set()  # due in an hour: the planned wake-up looks it up
        for payload in (str(time.time()), str(time.time() + 20), "", None, "nan", "inf"):  # due before then, or unknown
            dispatcher.on_notify("distrack_task_queued", payload)
            assert wakeup.is_set(), payload
            wakeup.clear()
    finally:
        dispatcher._pool.shutdown()


def _sleep_in_a_thread(dispatcher, wait_s: float):
    import threading

    sleeper = threading.Thread(target=dispatcher._sleep, args=(wait_s,), daemon=True)
    sleeper.start()
    return sleeper


@pytest.mark.parametrize("payload", ["now", "", "nan"])
def test_a_task_due_now_announced_while_the_loop_is_awake_keeps_it_from_sleeping(payload):
    import math
    import threading
    import time

    from distrack.config import CoordinatorConfig
    from distrack.coordinator.dispatcher import Dispatcher
    from distrack.coordinator.registry import WorkerRegistry

    wakeup = threading.Event()
    dispatcher = Dispatcher(None, WorkerRegistry(), CoordinatorConfig(database_url="unused"), wakeup)
    try:
        assert dispatcher._sleep_until == math.inf  # awake: its claim may have looked before the task was there
        dispatcher.on_notify("distrack_task_queued", str(time.time()) if payload == "now" else payload)
        sleeper = _sleep_in_a_thread(dispatcher, 30.0)
        sleeper.join(5.0)
        assert not sleeper.is_alive()  # claims again at once, not after its 30 s
        assert dispatcher._sleep_until == math.inf
    finally:
        wakeup.set()
        dispatcher._pool.shutdown()


def test_tasks_due_later_announced_while_the_loop_is_awake_end_its_next_sleep_by_their_due_time():
    import math
    import threading
    import time

    from distrack.config import CoordinatorConfig
    from distrack.coordinator.dispatcher import NOTIFY_CLOCK_MARGIN_S, Dispatcher
    from distrack.coordinator.registry import WorkerRegistry

    wakeup = threading.Event()
    dispatcher = Dispatcher(None, WorkerRegistry(), CoordinatorConfig(database_url="unused"), wakeup)
    try:
        for due_in_s in (3600, 20, 600):  # awake: noted, no wake-up (scheduling for later costs no claim)
            dispatcher.on_notify("distrack_task_queued", str(time.time() + due_in_s))
            assert not wakeup.is_set()
        before = time.monotonic()
        sleeper = _sleep_in_a_thread(dispatcher, 30.0)
        deadline = time.monotonic() + 5
        while dispatcher._sleep_until == math.inf and time.monotonic() < deadline:
            time.sleep(0.001)
        # The earliest (due in 20 s) ends the sleep, less the clock margin; not the 30 s it planned.
        planned = dispatcher._sleep_until - before
        assert 20 - NOTIFY_CLOCK_MARGIN_S - 1 < planned <= 20 - NOTIFY_CLOCK_MARGIN_S, planned
        assert dispatcher._announced_due == math.inf  # the next time awake starts afresh
        wakeup.set()
        sleeper.join(5.0)
        assert not sleeper.is_alive()
    finally:
        wakeup.set()
        dispatcher._pool.shutdown()


class SlowRefusingWorker(distrack_pb2_grpc.WorkerServicer):
    """A worker whose SubmitTasks answers after `delay_s`, refusing every task as full."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.called = threading.Event()

    def SubmitTasks(self, request, context):
        self.called.set()
        threading.Event().wait(self.delay_s)
        return distrack_pb2.TaskBatchResponse(results=[
            distrack_pb2.TaskResponse(task_id=t.task_id, accepted=False, refusal=distrack_pb2.FULL)
            for t in request.tasks])


def test_stop_handles_the_answers_of_dispatches_under_way_before_returning(store, db_url):
    from distrack.coordinator.dispatcher import Dispatcher

    worker = SlowRefusingWorker(delay_s=1.0)
    server, port = serve_in_test(distrack_pb2_grpc.add_WorkerServicer_to_server, worker, threads=2)
    try:
        store.record_heartbeat("slow", f"127.0.0.1:{port}", 1, [])
        task_id = store.insert_task("echo", 0)["id"]
        dispatcher = Dispatcher(store, WorkerRegistry(), CoordinatorConfig(database_url=db_url), threading.Event())
        dispatcher.run_once()  # claims the task and starts the call, without waiting for it
        assert store.get_task(task_id)["status"] == "picked"
        assert worker.called.wait(5)
        dispatcher.stop()
        # The refusal arrived while stopping and was handled before stop() returned: the task is back
        # in the queue, not left picked until the acknowledgement deadline.
        assert store.get_task(task_id)["status"] == "queued"
    finally:
        server.stop(0).wait()


class AcceptingWorker(distrack_pb2_grpc.WorkerServicer):
    """A worker that takes every task it is sent (after `delay_s`), recording their ids."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.received: list[str] = []
        self.answered = threading.Event()

    def SubmitTasks(self, request, context):
        self.received.extend(t.task_id for t in request.tasks)
        threading.Event().wait(self.delay_s)
        self.answered.set()
        return distrack_pb2.TaskBatchResponse(results=[
            distrack_pb2.TaskResponse(task_id=t.task_id, accepted=True) for t in request.tasks])


@pytest.fixture
def worker_servers():
    servers = []

    def serve(servicer: distrack_pb2_grpc.WorkerServicer) -> str:
        server, port = serve_in_test(distrack_pb2_grpc.add_WorkerServicer_to_server, servicer, threads=2)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield serve
    for server in servers:
        server.stop(0).wait()


def dispatcher_for(store: TaskStore, db_url: str, **config):
    from distrack.coordinator.dispatcher import Dispatcher

    return Dispatcher(store, WorkerRegistry(), CoordinatorConfig(database_url=db_url, **config), threading.Event())


def test_a_dispatch_that_may_have_reached_its_worker_stays_with_it_until_a_heartbeat_says_otherwise(
        store, db_url, worker_servers):
    # The call times out (the worker answers after its deadline): the worker may have taken the task,
    # so it must not go to the other one, free as it is, until the slow one's heartbeat shows it does not
    # hold it.
    slow, fast = AcceptingWorker(delay_s=1.5), AcceptingWorker()
    store.record_heartbeat("slow", worker_servers(slow), 1, [])
    store.record_heartbeat("fast", worker_servers(fast), 1, [])
    task_id = store.insert_task("echo", 0)["id"]
    dispatcher = dispatcher_for(store, db_url, ack_timeout_s=1.0)  # calls end 0.5 s after the claim
    try:
        dispatcher.run_once()
        with dispatcher._answers_changed:
            assert dispatcher._answers_changed.wait_for(lambda: dispatcher._answers_owed == 0, 5)
        row = store.get_task(task_id)
        assert (row["status"], row["worker_id"], fast.received) == ("picked", "slow", [])
        dispatcher._rescue()
        assert store.get_task(task_id)["status"] == "picked"  # no heartbeat since the claim yet
        assert slow.answered.wait(5)
        wait_for(lambda: time.time() - row["picked_at"].timestamp() > 1.05, what="a whole bound after the claim")
        store.record_heartbeat("slow", "unused:1", 1, [], [str(task_id)])  # it holds it
        dispatcher._rescue()
        assert store.get_task(task_id)["status"] == "picked"
        store.record_heartbeat("slow", "unused:1", 1, [], [])  # it does not
        dispatcher._rescue()
        row = store.get_task(task_id)
        assert (row["status"], row["attempts"], row["worker_id"]) == ("queued", 0, None)
    finally:
        dispatcher.stop()


def test_a_rescue_wakes_the_claim_loop_when_it_puts_a_retry_back_in_the_queue(store, db_url):
    dispatcher = dispatcher_for(store, db_url)
    try:
        for max_attempts, status, wakes in ((1, "failed", False), (2, "queued", True)):
            task_id = store.insert_task("sleep 100", 0, max_attempts=max_attempts)["id"]
            assert store.mark_running(claim(store, f"gone-{max_attempts}"))  # a worker never heard of
            dispatcher.wakeup.clear()
            dispatcher._rescue()
            assert store.get_task(task_id)["status"] == status
            assert dispatcher.wakeup.is_set() is wakes, status
    finally:
        dispatcher.stop()


def test_a_dispatch_that_never_reached_its_worker_goes_to_another(store, db_url, worker_servers):
    from helpers import free_port

    other = AcceptingWorker()
    store.record_heartbeat("gone", f"127.0.0.1:{free_port()}", 1, [])  # nothing listens there
    store.record_heartbeat("other", worker_servers(other), 1, [])
    task_id = store.insert_task("echo", 0)["id"]
    dispatcher = dispatcher_for(store, db_url)
    try:
        dispatcher.run_once()
        wait_for(lambda: other.received == [str(task_id)], what="the task to be passed on")
        wait_for(lambda: store.get_task(task_id)["worker_id"] == "other", what="the row to name the new worker")
        assert store.get_task(task_id)["status"] == "picked"
    finally:
        dispatcher.stop()


def test_a_claim_too_old_to_dispatch_goes_back_to_the_queue_unsent(store, db_url, worker_servers):
    worker = AcceptingWorker()
    store.record_heartbeat("w", worker_servers(worker), 1, [])
    task_id = store.insert_task("echo", 0)["id"]
    # The pause between claim and dispatch outlasts the dispatch deadline (half of 1 s).
    dispatcher = dispatcher_for(store, db_url, ack_timeout_s=1.0, fault_claim_delay_s=0.6)
    try:
        dispatcher.run_once()
        row = store.get_task(task_id)
        assert (row["status"], row["attempts"], worker.received) == ("queued", 0, [])
    finally:
        dispatcher.stop()


def test_a_claim_after_an_idle_one_takes_few_tasks_then_all_the_room_at_once(store, db_url, sql_conn, worker_servers):
    from distrack.coordinator.dispatcher import IDLE_CLAIM_LIMIT

    worker = AcceptingWorker()
    store.record_heartbeat("w", worker_servers(worker), 20, [])
    dispatcher = dispatcher_for(store, db_url)

    def picked() -> int:
        return sql_conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'picked'").fetchone()["n"]

    try:
        store.insert_task("echo", 0)
        dispatcher.run_once()  # a coordinator that just started claims all the room it has
        assert picked() == 1  # and found the queue drained
        for _ in range(10):
            store.insert_task("echo", 0)
        assert dispatcher.run_once() == 0.0  # a few, which it all took: more may be due, so again at once
        assert picked() == 1 + IDLE_CLAIM_LIMIT
        dispatcher.run_once()
        assert picked() == 11
        wait_for(lambda: len(worker.received) == 11, what="every task dispatched")
    finally:
        dispatcher.stop()


def _wakes_and_sleeps(dispatcher, wait_s: float) -> threading.Thread:
    """The loop's wait after a step that asked for `wait_s`, woken at once (as a report or a new
    task would), in a thread."""
    dispatcher.wakeup.set()
    sleeper = threading.Thread(target=dispatcher._sleep, args=(wait_s,), daemon=True)
    sleeper.start()
    return sleeper


@pytest.fixture
def lingering_dispatcher(store, db_url, worker_servers, monkeypatch):
    """A dispatcher whose linger lasts 30 s, with one accepting worker of `slots` slots."""
    from distrack.coordinator import dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "LINGER_S", 30.0)
    made = []

    def make(slots: int):
        store.record_heartbeat("w", worker_servers(AcceptingWorker()), slots, [])
        made.append(dispatcher_for(store, db_url))
        return made[-1]

    yield make
    for dispatcher in made:
        dispatcher.stop()  # ends a linger too


def test_a_task_that_finds_a_free_slot_is_not_held_back_by_the_loops_linger(store, lingering_dispatcher):
    # Tasks coming often (here, each claimed just after the one before) find slots free: however
    # recent the last claim, the loop claims at once rather than lingering to gather more.
    dispatcher = lingering_dispatcher(slots=20)
    for count in (1, 1, 10):  # lone tasks; then more than an idle claim takes, so it claims again
        for _ in range(count):
            store.insert_task("echo", 0)
        sleeper = _wakes_and_sleeps(dispatcher, dispatcher.run_once())
        sleeper.join(5.0)
        assert not sleeper.is_alive(), f"lingered after a claim of {count} task(s) with slots free"


def test_while_tasks_wait_for_slots_the_loop_lingers_to_gather_freed_ones(store, lingering_dispatcher):
    dispatcher = lingering_dispatcher(slots=2)
    for _ in range(5):
        store.insert_task("echo", 0)
    sleeper = _wakes_and_sleeps(dispatcher, dispatcher.run_once())  # both slots taken, 3 tasks due
    sleeper.join(0.5)
    assert sleeper.is_alive()  # gathering the slots that free meanwhile
    dispatcher.stop()
    sleeper.join(5.0)
    assert not sleeper.is_alive()


def test_freed_slots_wake_the_claim_loop_only_while_due_tasks_wait_for_slots(store, db_url, worker_servers):
    address = worker_servers(AcceptingWorker())
    store.record_heartbeat("w", address, 2, [])
    dispatcher = dispatcher_for(store, db_url)

    def wakes(d=dispatcher) -> bool:
        d.wakeup.clear()
        d.slots_freed()
        return d.wakeup.is_set()

    try:
        store.insert_task("echo", 0)
        dispatcher.run_once()
        assert not wakes()  # it took all that was due: a claim now would find nothing
        for _ in range(3):
            store.insert_task("echo", 0)
        dispatcher.run_once()
        assert wakes()  # its last free slot taken, 2 tasks left due
        dispatcher2 = dispatcher_for(store, db_url)
        try:
            store.record_heartbeat("w", address, 0, [])  # no room at all: what is due waits for a slot
            dispatcher2.run_once()
            assert wakes(dispatcher2)
        finally:
            dispatcher2.stop()
    finally:
        dispatcher.stop()


class CancelHoldingWorker(AcceptingWorker):
    """Takes every task; a CancelTask call is counted and then answered only once `release` is set (a
    worker gone silent), or at once with hold=False."""

    def __init__(self, hold: bool = True) -> None:
        super().__init__()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.cancels: list[str] = []
        self._lock = threading.Lock()

    def CancelTask(self, request, context):
        with self._lock:
            self.cancels.append(request.task_id)
        self.release.wait(10)
        return distrack_pb2.CancelTaskResponse(found=True)


def _claimed_and_cancelled(store: TaskStore, dispatcher, count: int) -> list[str]:
    ids = [str(store.insert_task("sleep 100", 0)["id"]) for _ in range(count)]
    dispatcher.run_once()
    with dispatcher._answers_changed:
        assert dispatcher._answers_changed.wait_for(lambda: dispatcher._answers_owed == 0, 10)
    for task_id in ids:
        store.cancel_task(uuid.UUID(task_id))
    return ids


def _workers_with_cancels_under_way(dispatcher) -> set[str]:
    with dispatcher._cancels_sent_lock:
        return {worker_id for _, worker_id in dispatcher._cancels_sent}


def _sweep(dispatcher) -> None:
    dispatcher._cancels.put(None)  # what each sweep of the housekeeping thread asks for
    dispatcher._send_cancels()


def test_a_cancel_under_way_is_not_sent_again_by_the_next_sweeps(store, db_url, worker_servers):
    silent, other = CancelHoldingWorker(), CancelHoldingWorker(hold=False)
    store.record_heartbeat("silent", worker_servers(silent), 1, [])
    store.record_heartbeat("other", worker_servers(other), 1, [])
    dispatcher = dispatcher_for(store, db_url)
    try:
        _claimed_and_cancelled(store, dispatcher, 2)
        assert len(silent.received) == 1 and len(other.received) == 1
        # The other worker answers at once, so each sweep asks it again: three sweeps, three calls.
        for n in (1, 2, 3):
            _sweep(dispatcher)
            wait_for(lambda n=n: len(other.cancels) == n and "other" not in _workers_with_cancels_under_way(dispatcher),
                     what=f"sweep {n}'s cancel on the worker that answers")
        assert silent.cancels == silent.received  # once, though three sweeps asked for it
        silent.release.set()
        wait_for(lambda: not dispatcher._cancels_sent, what="the held cancel answered")
        _sweep(dispatcher)  # answered, yet still pending in the database: asked again
        wait_for(lambda: len(silent.cancels) == 2, what="the cancel asked again")
    finally:
        silent.release.set()
        dispatcher.stop()


def test_cancels_held_up_by_a_silent_worker_never_hold_up_a_dispatch(store, db_url, worker_servers):
    # More cancels under way than the dispatcher has call threads: none of them may delay a dispatch
    # past its deadline (0.5 s after its claim here), which would send the task back unsent.
    from distrack.coordinator.dispatcher import DISPATCH_THREADS

    silent, other = CancelHoldingWorker(), AcceptingWorker()
    held = DISPATCH_THREADS + 2
    store.record_heartbeat("silent", worker_servers(silent), held, [])
    dispatcher = dispatcher_for(store, db_url, ack_timeout_s=1.0)
    try:
        _claimed_and_cancelled(store, dispatcher, held)
        assert len(silent.received) == held
        _sweep(dispatcher)
        wait_for(lambda: silent.cancels, what="the first cancel to reach the silent worker")
        store.record_heartbeat("other", worker_servers(other), 1, [])
        dispatcher._refresh_workers()
        task_id = str(store.insert_task("echo", 0)["id"])
        dispatcher.run_once()
        wait_for(lambda: other.received == [task_id], what="the dispatch to the other worker")
        assert store.get_task(uuid.UUID(task_id))["worker_id"] == "other"
    finally:
        silent.release.set()
        dispatcher.stop()


class HoldingWorker(AcceptingWorker):
    """Takes every task, answering each call only once `release` is set (a worker slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def SubmitTasks(self, request, context):
        with self._lock:
            self.received.extend(t.task_id for t in request.tasks)
        self.release.wait(10)
        return distrack_pb2.TaskBatchResponse(results=[
            distrack_pb2.TaskResponse(task_id=t.task_id, accepted=True) for t in request.tasks])


def test_dispatches_awaiting_their_answers_never_hold_up_another(store, db_url, worker_servers):
    # More calls awaiting a slow worker's answers than the dispatcher has call threads: a dispatch to
    # another worker still leaves at once, while every one of them is still waiting.
    from distrack.coordinator.dispatcher import DISPATCH_THREADS

    slow, other = HoldingWorker(), AcceptingWorker()
    held = DISPATCH_THREADS + 2
    store.record_heartbeat("slow", worker_servers(slow), held, [])
    dispatcher = dispatcher_for(store, db_url, ack_timeout_s=20.0)  # calls may wait 10 s for answers
    try:
        for _ in range(held):  # one call each
            store.insert_task("echo", 0)
            dispatcher.run_once()
        store.record_heartbeat("other", worker_servers(other), 1, [])
        dispatcher._refresh_workers()
        task_id = str(store.insert_task("echo", 0)["id"])
        dispatcher.run_once()
        wait_for(lambda: other.received == [task_id], what="the dispatch to the other worker")
        assert not slow.release.is_set() and dispatcher._answers_owed == held
        slow.release.set()
        with dispatcher._answers_changed:
            assert dispatcher._answers_changed.wait_for(lambda: dispatcher._answers_owed == 0, 10)
        assert len(slow.received) == held
    finally:
        slow.release.set()
        dispatcher.stop()


def test_a_dispatch_on_a_channel_closed_just_before_goes_to_another_worker(store, db_url, worker_servers):
    first, other = AcceptingWorker(), AcceptingWorker()
    store.record_heartbeat("first", worker_servers(first), 1, [])
    dispatcher = dispatcher_for(store, db_url)
    try:
        dispatcher._refresh_workers()
        store.record_heartbeat("other", worker_servers(other), 1, [])
        # The worker's channel is closed under the loop (as forget() does when a worker leaves): the call
        # cannot start, so it never reached the worker, and the task may go to the other one.
        dispatcher.clients.stub(dispatcher.registry.get("first"))
        dispatcher.clients._stubs["first"][1].close()
        dispatcher._refresh_workers()
        task_id = str(store.insert_task("echo", 0)["id"])
        dispatcher.run_once()
        wait_for(lambda: other.received == [task_id], what="the task passed on to the other worker")
        assert first.received == [] and store.get_task(uuid.UUID(task_id))["worker_id"] == "other"
    finally:
        dispatcher.stop()


def test_a_dispatch_answer_that_cannot_be_read_leaves_its_tasks_with_their_worker(store, db_url, worker_servers):
    # A defect in reading an answer must neither pass the tasks on (the worker may have taken them) nor
    # leave stop() waiting for an answer that was handled.
    worker = AcceptingWorker()
    store.record_heartbeat("w", worker_servers(worker), 1, [])
    task_id = store.insert_task("echo", 0)["id"]
    dispatcher = dispatcher_for(store, db_url)

    def unreadable(*args):
        raise RuntimeError("a defect reading the answer")

    dispatcher._not_taken = unreadable
    try:
        dispatcher.run_once()
        wait_for(lambda: worker.received == [str(task_id)], what="the dispatch")
        with dispatcher._answers_changed:
            assert dispatcher._answers_changed.wait_for(lambda: dispatcher._answers_owed == 0, 5)
        row = store.get_task(task_id)
        assert (row["status"], row["worker_id"]) == ("picked", "w")
    finally:
        dispatcher.stop()


def test_the_coordinator_tries_to_reach_a_worker_about_once_a_heartbeat_through_an_outage():
    # Without a bound, gRPC's reconnect backoff (up to 2 min) would leave a worker that was cut off for a
    # few seconds unreached for seconds more: every dispatch to it refused, though it heartbeats.
    from helpers import ConnectionCounter

    from distrack.coordinator.dispatcher import WorkerClients
    from distrack.coordinator.registry import WorkerInfo

    heartbeat_s = 0.2
    worker = AcceptingWorker()
    server, port = serve_in_test(distrack_pb2_grpc.add_WorkerServicer_to_server, worker, threads=2)
    clients = WorkerClients(reconnect_s=heartbeat_s)
    stub = clients.stub(WorkerInfo("w", f"127.0.0.1:{port}", 1))
    batch = distrack_pb2.TaskBatch(tasks=[distrack_pb2.TaskRequest(task_id=str(uuid.uuid4()), command="true")])

    def called() -> bool:
        try:
            stub.SubmitTasks(batch, timeout=1)
            return True
        except grpc.RpcError:
            return False

    try:
        assert called()
        server.stop(0).wait()
        # Bounded by the heartbeat (+-20% jitter), 16 tries or more in 4 s; gRPC's default, 3 or 4.
        with ConnectionCounter(port) as down:
            window_ends = time.monotonic() + 4.0
            # Calls keep the channel trying, as the coordinator's dispatches would.
            wait_for(lambda: not called() and time.monotonic() >= window_ends, 10, interval=heartbeat_s,
                     what="the outage")
        assert down.count >= 8, f"{down.count} connection attempts in 4 s"
        server, _ = serve_in_test(distrack_pb2_grpc.add_WorkerServicer_to_server, worker, threads=2, port=port)
        wait_for(called, 10, what="a call through once the worker is back")
    finally:
        clients.close()
        server.stop(0).wait()
