"""Thread pools that say how busy they are.

The embedded engines (llama.cpp, Piper, Whisper, Silero VAD) and the codecs run their blocking work
on threads. A :class:`WorkPool` is a :class:`~concurrent.futures.ThreadPoolExecutor` that counts the
threads running a job right now, and every pool made is listed by :func:`pools`, so that the metrics
can report ``parley_worker_threads_busy{pool}`` (now) and ``parley_worker_busy_seconds_total{pool}``
(its rate: threads busy on average) beside each pool's size: a pool whose threads are all busy is
where turns queue.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["WorkPool", "pools"]

P = ParamSpec("P")
T = TypeVar("T")

_POOLS: weakref.WeakSet[WorkPool] = weakref.WeakSet()
_POOLS_LOCK = threading.Lock()


class WorkPool(ThreadPoolExecutor):
    """A thread pool named ``name`` (its threads are named after it) that counts its busy threads."""

    def __init__(self, name: str, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=name)
        self.name = name
        self.size = max_workers
        self._busy = 0
        self._busy_s = 0.0
        self._lock = threading.Lock()
        with _POOLS_LOCK:
            _POOLS.add(self)

    @property
    def busy(self) -> int:
        """Threads running a job now."""
        return self._busy

    @property
    def busy_s(self) -> float:
        """Thread-seconds spent on jobs that ended (its rate is how many threads were busy on average)."""
        return self._busy_s

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        def counted() -> T:
            with self._lock:
                self._busy += 1
            began = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._busy_s += time.monotonic() - began

        return super().submit(counted)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        with _POOLS_LOCK:
            _POOLS.discard(self)  # (after its last jobs, when waited for: they stay counted until done)


def pools() -> list[WorkPool]:
    """The pools in use (not shut down), by name."""
    with _POOLS_LOCK:
        found: list[Any] = list(_POOLS)
    return sorted(found, key=lambda pool: pool.name)
