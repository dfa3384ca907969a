"""The small asyncio helpers: a task stopped for sure, even when Python 3.11 loses a cancellation."""

from __future__ import annotations

import asyncio
import sys

from service.core.aio import stopped


async def test_a_task_that_lost_its_cancellation_is_stopped_all_the_same() -> None:
    # Python 3.11's asyncio.wait_for (redis-py sends each command through it) returns its result
    # instead of raising when the cancellation arrives as what it awaits completes: the loop goes on
    # to wait for its next piece of work. Before, closing a Redis store could then wait for ever.
    done = asyncio.get_running_loop().create_future()
    lost: list[bool] = []

    async def loop() -> None:
        await asyncio.wait_for(done, 5)
        lost.append(True)  # the cancellation was lost: on to the next wait
        await asyncio.Event().wait()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    done.set_result(None)
    async with asyncio.timeout(5):
        await stopped(task)
    assert task.cancelled()
    assert lost == ([True] if sys.version_info < (3, 12) else [])  # (3.12 loses none)


async def test_a_stopped_task_finishes_its_clean_up() -> None:
    cleaned: list[bool] = []

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # a short clean-up is not cancelled again
            cleaned.append(True)

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    await stopped(task)
    assert task.cancelled() and cleaned == [True]
    await stopped(task)  # (stopping an ended task is a no-op)
