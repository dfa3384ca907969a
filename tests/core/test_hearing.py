"""A stream's ears on their own: fake detector and STT, the commands they post."""

from __future__ import annotations

import asyncio

from service.core.command import Command, Heard, HeardAll, SpeechEnded
from service.core.hearing import MAX_QUEUED_CHUNKS, MAX_UNHEARD_UTTERANCES, Ears, VoiceInput
from service.core.listening import ListenPolicy
from service.core.settings import InputAudioRequest
from tests.fakes import FakeDetector, FakeSTT, loud, quiet


async def test_audio_sent_faster_than_it_is_heard_waits_with_the_client() -> None:
    # Audio sent as fast as the client could became utterances waiting for Whisper without bound:
    # 2.5 hours of speech in a minute took 480 MB more (an attack pass). Now the ears stop scoring
    # while MAX_UNHEARD_UTTERANCES wait, their queue fills, and the client's feed waits.
    stt = FakeSTT(latency_s=3600)  # (a transcription that does not end during the test)
    posted: list[Command] = []
    policy = ListenPolicy(min_speech_ms=64, silence_ms=320, tentative_silence_ms=0)
    ears = Ears(VoiceInput(FakeDetector(), stt), InputAudioRequest(16000, "", policy), posted.append)
    ears.start()
    utterance = loud(300) + quiet(700)  # one utterance a chunk, ended by its own silence
    fed = 0
    try:
        for _ in range(200):
            try:
                await asyncio.wait_for(ears.feed(utterance), 0.5)
            except TimeoutError:
                break
            fed += 1
    finally:
        await ears.aclose()
    ended = sum(isinstance(c, SpeechEnded) for c in posted)
    assert ended == MAX_UNHEARD_UTTERANCES
    assert fed <= MAX_UNHEARD_UTTERANCES + 1 + MAX_QUEUED_CHUNKS  # (then the queue was full: the feed waited)
    assert len(stt.heard) == 1 and not any(isinstance(c, Heard) for c in posted)


async def test_held_audio_is_heard_in_order_once_transcripts_come() -> None:
    # The wait for room lets nothing go and changes no order: every utterance is heard, in turn.
    stt = FakeSTT(latency_s=0.02, texts=[f"utterance {i}" for i in range(3 * MAX_UNHEARD_UTTERANCES)])
    posted: list[Command] = []
    policy = ListenPolicy(min_speech_ms=64, silence_ms=320, tentative_silence_ms=0)
    ears = Ears(VoiceInput(FakeDetector(), stt), InputAudioRequest(16000, "", policy), posted.append)
    ears.start()
    try:
        for _ in range(3 * MAX_UNHEARD_UTTERANCES):
            await asyncio.wait_for(ears.feed(loud(300) + quiet(700)), 10)
        await ears.finish()
        async with asyncio.timeout(10):
            while not any(isinstance(c, HeardAll) for c in posted):  # noqa: ASYNC110 - polls what the ears posted
                await asyncio.sleep(0.01)
    finally:
        await ears.aclose()
    heard = [c.text for c in posted if isinstance(c, Heard)]
    assert heard == [f"utterance {i}" for i in range(3 * MAX_UNHEARD_UTTERANCES)]
