"""Small asyncio helpers the core and the servicer share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["discard_outcome", "drop_tracebacks", "first_of", "stopped", "to_the_end"]

log = logging.getLogger(__name__)

CANCEL_AGAIN_S = 0.1
"""How long a cancelled task may take to end before it is cancelled again (see :func:`stopped`)."""


async def first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Return once any of ``events`` is set, or after ``timeout_s``. Safe to cancel."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (then re-raise that), for
    clean-ups that must finish: a session's history written, its claim let go."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def stopped(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and return once it has ended.

    On Python 3.11 a cancellation can be lost: ``asyncio.wait_for`` returns the result instead of
    raising when the cancellation arrives as what it awaits completes (CPython gh-86296, fixed in
    3.12), and redis-py sends every command through it. A loop that lost its cancellation goes on to
    wait for its next piece of work, for ever; so a task still running a moment after its
    cancellation is cancelled again, until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_S)


def drop_tracebacks(error: BaseException) -> None:
    """Drop the traceback of ``error`` and of the exceptions it came from (its cause, its context, a
    group's members), once it has been logged and only what it says is still needed.

    A traceback keeps its frames and their local variables, and one of them often holds the exception
    (``except ... as error``), or a task that holds it: a reference cycle, with everything those frames
    held (a turn, its session), that only the garbage collector frees, in collections of its older
    generations that hold the event loop for tens of milliseconds once hundreds of streams leave such
    cycles."""
    seen: set[int] = set()
    waiting: list[BaseException | None] = [error]
    while waiting:
        exception = waiting.pop()
        if exception is None or id(exception) in seen:
            continue
        seen.add(id(exception))
        exception.__traceback__ = None
        waiting += [exception.__cause__, exception.__context__]
        if exception.__suppress_context__:  # (``raise ... from``: never shown; it may hold this one, in a group)
            exception.__context__ = None
        if isinstance(exception, BaseExceptionGroup):
            waiting += exception.exceptions


def discard_outcome(task: asyncio.Task[Any]) -> None:
    """Take a finished task's outcome and drop it, when nothing needs it: it was cancelled, or it
    failed in a way its owner does not handle (logged here, as asyncio would have once the task was
    freed). A cancelled or failed task keeps its exception, whose traceback's frames often hold the
    task or what holds it: see :func:`drop_tracebacks`. (Taking a cancelled task's outcome also makes
    it let go of its cancellation.)"""
    assert task.done(), f"{task.get_name()} is still running"
    try:
        task.result()
    except asyncio.CancelledError as cancelled:
        drop_tracebacks(cancelled)
    except BaseException as error:
        log.error("task %s failed", task.get_name(), exc_info=error)
        drop_tracebacks(error)
