"""One self-overwriting progress line on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

# At most this many redraws per second: enough to look alive, too few to cost the load generator.
PROGRESS_MIN_GAP_S = 0.1
BAR_WIDTH = 24


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#######.................]  30/100`: `done` of `total`, clamped to the bar's ends."""
    filled = 0 if total <= 0 else min(width, max(0, done * width // total))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total}"


class Progress:
    """`update(text)` redraws the line, at most every PROGRESS_MIN_GAP_S; `clear()` wipes it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._enabled = self._stream.isatty()
        self._last = 0.0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def update(self, text: str, *, force: bool = False) -> None:
        if not self._enabled:
            return
        with self._lock:
            now = time.monotonic()
            if force or now - self._last >= PROGRESS_MIN_GAP_S:
                self._last = now
                self._stream.write(f"\r\x1b[K{text}")
                self._stream.flush()

    def step(self, label: str, done: int, total: int) -> None:
        """A bar for `done` of `total`, labelled. Cheap when there is nothing to draw: hot loops call it."""
        if not self._enabled or (done < total and time.monotonic() - self._last < PROGRESS_MIN_GAP_S):
            return
        self.update(f"{label} {bar(done, total)}", force=True)

    def elapsed(self, label: str, elapsed_s: float, total_s: float) -> None:
        """A bar for a timed phase: `label [####....] 1.2/3.0 s`."""
        if not self._enabled or time.monotonic() - self._last < PROGRESS_MIN_GAP_S:
            return
        filled = min(BAR_WIDTH, max(0, int(elapsed_s * BAR_WIDTH / total_s))) if total_s > 0 else 0
        self.update(f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {elapsed_s:.1f}/{total_s:.1f} s")

    def clear(self) -> None:
        if self._enabled:
            with self._lock:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
