"""CoordinatorClient: a worker's calls to its coordinator (heartbeats and status reports).

Reports are retried with backoff (tenacity) while the coordinator is unreachable or its database is
down, so a short outage loses no report.
"""

from __future__ import annotations

import logging
import threading

import grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
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


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in TRANSIENT_CODES


class CoordinatorClient:
    def __init__(self, target: str, *, report_retry_s: float, stop: threading.Event) -> None:
        self.target = target
        self.report_retry_s = report_retry_s
        self._stop = stop
        self._channel = grpc.insecure_channel(target)
        self._stub = distrack_pb2_grpc.CoordinatorStub(self._channel)

    def heartbeat(self, request: distrack_pb2.HeartbeatRequest, timeout_s: float) -> None:
        self._stub.Heartbeat(request, timeout=timeout_s)

    def report(self, update: distrack_pb2.TaskStatusUpdate) -> bool:
        """Sends one status report, retrying transient failures; returns whether it was recorded."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(initial=0.05, max=5.0),
            stop=stop_after_delay(self.report_retry_s),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        ack = retrying(self._stub.UpdateTaskStatus, update, timeout=REPORT_TIMEOUT_S)
        return ack.recorded

    def _sleep(self, seconds: float) -> None:
        # A stop during a retry wait still sends the report once more right away.
        self._stop.wait(seconds)

    @staticmethod
    def _log_retry(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
        exc = state.outcome.exception() if state.outcome else None
        code = exc.code().name if isinstance(exc, grpc.RpcError) else exc
        log.warning("status report not delivered (%s); retry %d", code, state.attempt_number)

    def close(self) -> None:
        self._channel.close()
