"""A worker process against a recording coordinator (a real gRPC server in the test): its protocol."""

import signal
import time
import uuid

import grpc
import pytest
from helpers import TEST_HEARTBEAT_S, RecordingCoordinator, Service, free_port, serve_in_test, wait_for

from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.worker.service import GIVE_BACK_S, NOT_OWNER, START_REFUSED

Status = distrack_pb2.TaskStatus


@pytest.fixture
def coordinator():
    servicer = RecordingCoordinator()
    server, servicer.port = serve_in_test(distrack_pb2_grpc.add_CoordinatorServicer_to_server, servicer)
    yield servicer
    server.stop(0).wait()


@pytest.fixture
def worker(coordinator, tmp_path):
    started: list[Service] = []

    def start(slots: int = 1, env_extra: dict | None = None, prefetch: int = 0,
              ) -> tuple[Service, distrack_pb2_grpc.WorkerStub]:
        import os

        port = free_port()
        env = dict(os.environ, **(env_extra or {}))
        service = Service(
            f"worker{len(started)}",
            [
                "worker",
                f"--worker_port=127.0.0.1:{port}",
                f"--coordinator=127.0.0.1:{coordinator.port}",
                f"--output_dir={tmp_path / 'out'}",
                f"--slots={slots}",
                f"--prefetch={prefetch}",
                f"--heartbeat_interval_s={TEST_HEARTBEAT_S}",
            ],
            env,
            tmp_path,
        )
        started.append(service)
        wait_for(
            lambda: any(h.address.endswith(f":{port}") for h in coordinator.heartbeats),
            20,
            what="the worker's first heartbeat",
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return service, distrack_pb2_grpc.WorkerStub(channel)

    yield start
    for service in started:
        service.stop()


def submit(stub, command: str, attempt: int = 1, timeout_seconds: float = 0, lease: int = 7,
           task_id: str | None = None) -> str:
    task_id = task_id or str(uuid.uuid4())
    resp = stub.SubmitTask(
        distrack_pb2.TaskRequest(task_id=task_id, command=command, attempt=attempt, timeout_seconds=timeout_seconds,
                                 lease=lease),
        timeout=5,
    )
    assert resp.accepted
    return task_id


def test_heartbeats_carry_identity_address_slots_and_running_tasks(coordinator, worker):
    _, stub = worker(slots=3)
    task_id = submit(stub, "sleep 2")
    hb = wait_for(
        lambda: next((h for h in reversed(coordinator.heartbeats) if task_id in h.running_task_ids), None),
        what="a heartbeat listing the running task",
    )
    assert hb.slots == 3 and hb.worker_id and not hb.address.startswith("0.0.0.0")


def gated(marker) -> str:
    """A command that runs until `marker` exists: the test decides when it ends. (A start report still
    waiting when its run ends is replaced by the final report, so a quick command may send only that.)"""
    return f"while [ ! -e {marker} ]; do sleep 0.01; done"


def test_reports_inprogress_then_completed_with_the_attempt(coordinator, worker, tmp_path):
    _, stub = worker()
    task_id = submit(stub, gated(tmp_path / "go"), attempt=4)
    wait_for(lambda: Status.INPROGRESS in coordinator.statuses(task_id), what="the start report")
    (tmp_path / "go").touch()
    final = wait_for(lambda: coordinator.final(task_id), what="the final report")
    assert coordinator.statuses(task_id) == [Status.INPROGRESS, Status.COMPLETED]
    assert final.attempt == 4 and final.lease == 7 and final.exit_code == 0 and final.error == ""


def test_a_task_whose_start_is_refused_is_stopped(coordinator, worker, tmp_path):
    # The claim lets a worker run what it takes at once; a start the coordinator refuses (the task was
    # cancelled, or is no longer this worker's) stops the run.
    _, stub = worker()
    marker = tmp_path / "ran"
    task_id = str(uuid.uuid4())
    coordinator.deny_start.add(task_id)
    submit(stub, f"sleep 5; touch {marker}", task_id=task_id)
    final = wait_for(lambda: coordinator.final(task_id), timeout=4, what="the run to be stopped")
    assert final.status == Status.FAILED and final.error == START_REFUSED
    assert coordinator.statuses(task_id) == [Status.INPROGRESS, Status.FAILED]
    assert not marker.exists()
    submit(stub, "echo next")  # the slot came back


def test_reports_carry_when_the_command_started(coordinator, worker, tmp_path):
    _, stub = worker()
    before = time.time()
    task_id = submit(stub, gated(tmp_path / "go"))
    wait_for(lambda: Status.INPROGRESS in coordinator.statuses(task_id), what="the start report")
    running_at = time.time()  # the run is still going: it ends once the marker exists
    (tmp_path / "go").touch()
    final = wait_for(lambda: coordinator.final(task_id), what="the final report")
    start = next(r for r in coordinator.reports if r.task_id == task_id and r.status == Status.INPROGRESS)
    assert before <= start.started_at <= running_at
    assert final.started_at == start.started_at


def test_a_dispatch_that_arrives_after_its_deadline_never_runs(coordinator, worker, tmp_path):
    # The coordinator's rescue counts on it: a claim whose dispatch timed out is taken back once the
    # worker's heartbeats do not list it, so a late arrival must not start anything.
    service, stub = worker()
    marker = tmp_path / "ran"
    task_id = str(uuid.uuid4())
    service.signal(signal.SIGSTOP)  # the request waits in the socket until the deadline has passed
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitTask(distrack_pb2.TaskRequest(task_id=task_id, command=f"touch {marker}", attempt=1, lease=1),
                            timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        service.signal(signal.SIGCONT)
    heartbeats = len(coordinator.heartbeats)
    wait_for(lambda: len(coordinator.heartbeats) >= heartbeats + 2, what="two heartbeats after the resume")
    assert all(task_id not in h.unfinished_task_ids for h in coordinator.heartbeats)
    assert coordinator.statuses(task_id) == [] and not marker.exists()
    submit(stub, "echo next")  # and the slot is free


def test_a_dispatch_of_a_running_task_with_another_lease_is_refused(coordinator, worker):
    _, stub = worker(slots=2)
    task_id = submit(stub, "sleep 2", lease=1)
    assert submit(stub, "sleep 2", lease=1, task_id=task_id) == task_id  # the same dispatch again: fine
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, "sleep 2", lease=2, task_id=task_id)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_refuses_a_task_beyond_its_slots_with_resource_exhausted(coordinator, worker):
    _, stub = worker(slots=1)
    first = submit(stub, "sleep 1")
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, "echo second")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_for(lambda: coordinator.final(first), what="the first task to finish")
    submit(stub, "echo third")  # the slot is free again


def started_at(coordinator, task_id: str) -> float | None:
    with coordinator.lock:
        return next((r.started_at for r in coordinator.reports if r.task_id == task_id and r.started_at), None)


def test_a_prefetched_task_waits_for_a_slot_and_starts_as_it_frees(coordinator, worker, tmp_path):
    _, stub = worker(slots=1, prefetch=1)
    hb = wait_for(lambda: coordinator.heartbeats[-1], what="a heartbeat")
    assert (hb.slots, hb.prefetch) == (1, 1)
    first = submit(stub, "sleep 0.5")
    second = submit(stub, f"echo second > {tmp_path / 'second'}")  # taken, to wait for the slot
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, "echo third")  # the slot and the prefetch are full
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 task(s) wait for one" in info.value.details()
    final = wait_for(lambda: coordinator.final(second), what="the waiting task to run")
    assert final.status == Status.COMPLETED and final.started_at  # (its start report may have merged into it)
    # It started once the first had ended: never two commands at once on one slot.
    assert started_at(coordinator, second) >= started_at(coordinator, first) + 0.5
    assert coordinator.final(first).status == Status.COMPLETED


def test_a_task_waiting_behind_a_long_run_is_given_back_and_no_more_are_taken(coordinator, worker, tmp_path):
    _, stub = worker(slots=1, prefetch=1)
    marker = tmp_path / "ran"
    long_run = submit(stub, "sleep 4")
    waiting = submit(stub, f"touch {marker}")
    final = wait_for(lambda: coordinator.final(waiting), timeout=GIVE_BACK_S + 2, what="the waiting task back")
    assert final.status == Status.RETURNED and final.lease == 7 and not final.started_at
    assert coordinator.statuses(waiting) == [Status.RETURNED]
    # Its command has run for over LONG_RUN_S now: the worker takes nothing to wait behind it.
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, "echo next")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    hb = wait_for(lambda: coordinator.heartbeats[-1] if coordinator.heartbeats[-1].prefetch == 0 else None,
                  what="a heartbeat offering no prefetch")
    assert long_run in hb.running_task_ids
    assert not marker.exists() and coordinator.final(long_run) is None


def test_a_waiting_task_does_not_start_while_heartbeats_go_unanswered(coordinator, worker, tmp_path):
    # Cut off from its coordinator, a worker may be declared lost and its tasks rescued elsewhere: it
    # must not start the ones that wait for a slot, and gives them back once they have waited too long.
    _, stub = worker(slots=1, prefetch=1)
    wait_for(lambda: coordinator.heartbeats, what="a heartbeat")
    marker = tmp_path / "ran"
    first = submit(stub, "sleep 1")
    waiting = submit(stub, f"touch {marker}")
    coordinator.heartbeats_unanswered = True
    assert wait_for(lambda: coordinator.final(first), what="the first run's end").status == Status.COMPLETED
    final = wait_for(lambda: coordinator.final(waiting), timeout=GIVE_BACK_S + 2, what="the waiting task back")
    assert final.status == Status.RETURNED and not final.started_at
    assert coordinator.statuses(waiting) == [Status.RETURNED] and not marker.exists()


def test_a_waiting_task_starts_once_heartbeats_are_answered_again(coordinator, worker, tmp_path):
    _, stub = worker(slots=1, prefetch=1)
    wait_for(lambda: coordinator.heartbeats, what="a heartbeat")
    first = submit(stub, "sleep 1")
    waiting = submit(stub, f"echo waited > {tmp_path / 'waited'}")
    coordinator.heartbeats_unanswered = True
    wait_for(lambda: coordinator.final(first), what="the first run's end")
    assert coordinator.statuses(waiting) == []  # its slot is free, but the coordinator is silent
    coordinator.heartbeats_unanswered = False
    final = wait_for(lambda: coordinator.final(waiting), timeout=GIVE_BACK_S + 2, what="the waiting task's end")
    assert final.status == Status.COMPLETED and final.started_at


def test_a_cancelled_waiting_task_is_given_back_without_running(coordinator, worker, tmp_path):
    # Given back, it is unclaimed; with its cancel asked, the coordinator ends it cancelled (tested there).
    _, stub = worker(slots=1, prefetch=1)
    marker = tmp_path / "ran"
    first = submit(stub, "sleep 3")
    waiting = submit(stub, f"touch {marker}")
    assert stub.CancelTask(distrack_pb2.CancelTaskRequest(task_id=waiting), timeout=5).found
    final = wait_for(lambda: coordinator.final(waiting), timeout=1, what="the cancelled task back at once")
    assert final.status == Status.RETURNED and not final.started_at
    assert coordinator.statuses(waiting) == [Status.RETURNED]
    assert coordinator.final(first) is None and not marker.exists()
    submit(stub, "echo next")  # its place in line is free again


def test_a_task_given_back_and_sent_again_stays_listed_until_its_new_run_is_reported(coordinator, worker):
    # The report that gave it back is settled after the same task came again with a new lease: the
    # new run must still be listed as unfinished, or the coordinator would end it as lost.
    _, stub = worker(slots=1, prefetch=1)
    first = submit(stub, "sleep 5")
    wait_for(lambda: Status.INPROGRESS in coordinator.statuses(first), what="the first run's start report")
    task = submit(stub, "sleep 5", lease=7)
    coordinator.refuse_reports = 10**6  # the give-back report stays unsettled, and is retried
    coordinator.stop_task_ids.add(task)  # "no longer yours": it waits, so it goes back at once
    wait_for(lambda: coordinator.refused, what="the give-back report's first try")
    coordinator.stop_task_ids.clear()
    # Heartbeats go one after another: once a new one arrives, no answer saying "stop" is still pending.
    seen = len(coordinator.heartbeats)
    wait_for(lambda: len(coordinator.heartbeats) > seen, what="a heartbeat answered without the stop")
    submit(stub, "sleep 5", lease=8, task_id=task)  # sent again, to wait for the slot again
    coordinator.refuse_reports = 0
    returned = wait_for(lambda: coordinator.final(task), timeout=10, what="the give-back report delivered")
    assert returned.status == Status.RETURNED and returned.lease == 7
    settled = len(coordinator.heartbeats)
    hb = wait_for(lambda: coordinator.heartbeats[-1] if len(coordinator.heartbeats) > settled + 1 else None,
                  what="heartbeats after the report was settled")
    assert task in hb.unfinished_task_ids and task in hb.running_task_ids


@pytest.mark.parametrize("cancel", [False, True])
def test_a_run_a_heartbeat_says_to_stop_ends_with_why(coordinator, worker, tmp_path, cancel):
    # Cancelled, if its cancel was asked (the heartbeat's answer may bring it before CancelTask does);
    # else no longer this worker's.
    _, stub = worker()
    task = submit(stub, gated(tmp_path / "never"))
    wait_for(lambda: Status.INPROGRESS in coordinator.statuses(task), what="the start report")
    with coordinator.lock:
        coordinator.stop_task_ids.add(task)
        if cancel:
            coordinator.cancel_task_ids.add(task)
    final = wait_for(lambda: coordinator.final(task), timeout=10, what="the stopped run's report")
    assert final.status == Status.FAILED
    assert (final.error, final.cancelled) == (("cancelled", True) if cancel else (NOT_OWNER, False))


def test_a_stop_answered_late_spares_a_newer_run_of_the_same_task(coordinator, worker):
    # The heartbeat listed the task's run of lease 7; before its answer ("stop it") arrived, the task
    # came again with lease 8. The answer meant the run it was told about, not the new one.
    import threading

    _, stub = worker(slots=1)
    coordinator.refuse_reports = 10**6  # lease 7's report stays unsettled, so heartbeats list the task
    task = submit(stub, "true", lease=7)
    wait_for(lambda: coordinator.refused, what="lease 7's report tried")
    held, release = threading.Event(), threading.Event()
    with coordinator.lock:
        coordinator.stop_task_ids.add(task)
        coordinator.hold_next_answer = (held, release)
    assert held.wait(10), "no heartbeat came to hold"
    assert task in coordinator.heartbeats[-1].unfinished_task_ids
    submit(stub, "sleep 1", lease=8, task_id=task)
    with coordinator.lock:
        coordinator.stop_task_ids.clear()
        coordinator.refuse_reports = 0
    release.set()
    final = wait_for(lambda: (f := coordinator.final(task)) is not None and f.lease == 8 and f,
                     timeout=15, what="lease 8's final report")
    assert final.status == Status.COMPLETED and final.exit_code == 0, final


def test_a_batch_starts_what_finds_a_slot_and_the_rest_in_the_order_it_came(coordinator, worker, tmp_path):
    _, stub = worker(slots=2, prefetch=3)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    log = tmp_path / "order"
    batch = distrack_pb2.TaskBatch(tasks=[
        distrack_pb2.TaskRequest(task_id=t, command=f"echo {n} >> {log}; sleep 0.3", attempt=1, lease=7)
        for n, t in enumerate(ids)])
    reply = stub.SubmitTasks(batch, timeout=5)
    assert [r.accepted for r in reply.results] == [True] * 5
    finals = [wait_for(lambda t=t: coordinator.final(t), timeout=10, what="every task's end") for t in ids]
    assert all(f.status == Status.COMPLETED for f in finals)
    begun = sorted((started_at(coordinator, t), n) for n, t in enumerate(ids))
    # The two that found a slot, at once; then the waiting ones in the order they came, each once a
    # slot was free: 2 and 3 as 0 and 1 ended (together, so in either order), 4 only after one of them.
    assert [{n for _, n in begun[:2]}, {n for _, n in begun[2:4]}, begun[4][1]] == [{0, 1}, {2, 3}, 4]
    assert begun[2][0] >= begun[0][0] + 0.3 and begun[4][0] >= begun[2][0] + 0.3  # never three at once
    written = log.read_text().split()
    assert [set(written[:2]), set(written[2:4]), written[4]] == [{"0", "1"}, {"2", "3"}, "4"]


def test_a_waiting_task_that_cannot_start_frees_its_slot_for_the_next(coordinator, worker, tmp_path):
    _, stub = worker(slots=1, prefetch=2)
    worker_id = wait_for(lambda: coordinator.heartbeats[-1].worker_id, what="the worker's id")
    first = submit(stub, "sleep 0.5")
    broken = str(uuid.uuid4())
    (tmp_path / "out" / f"{worker_id}_{broken}.txt").mkdir(parents=True)  # its output file cannot be opened
    submit(stub, "echo never", task_id=broken)
    after = submit(stub, "echo after")
    failed = wait_for(lambda: coordinator.final(broken), timeout=5, what="the broken task's end")
    assert failed.status == Status.FAILED and failed.exit_code == 127 and "could not start" in failed.error
    assert wait_for(lambda: coordinator.final(after), timeout=5, what="the next one's end").status == Status.COMPLETED
    assert coordinator.final(first).status == Status.COMPLETED


def test_sigterm_gives_waiting_tasks_back_and_lets_the_running_one_finish(coordinator, worker, tmp_path):
    service, stub = worker(slots=1, prefetch=1)
    marker = tmp_path / "ran"
    running = submit(stub, "sleep 0.8")
    waiting = submit(stub, f"touch {marker}")
    service.signal(signal.SIGTERM)
    final = wait_for(lambda: coordinator.final(waiting), timeout=0.7, what="the waiting task back at once")
    assert final.status == Status.RETURNED
    assert service.proc.wait(20) == 0
    assert coordinator.final(running).status == Status.COMPLETED and not marker.exists()


def test_rejects_malformed_tasks(coordinator, worker):
    _, stub = worker()
    for request in (
        distrack_pb2.TaskRequest(task_id="nope", command="true"),
        distrack_pb2.TaskRequest(task_id=str(uuid.uuid4()), command=""),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitTask(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_timeout_kills_the_whole_process_group(coordinator, worker, tmp_path):
    _, stub = worker()
    marker = tmp_path / "grandchild-survived"
    # The grandchild would touch the marker after 2 s unless its process group is killed.
    task_id = submit(stub, f"(sleep 2; touch {marker}) & sleep 30", timeout_seconds=0.5)
    final = wait_for(lambda: coordinator.final(task_id), timeout=10, what="the timed-out report")
    assert final.status == Status.FAILED
    assert final.error == "timed out after 0.5 s"
    with pytest.raises(pytest.fail.Exception):
        wait_for(lambda: marker.exists(), timeout=2.5)


def test_reports_survive_a_coordinator_outage(coordinator, worker, tmp_path):
    _, stub = worker()
    coordinator.refuse_reports = 5  # the INPROGRESS report and then some: retried with backoff
    task_id = submit(stub, gated(tmp_path / "go"))
    wait_for(lambda: coordinator.refused, what="the start report sent and refused")
    (tmp_path / "go").touch()
    final = wait_for(lambda: coordinator.final(task_id), timeout=20, what="the report after the outage")
    assert final.status == Status.COMPLETED
    assert coordinator.refused == 5
    assert coordinator.statuses(task_id) == [Status.INPROGRESS, Status.COMPLETED]


def test_sigterm_lets_the_running_task_finish_and_report(coordinator, worker):
    service, stub = worker()
    task_id = submit(stub, "sleep 1; echo finished")
    wait_for(lambda: Status.INPROGRESS in coordinator.statuses(task_id), what="the task to start")
    service.signal(signal.SIGTERM)
    assert service.proc.wait(20) == 0
    final = coordinator.final(task_id)
    assert final is not None and final.status == Status.COMPLETED


def test_worker_address_env_is_what_it_advertises(coordinator, worker):
    worker(env_extra={"WORKER_ADDRESS": "worker-7.example"})
    assert any(h.address.startswith("worker-7.example:") for h in coordinator.heartbeats)


def test_a_worker_fails_over_to_the_next_coordinator(coordinator, tmp_path):
    # The first coordinator in its list is down: heartbeats and reports go to the second.
    import os

    from helpers import free_port

    dead_port = free_port()
    port = free_port()
    service = Service("failover-worker", [
        "worker", f"--worker_port=127.0.0.1:{port}",
        f"--coordinator=127.0.0.1:{dead_port},127.0.0.1:{coordinator.port}",
        f"--output_dir={tmp_path / 'out'}", f"--heartbeat_interval_s={TEST_HEARTBEAT_S}",
    ], dict(os.environ), tmp_path)
    try:
        wait_for(lambda: any(h.address.endswith(f":{port}") for h in coordinator.heartbeats), 20,
                 what="a heartbeat through the second coordinator")
        stub = distrack_pb2_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        task_id = submit(stub, "echo via-the-second")
        final = wait_for(lambda: coordinator.final(task_id), what="the report through the second coordinator")
        assert final.status == Status.COMPLETED
        assert "switching to" in service.log()
    finally:
        service.stop()


def test_sigterm_delivered_to_a_thread_other_than_the_main_one_still_stops_the_worker(coordinator, worker):
    # The kernel may hand a process-directed signal to any thread; the worker must stop all the same.
    import ctypes
    import os
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("tgkill's syscall number is x86_64's")
    service, _ = worker()
    pid = service.proc.pid
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, "the worker runs several threads"
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234  # x86_64
    assert libc.syscall(sys_tgkill, pid, others[-1], signal.SIGTERM) == 0, ctypes.get_errno()
    assert service.proc.wait(10) == 0


# A window of the outage and the fewest reconnect attempts in it. Bounded by the test heartbeat (0.2 s,
# +-20% jitter) a channel tries 16 times or more in 4 s; gRPC's default backoff (1, 1.6, 2.56 s... apart)
# tries 3 or 4 times.
OUTAGE_WINDOW_S = 4.0
MIN_RECONNECTS = 8


def test_a_worker_tries_to_reach_its_coordinator_about_once_a_heartbeat_through_an_outage(tmp_path):
    # A restarted coordinator waits one worker ttl before it declares silent workers lost (and reruns
    # their tasks). gRPC's own reconnect backoff grows to 2 minutes: after an outage of a few seconds a
    # worker would stay silent seconds past the coordinator's return, so the worker bounds it.
    import os

    from helpers import ConnectionCounter, free_port

    coordinator = RecordingCoordinator()
    server, coordinator_port = serve_in_test(distrack_pb2_grpc.add_CoordinatorServicer_to_server, coordinator)
    port = free_port()
    service = Service("outage-worker", [
        "worker", f"--worker_port=127.0.0.1:{port}", f"--coordinator=127.0.0.1:{coordinator_port}",
        f"--output_dir={tmp_path / 'out'}", f"--heartbeat_interval_s={TEST_HEARTBEAT_S}",
    ], dict(os.environ), tmp_path)
    try:
        wait_for(lambda: coordinator.heartbeats, 20, what="the worker's first heartbeat")
        server.stop(0).wait()
        with ConnectionCounter(coordinator_port) as down:
            window_ends = time.monotonic() + OUTAGE_WINDOW_S
            wait_for(lambda: time.monotonic() >= window_ends, OUTAGE_WINDOW_S + 5, what="the outage")
        assert down.count >= MIN_RECONNECTS, f"{down.count} connection attempts in {OUTAGE_WINDOW_S} s"
        back = RecordingCoordinator()
        server, _ = serve_in_test(distrack_pb2_grpc.add_CoordinatorServicer_to_server, back, port=coordinator_port)
        wait_for(lambda: back.heartbeats, 10, what="a heartbeat to the coordinator back")
    finally:
        service.stop()
        server.stop(0).wait()
