"""The scripted engines keep their schedule: the benchmarks' ideal first audio is computed from it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import pytest

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


@pytest.mark.parametrize("engine", ["llm", "tts"])
async def test_a_cancelled_stream_leaves_no_timer_behind(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
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
    await asyncio.sleep(0.4)  # past the first token's or chunk's time: its timer would have gone off
    assert woken == []  # (on any event loop: asyncio's or uvloop's)
