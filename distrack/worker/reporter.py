"""CoordinatorClient: a worker's calls to its coordinator (heartbeats, status reports, leaving).

Reports are retried with backoff (tenacity) for as long as the worker runs, while the coordinator is
unreachable or its database is down, so an outage loses no report.
"""

from __future__ import annotations

import logging
import threading

import grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential_jitter,
)

from distrack.rpc import distrack_pb2, distrack_pb2_grpc

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


class CoordinatorClient:
    def __init__(self, target: str, *, report_retry_s: float, stop: threading.Event) -> None:
        self.target = target
        self.report_retry_s = report_retry_s
        self._stop = stop
        self._channel = grpc.insecure_channel(target)
        self._stub = distrack_pb2_grpc.CoordinatorStub(self._channel)

    def heartbeat(self, request: distrack_pb2.HeartbeatRequest, timeout_s: float) -> distrack_pb2.HeartbeatResponse:
        return self._stub.Heartbeat(request, timeout=timeout_s)

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
        ack = retrying(self._stub.UpdateTaskStatus, update, timeout=REPORT_TIMEOUT_S)
        return ack.recorded

    def deregister(self, worker_id: str) -> None:
        try:
            self._stub.Deregister(distrack_pb2.DeregisterRequest(worker_id=worker_id), timeout=DEREGISTER_TIMEOUT_S)
        except grpc.RpcError as exc:
            # Not fatal: without it the coordinator notices the silence after its ttl.
            log.warning("could not deregister from %s: %s", self.target, exc.code().name)

    @staticmethod
    def _log_retry(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
        exc = state.outcome.exception() if state.outcome else None
        code = exc.code().name if isinstance(exc, grpc.RpcError) else exc
        log.warning("status report not delivered (%s); retry %d", code, state.attempt_number)

    def close(self) -> None:
        self._channel.close()
