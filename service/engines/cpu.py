"""The cores the embedded engines share: speech a listener is waiting for goes first.

llama.cpp and onnxruntime each spread their work over every core. When both run at once (the LLM
writing the rest of a reply while Piper speaks its first segment) they slow each other down: on a
2-core machine Piper took 2 to 3 times as long for a short first segment while the LLM generated.
The listener waits for that first segment in silence, while the LLM is far ahead of the speech; so
while an urgent synthesis runs, the local LLM waits between tokens (for at most ``max_wait_s``, so
that a stuck synthesis cannot stall every reply).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["CpuShare"]


class CpuShare:
    """Thread-safe: engines call it from their worker threads."""

    def __init__(self, max_wait_s: float = 1.0) -> None:
        self._max_wait_s = max_wait_s
        self._urgent = 0
        self._idle = threading.Condition()
        self.waited_s = 0.0
        """Total time the LLM waited (for tests and benchmarks)."""

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """Work a listener waits for: the background work pauses while it runs."""
        with self._idle:
            self._urgent += 1
        try:
            yield
        finally:
            with self._idle:
                self._urgent -= 1
                if self._urgent == 0:
                    self._idle.notify_all()

    def yield_to_urgent(self) -> None:
        """Called by background work between steps: wait while urgent work runs (bounded)."""
        if not self._urgent:  # the common case takes no lock
            return
        began = time.monotonic()
        with self._idle:
            self._idle.wait_for(lambda: self._urgent == 0, timeout=self._max_wait_s)
        self.waited_s += time.monotonic() - began
