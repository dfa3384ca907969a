"""Run a blocking iterator (an embedded model's generator) in a worker thread, as an async iterator.

The event loop never blocks on inference. Closing the async iterator (or cancelling its consumer)
sets a stop flag the worker checks between items, then the blocking iterator is closed in its own
thread, so the model stops generating instead of running on unseen.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

__all__ = ["iterate_in_thread"]

T = TypeVar("T")

_ITEM, _ERROR, _DONE = range(3)


async def iterate_in_thread(executor: Executor, make: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
    """Yield what ``make()``'s iterator yields, running it on ``executor``.

    Safe to cancel: the worker stops before its next item. Exceptions from the iterator are re-raised
    here unchanged.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    stop = threading.Event()

    def send(kind: int, value: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed while we were working: nobody is listening
            stop.set()

    def work() -> None:
        try:
            if stop.is_set():
                return
            iterator = make()
            try:
                for item in iterator:
                    if stop.is_set():
                        break
                    send(_ITEM, item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as error:  # handed to the consumer, which re-raises it
            send(_ERROR, error)
        finally:
            send(_DONE, None)

    loop.run_in_executor(executor, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                assert isinstance(value, BaseException)
                raise value
            yield value  # type: ignore[misc]
    finally:
        stop.set()
