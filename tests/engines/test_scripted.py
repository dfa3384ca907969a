"""The scripted engines keep their schedule: the benchmarks' ideal first audio is computed from it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import time
import weakref
from collections.abc import Callable, Coroutine

import pytest
import uvloop

from service.core.engine import LLMRequest, Message
from service.engines import scripted
from service.engines.scripted import PROFILES, ScriptedLLM, ScriptedTTS, reply_for, tokens_of

QUICK = PROFILES["quick"]


async def test_the_llm_streams_the_script_on_schedule() -> None:
    request = LLMRequest((Message("user", "What is the capital of France?"),), 0.7, 1000)
    began = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    async for token in ScriptedLLM(QUICK, "quick").stream(request):
        if isinstance(token, str):
            arrivals.append((time.monotonic() - began, token))
    tokens = tokens_of(reply_for("What is the capital of France?"))
    assert [token for _, token in arrivals] == tokens
    assert arrivals[0][0] >= QUICK.first_token_s
    last_due = QUICK.first_token_s + (len(tokens) - 1) / QUICK.tokens_per_s
    assert last_due <= arrivals[-1][0] < last_due + 0.05  # on schedule, with no drift added per token


async def test_the_tts_makes_its_audio_in_chunks_on_schedule() -> None:
    # A chunk every 40 ms, so that the reader keeps up even on a busy machine: the quick profile makes
    # one every 1.2 ms, and a reader 2 ms late rightly got two at once (then this test failed).
    profile = dataclasses.replace(QUICK, tts_real_time_factor=1.0)
    tts = ScriptedTTS(profile)
    text = "Hello there."
    began = time.monotonic()
    chunks = [(time.monotonic() - began, audio) async for audio in tts.synthesize(text, "scripted")]
    made = 0
    for arrived_s, audio in chunks:  # never before it is made
        assert arrived_s >= profile.tts_first_audio_s + made / 24000 * profile.tts_real_time_factor
        made += len(audio.pcm) // 2
    assert made == int(tts.duration_s(text) * 24000)
    assert all(len(audio.pcm) == 2 * int(profile.tts_chunk_s * 24000) for _, audio in chunks[:-1])  # one at a time


async def test_a_late_reader_gets_the_chunks_made_meanwhile_at_once() -> None:
    # As a network stream's reader gets the bytes buffered since its last read: one chunk, the same audio.
    tts = ScriptedTTS(QUICK)
    text = "Hello there, my good friend."
    prompt = [audio.pcm async for audio in tts.synthesize(text, "scripted")]
    chunk_bytes = 2 * int(QUICK.tts_chunk_s * 24000)
    late: list[bytes] = []
    async for audio in tts.synthesize(text, "scripted"):
        late.append(audio.pcm)
        if len(late) == 1:
            await asyncio.sleep(0.03)  # the chunks are made 1.2 ms apart: about 25 are made meanwhile
    assert b"".join(late) == b"".join(prompt)
    assert len(late[1]) >= 10 * chunk_bytes
    made = -(-len(b"".join(prompt)) // chunk_bytes)  # (chunks made; a busy machine may merge the prompt reader's too)
    assert len(late) < made - 10
    assert all(len(pcm) % chunk_bytes == 0 for pcm in late[:-1])  # whole chunks only


@pytest.fixture(params=["timerfd", "loop timers"])
def clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the scripted engines wait: the timerfd clock, and the event loop's timers where
    there is no timerfd."""
    if request.param == "loop timers":
        monkeypatch.setattr(scripted, "_TIMERFD", None)
    monkeypatch.setattr(scripted, "_CLOCKS", weakref.WeakKeyDictionary())
    return str(request.param)


@pytest.mark.parametrize("engine", ["llm", "tts"])
async def test_a_cancelled_stream_leaves_no_timer_behind(
    engine: str, clock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def consume() -> None:
        if engine == "llm":
            request = LLMRequest((Message("user", "hi"),), 0.7, 1000)
            async for _ in ScriptedLLM(PROFILES["cloud"]).stream(request):
                pass
        else:
            async for _ in ScriptedTTS(PROFILES["cloud"]).synthesize("Hello there.", "scripted"):
                pass

    woken: list[object] = []
    wake = scripted._wake
    monkeypatch.setattr(scripted, "_wake", lambda future: (woken.append(future), wake(future)))
    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)  # waiting for its first token or chunk (0.35 s, 0.2 s)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    timerfd = scripted._clock(asyncio.get_running_loop())
    assert (timerfd is not None) == (clock == "timerfd")
    if timerfd is not None:
        assert timerfd._heap == []  # (at once: a wait left there would hold the loop, and its timerfd)
    await asyncio.sleep(0.4)  # past the first token's or chunk's time: its timer would have gone off
    assert woken == []  # (on any event loop: asyncio's or uvloop's)


async def test_waits_end_in_the_order_they_are_due_and_never_early(clock: str) -> None:
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    dues = [start + 0.002 + 0.0017 * ((index * 7) % 30) for index in range(30)]  # (out of order)
    woken: list[tuple[float, float]] = []

    async def wait(due: float) -> None:
        await scripted._until(loop, due)
        woken.append((due, time.monotonic()))

    cancelled = asyncio.create_task(scripted._until(loop, start + 0.01))
    await asyncio.sleep(0)
    cancelled.cancel()  # (a cancelled wait leaves the others alone, and ends cancelled)
    await asyncio.gather(*(wait(due) for due in dues))
    assert [due for due, _ in woken] == sorted(dues)
    assert all(at >= due for due, at in woken)
    with pytest.raises(asyncio.CancelledError):
        await cancelled


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts the process's open files in /proc")
@pytest.mark.parametrize("make_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_loops_timerfd_is_closed_as_the_loop_goes(make_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def waits() -> None:
        loop = asyncio.get_running_loop()
        await scripted._until(loop, time.monotonic() + 0.002)
        assert scripted._clock(loop) is not None
        cancelled = asyncio.create_task(scripted._until(loop, time.monotonic() + 10))
        await asyncio.sleep(0)
        cancelled.cancel()  # (and the loop closes long before it would have been due)
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled

    def run_loops(count: int, main: Callable[[], Coroutine[None, None, None]]) -> None:
        for _ in range(count):
            loop = make_loop()
            loop.run_until_complete(main())
            loop.close()
            del loop
        gc.collect()

    run_loops(1, lambda: asyncio.sleep(0))  # (uvloop's first loop opens two files for the process)
    before = open_fds()
    run_loops(20, waits)
    assert open_fds() == before
