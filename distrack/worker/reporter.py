"""A worker's calls to its coordinators: CoordinatorClient (heartbeats, status reports, leaving) and
ReportBatcher (status reports queued by the tasks, sent together).

A worker may be given several coordinators: it talks to one and moves to the next when that one is
unreachable (any coordinator can serve any worker: the registry is shared through PostgreSQL), so
losing a coordinator does not make its workers look lost to the others. Reports are retried with
backoff (tenacity) for as long as the worker runs, so an outage loses no report.

Reports go in batches: one thread sends whatever is queued in one ReportTasks call, so a burst of
starts or ends costs one call and one write per kind instead of one each; a report queued while a
call is under way goes with the next one. A final report queued while the same attempt's start report
still waits takes its place: the final one carries the start time, and is recorded as start and end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)

from distrack.rpc import distrack_pb2, distrack_pb2_grpc
from distrack.transport import TransportSecurity, client_channel

log = logging.getLogger(__name__)

# Worth retrying: the coordinator is down or restarting, or its database is.
TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
REPORT_TIMEOUT_S = 5.0
DEREGISTER_TIMEOUT_S = 5.0


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in TRANSIENT_CODES


# Batching under load: after a call that carried several reports less than REPORT_BUSY_WINDOW_S ago,
# the next waits up to REPORT_LINGER_S for more. Each ReportTasks call costs the coordinator a gRPC
# call and a statement, the worker a call, and PostgreSQL a transaction, whatever it carries (with 3
# workers at about 500 short tasks a second, 5 ms gathered about 8 reports a call, 20 ms about 11,
# for 0.24-0.37 ms less machine CPU per task in three A/B rounds). No pickup waits for a report (a
# task's start time is taken on the worker), so the wait only records a start or an end up to
# REPORT_LINGER_S later, and only while calls carry several reports.
REPORT_BUSY_WINDOW_S = 0.05
REPORT_LINGER_S = 0.02

# Unreachable rather than refusing: worth trying another coordinator.
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class CoordinatorClient:
    def __init__(self, targets: Sequence[str], *, report_retry_s: float, stop: threading.Event,
                 security: TransportSecurity | None = None, reconnect_s: float | None = None) -> None:
        """`reconnect_s`: the longest a lost connection to a coordinator waits before the next try (the
        heartbeat interval, so a coordinator back from an outage hears from the worker well within its
        ttl)."""
        if not targets:
            raise ValueError("at least one coordinator is needed")
        self.targets = list(targets)
        self.report_retry_s = report_retry_s
        self._stop = stop
        self._lock = threading.Lock()
        self._current = 0
        self._channels = [client_channel(t, security or TransportSecurity(), reconnect_s=reconnect_s)
                          for t in self.targets]
        self._stubs = [distrack_pb2_grpc.CoordinatorStub(c) for c in self._channels]

    @property
    def target(self) -> str:
        """The coordinator in use now."""
        with self._lock:
            return self.targets[self._current]

    def _call(self, method: str, request: object, timeout_s: float) -> object:
        """Calls the coordinator in use; if it is unreachable, the next one becomes the one in use."""
        with self._lock:
            index = self._current
        try:
            return getattr(self._stubs[index], method)(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in FAILOVER_CODES and len(self.targets) > 1:
                with self._lock:
                    if self._current == index:
                        self._current = (index + 1) % len(self.targets)
                        log.warning("coordinator %s unreachable (%s); switching to %s", self.targets[index],
                                    exc.code().name, self.targets[self._current])
            raise

    def heartbeat(self, request: distrack_pb2.HeartbeatRequest, timeout_s: float) -> distrack_pb2.HeartbeatResponse:
        """One heartbeat, trying each coordinator once (starting with the one in use)."""
        for remaining in range(len(self.targets) - 1, -1, -1):
            try:
                return self._call("Heartbeat", request, timeout_s)
            except grpc.RpcError as exc:
                if remaining == 0 or exc.code() not in FAILOVER_CODES:
                    raise
        raise AssertionError("unreachable")

    def report_many(self, updates: Sequence[distrack_pb2.TaskStatusUpdate]) -> list[distrack_pb2.TaskStatusAck]:
        """Sends reports in one call, retrying transient failures; one ack per update, in order."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            # Full jitter (uniform up to 0.1 s, doubling to at most 5 s): workers cut off by the same
            # outage do not all retry together once it ends.
            wait=wait_random_exponential(multiplier=0.1, max=5.0),
            # Until the worker stops for good (it keeps reporting through its shutdown grace).
            stop=stop_after_delay(self.report_retry_s) | stop_when_event_set(self._stop),
            sleep=self._stop.wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        request = distrack_pb2.TaskStatusReports(updates=updates)
        reply = retrying(self._call, "ReportTasks", request, REPORT_TIMEOUT_S)
        if len(reply.acks) != len(updates):
            raise ValueError(f"the coordinator answered {len(reply.acks)} of {len(updates)} reports")
        return list(reply.acks)

    def deregister(self, worker_id: str) -> None:
        try:
            self._call("Deregister", distrack_pb2.DeregisterRequest(worker_id=worker_id), DEREGISTER_TIMEOUT_S)
        except grpc.RpcError as exc:
            # Not fatal: without it the coordinator notices the silence after its ttl.
            log.warning("could not deregister from %s: %s", self.target, exc.code().name)

    @staticmethod
    def _log_retry(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
        exc = state.outcome.exception() if state.outcome else None
        code = exc.code().name if isinstance(exc, grpc.RpcError) else exc
        log.warning("status report not delivered (%s); retry %d", code, state.attempt_number)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


Entry = tuple[distrack_pb2.TaskStatusUpdate, Future]


class ReportBatcher:
    """Queues status reports and sends them in batches from one thread.

    `submit` returns a Future per report: True when recorded, False when refused as stale, None when it
    could not be delivered (the coordinator stayed away until the worker stopped, or refused it). A start
    report overtaken by its final report (see the module docstring) gets the final report's answer.
    """

    def __init__(self, client: CoordinatorClient, *, max_batch: int = 1000) -> None:
        self.client = client
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[Entry] = []
        # Start reports still queued, by (task id, lease): a final report may take their place.
        self._unsent_starts: dict[tuple[str, int], Entry] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reports", daemon=True)
        self.sent = 0  # reports and the calls they took, logged at shutdown
        self.calls = 0

    def start(self) -> ReportBatcher:
        self._thread.start()
        return self

    def submit(self, updates: Sequence[distrack_pb2.TaskStatusUpdate]) -> list[Future]:
        futures = [Future() for _ in updates]
        with self._cond:
            if self._closed:
                raise RuntimeError("the report queue is closed")
            was_empty = not self._queue
            for entry in zip(updates, futures, strict=True):
                update = entry[0]
                key = (update.task_id, update.lease)
                if update.status == distrack_pb2.INPROGRESS:
                    self._unsent_starts[key] = entry
                elif (start := self._unsent_starts.pop(key, None)) is not None:
                    self._queue.remove(start)
                    entry[1].add_done_callback(lambda final, start=start[1]: _pass_result(final, start))
                self._queue.append(entry)
            # The sending thread waits for a first report, then (lingering) for a full batch: a
            # wake-up for every report in between would cost a thread switch each, for nothing.
            if was_empty or len(self._queue) >= self.max_batch:
                self._cond.notify()
        return futures

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops after the batch under way (stop the client's retries first); what is left gets None."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            left, self._queue = self._queue, []
            self._unsent_starts.clear()
        for _, future in left:
            future.set_result(None)

    def _run(self) -> None:
        last_call = 0.0
        last_size = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                # Busy: the last call was recent and carried several reports. A lone report after a
                # lone one (a task's end just after its start, at a moderate rate) goes at once: the
                # wait would delay it and gather nothing.
                if last_size > 1 and time.monotonic() - last_call < REPORT_BUSY_WINDOW_S:
                    self._cond.wait_for(lambda: len(self._queue) >= self.max_batch or self._closed,
                                        REPORT_LINGER_S)
                if self._closed:
                    return
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                for update, _ in batch:
                    if update.status == distrack_pb2.INPROGRESS:
                        self._unsent_starts.pop((update.task_id, update.lease), None)
            self._send(batch)
            last_call, last_size = time.monotonic(), len(batch)

    def _send(self, batch: list[tuple[distrack_pb2.TaskStatusUpdate, Future]]) -> None:
        try:
            acks = self.client.report_many([update for update, _ in batch])
        except (grpc.RpcError, ValueError) as exc:  # ValueError: the channel was closed at shutdown
            code = exc.code().name if isinstance(exc, grpc.RpcError) else exc
            log.error("gave up sending %d status report(s): %s", len(batch), code)
            for _, future in batch:
                future.set_result(None)
            return
        except BaseException as exc:
            for _, future in batch:
                future.set_exception(exc)
            raise
        self.sent += len(batch)
        self.calls += 1
        for (update, future), ack in zip(batch, acks, strict=True):
            if ack.error:
                log.error("coordinator rejected the report for %s: %s", update.task_id, ack.error)
            future.set_result(None if ack.error else ack.recorded)


def _pass_result(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
