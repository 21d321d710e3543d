"""ReportBatcher against a real gRPC coordinator in the test: batching, and final reports that take the
place of start reports still waiting."""

import contextlib
import threading
import uuid
from collections.abc import Iterator

import pytest
from helpers import RecordingCoordinator, serve_in_test, wait_for

from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.worker.reporter import CoordinatorClient, ReportBatcher

Status = distrack_pb2.TaskStatus


class GatedCoordinator(RecordingCoordinator):
    """Holds each ReportTasks call until `gate` is set, so reports queue up behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.calls_seen = 0

    def ReportTasks(self, request, context):
        with self.lock:
            self.calls_seen += 1
        self.gate.wait(10)
        return super().ReportTasks(request, context)


@contextlib.contextmanager
def serving(*, open_gate: bool = False, max_batch: int = 1000) -> Iterator[tuple[GatedCoordinator, ReportBatcher]]:
    """A GatedCoordinator served over a real socket and a ReportBatcher that reports to it."""
    servicer = GatedCoordinator()
    if open_gate:
        servicer.gate.set()
    server, port = serve_in_test(distrack_pb2_grpc.add_CoordinatorServicer_to_server, servicer)
    stop = threading.Event()
    client = CoordinatorClient([f"127.0.0.1:{port}"], report_retry_s=5.0, stop=stop)
    batcher = ReportBatcher(client, max_batch=max_batch).start()
    try:
        yield servicer, batcher
    finally:
        servicer.gate.set()
        stop.set()
        batcher.close(5)
        client.close()
        server.stop(0).wait()


@pytest.fixture
def gated():
    with serving() as served:
        yield served


def update(task_id: str, status: int, lease: int = 1, started_at: float = 0.0) -> distrack_pb2.TaskStatusUpdate:
    return distrack_pb2.TaskStatusUpdate(task_id=task_id, worker_id="w1", status=status, lease=lease, attempt=1,
                                         started_at=started_at)


def sent(coordinator: RecordingCoordinator) -> list[tuple[str, int]]:
    with coordinator.lock:
        return [(u.task_id, u.status) for u in coordinator.reports]


def test_a_final_report_takes_the_place_of_its_start_report_still_waiting(gated):
    coordinator, batcher = gated
    busy, task, other = (str(uuid.uuid4()) for _ in range(3))
    [in_flight] = batcher.submit([update(busy, Status.INPROGRESS)])
    wait_for(lambda: coordinator.calls_seen == 1, what="the first call to be under way")
    [start] = batcher.submit([update(task, Status.INPROGRESS, lease=3, started_at=100.0)])
    [other_start] = batcher.submit([update(other, Status.INPROGRESS)])
    [stale_final] = batcher.submit([update(other, Status.COMPLETED, lease=2)])  # another lease: no match
    [final] = batcher.submit([update(task, Status.COMPLETED, lease=3, started_at=100.0)])
    coordinator.gate.set()
    assert (in_flight.result(5), final.result(5), start.result(5)) == (True, True, True)
    assert other_start.result(5) is True and stale_final.result(5) is True
    assert sent(coordinator) == [(busy, Status.INPROGRESS), (other, Status.INPROGRESS), (other, Status.COMPLETED),
                                 (task, Status.COMPLETED)]
    assert coordinator.final(task).started_at == 100.0


def test_a_start_report_already_sent_is_not_taken_back(gated):
    coordinator, batcher = gated
    task = str(uuid.uuid4())
    [start] = batcher.submit([update(task, Status.INPROGRESS)])
    wait_for(lambda: coordinator.calls_seen == 1, what="the start report's call")
    [final] = batcher.submit([update(task, Status.FAILED)])
    coordinator.gate.set()
    assert (start.result(5), final.result(5)) == (True, True)
    assert sent(coordinator) == [(task, Status.INPROGRESS), (task, Status.FAILED)]


def test_a_replaced_start_gets_the_answer_of_the_final_report(gated):
    coordinator, batcher = gated
    busy, task = str(uuid.uuid4()), str(uuid.uuid4())
    batcher.submit([update(busy, Status.INPROGRESS)])
    wait_for(lambda: coordinator.calls_seen == 1, what="the first call to be under way")
    coordinator.refuse_reports = 1  # the call under way fails (database down) and is retried
    [start] = batcher.submit([update(task, Status.INPROGRESS)])
    [final] = batcher.submit([update(task, Status.COMPLETED)])
    coordinator.gate.set()
    assert (final.result(10), start.result(10)) == (True, True)
    assert coordinator.refused == 1
    assert sent(coordinator)[-1] == (task, Status.COMPLETED)


def test_under_load_reports_wait_for_more_and_a_full_batch_goes_at_once(monkeypatch):
    import distrack.worker.reporter as reporter

    # A linger far longer than the test's deadlines: only a full batch can send these in time.
    monkeypatch.setattr(reporter, "REPORT_BUSY_WINDOW_S", 60.0)
    monkeypatch.setattr(reporter, "REPORT_LINGER_S", 30.0)
    with serving(open_gate=True, max_batch=2) as (coordinator, batcher):
        first, also_first, second, third = (str(uuid.uuid4()) for _ in range(4))
        # Idle: no wait (the two go in one call, as they were queued together).
        sent_at_once = batcher.submit([update(first, Status.COMPLETED), update(also_first, Status.COMPLETED)])
        assert [f.result(5) for f in sent_at_once] == [True, True]
        [waits] = batcher.submit([update(second, Status.COMPLETED)])  # just after a call of several: it waits
        # With a report queued, the sending thread waits on its condition only in the linger.
        wait_for(lambda: batcher._cond._waiters, what="the sending thread to linger")
        [fills] = batcher.submit([update(third, Status.COMPLETED)])  # the batch is full: both go
        assert (waits.result(5), fills.result(5)) == (True, True)
        assert coordinator.calls_seen == 2
        assert sent(coordinator) == [(first, Status.COMPLETED), (also_first, Status.COMPLETED),
                                     (second, Status.COMPLETED), (third, Status.COMPLETED)]


def test_a_report_just_after_a_lone_one_goes_at_once(monkeypatch):
    import distrack.worker.reporter as reporter

    # At a moderate rate a task's end follows its start report alone: waiting would gather nothing.
    monkeypatch.setattr(reporter, "REPORT_BUSY_WINDOW_S", 60.0)
    monkeypatch.setattr(reporter, "REPORT_LINGER_S", 30.0)
    with serving(open_gate=True) as (coordinator, batcher):
        task = str(uuid.uuid4())
        [start] = batcher.submit([update(task, Status.INPROGRESS)])
        assert start.result(5) is True
        [end] = batcher.submit([update(task, Status.COMPLETED)])
        assert end.result(5) is True  # not after the 30 s linger
        assert coordinator.calls_seen == 2
