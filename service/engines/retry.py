"""Retrying a provider stream before its first item, and noticing a stream that stalls.

A provider request that fails with a retryable error (429, 5xx, a lost connection, a stall) is tried
again with exponential backoff and jitter, waiting at least what its Retry-After asked, a bounded
number of times, but only while nothing of it has been yielded: once text or audio went out, a retry
would repeat it, so the error ends the turn instead. Each retry is counted by engine
(:func:`retries`, exported as ``parley_engine_retries_total{engine}``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from service.errors import EngineError

__all__ = ["RetryPolicy", "retries", "retrying", "stall_guard"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRIES: collections.Counter[str] = collections.Counter()


def retries() -> dict[str, int]:
    """Retries so far in this process, by engine (``llm``, ``tts``, ``stt``)."""
    return dict(_RETRIES)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry."""

    attempts: int = 3
    """Tries in all, the first one included."""
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    """Longest wait between tries; a provider asking for more (Retry-After) is not retried."""

    def delay_s(self, failures: int, retry_after_s: float | None) -> float | None:
        """The wait before the next try after ``failures`` failures, or None to give up."""
        if failures >= self.attempts:
            return None
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        if retry_after_s is None:
            return backoff
        if retry_after_s > self.max_delay_s:
            return None
        return max(retry_after_s, backoff)


async def retrying(
    open_stream: Callable[[], AsyncGenerator[T, None]], policy: RetryPolicy, what: str, engine: str
) -> AsyncGenerator[T, None]:
    """Yield ``open_stream()``'s items, opening it again after a retryable error that came before its
    first item (counted as a retry of ``engine``). Safe to cancel; each attempt's stream is closed
    before the next begins."""
    failures = 0
    while True:
        started = False
        try:
            async with contextlib.aclosing(open_stream()) as stream:
                async for item in stream:
                    started = True
                    yield item
            return
        except EngineError as error:
            failures += 1
            delay = None if started or not error.retryable else policy.delay_s(failures, error.retry_after_s)
            if delay is None:
                if error.retryable and not started and failures > 1:
                    raise type(error)(
                        f"{error} (gave up after {failures} tries)",
                        retryable=True,  # (still: the provider may recover; the client may try later)
                        retry_after_s=error.retry_after_s,
                        for_logs=f"{error.for_logs} (gave up after {failures} tries)",
                    ) from error
                raise
            log.warning(
                "%s failed (%s); try %d of %d in %.2f s", what, error.for_logs, failures + 1, policy.attempts, delay
            )
            await asyncio.sleep(delay)
            _RETRIES[engine] += 1  # (after the wait: a turn cancelled meanwhile retried nothing)


async def stall_guard(
    stream: AsyncIterator[T], seconds: float, on_stall: Callable[[], EngineError]
) -> AsyncGenerator[T, None]:
    """Yield ``stream``'s items; raise ``on_stall()`` when the next one takes longer than ``seconds``."""
    iterator = aiter(stream)
    while True:
        try:
            async with asyncio.timeout(seconds):
                item = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise on_stall() from None
        yield item
