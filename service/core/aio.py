"""Small asyncio helpers the core and the servicer share."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["first_of", "stopped", "to_the_end"]

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
