"""CoordinatorClient: a worker's calls to its coordinators (heartbeats, status reports, leaving).

A worker may be given several coordinators: it talks to one and moves to the next when that one is
unreachable (any coordinator can serve any worker: the registry is shared through PostgreSQL), so
losing a coordinator does not make its workers look lost to the others. Reports are retried with
backoff (tenacity) for as long as the worker runs, so an outage loses no report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential_jitter,
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


# Unreachable rather than refusing: worth trying another coordinator.
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class CoordinatorClient:
    def __init__(self, targets: Sequence[str], *, report_retry_s: float, stop: threading.Event,
                 security: TransportSecurity | None = None) -> None:
        if not targets:
            raise ValueError("at least one coordinator is needed")
        self.targets = list(targets)
        self.report_retry_s = report_retry_s
        self._stop = stop
        self._lock = threading.Lock()
        self._current = 0
        self._channels = [client_channel(t, security or TransportSecurity()) for t in self.targets]
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

    def report(self, update: distrack_pb2.TaskStatusUpdate) -> bool:
        """Sends one status report, retrying transient failures; returns whether it was recorded."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(initial=0.05, max=5.0),
            # Until the worker stops for good (it keeps reporting through its shutdown grace).
            stop=stop_after_delay(self.report_retry_s) | stop_when_event_set(self._stop),
            sleep=self._stop.wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        ack = retrying(self._call, "UpdateTaskStatus", update, REPORT_TIMEOUT_S)
        return ack.recorded

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
