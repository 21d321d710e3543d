"""What a client asks for when it schedules a task: shared by the API's parsing and the store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    command: str
    delay_seconds: float = 0.0
    max_attempts: int = 1
    timeout_seconds: float | None = None
