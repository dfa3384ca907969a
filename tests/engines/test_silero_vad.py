"""The Silero VAD engine on the real model: silence scores low, speech (Piper's, made here) high, and
the probabilities depend only on the audio, not on how it is chunked, which other streams run, or a
cancelled feed; the event loop keeps running while a minute of audio is scored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr

from service.engines.piper_tts import PiperOptions, PiperTTS, default_voice_path
from service.engines.silero_vad import SileroFrames, SileroOptions, SileroVAD, default_model_path
from service.errors import VADError

pytestmark = pytest.mark.embedded

RATE = 16_000
FRAME_BYTES = 1024  # 512 samples
HALF_SECOND = bytes(RATE)  # 8,000 silent samples
SENTENCE = "The weather today is sunny, with a light breeze from the west."


async def _piper_speech(text: str) -> bytes:
    tts = PiperTTS(PiperOptions(default_voice_path()))
    try:
        chunks = [audio async for audio in tts.synthesize(text, tts.default_voice)]
    finally:
        await tts.aclose()
    rate = chunks[0].sample_rate_hz  # 22,050 Hz for the joe voice
    samples = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<i2").astype(np.float32) / 32768
    resampled = soxr.resample(samples, rate, RATE)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def speech() -> bytes:
    """Half a second of silence, the sentence spoken by Piper at 16 kHz, half a second of silence."""
    return HALF_SECOND + asyncio.run(_piper_speech(SENTENCE)) + HALF_SECOND


@pytest.fixture
async def vad() -> AsyncIterator[SileroVAD]:
    detector = SileroVAD(SileroOptions())
    yield detector
    await detector.aclose()


def noise(seconds: float, level: float, seed: int = 1) -> bytes:
    """White noise with a standard deviation of ``level`` (PCM16 units)."""
    samples = np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * level
    return samples.astype("<i2").tobytes()


def chunks(pcm: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


async def feed_in_chunks(frames: SileroFrames, pcm: bytes, size: int) -> list[float]:
    probabilities: list[float] = []
    for chunk in chunks(pcm, size):
        probabilities += await frames.feed(chunk)
    return probabilities


async def test_it_scores_16_khz_audio_in_32_ms_frames(vad: SileroVAD) -> None:
    assert vad.sample_rate_hz == 16_000
    assert vad.frame_ms == 32.0
    frames = vad.stream()
    assert await frames.feed(bytes(FRAME_BYTES - 1)) == []  # a sample and a half short
    assert len(await frames.feed(bytes(1))) == 1
    assert len(await frames.feed(bytes(FRAME_BYTES * 3 + 5))) == 3
    assert len(await frames.feed(bytes(FRAME_BYTES - 5))) == 1


@pytest.mark.parametrize("pcm", [bytes(2 * 2 * RATE), noise(2.0, 100)], ids=["zeros", "low noise"])
async def test_silence_scores_low(vad: SileroVAD, pcm: bytes) -> None:
    probabilities = await vad.stream().feed(pcm)
    assert len(probabilities) == len(pcm) // FRAME_BYTES
    assert max(probabilities) < 0.15, probabilities
    assert float(np.mean(probabilities)) < 0.05


async def test_speech_scores_high_between_silences_that_score_low(vad: SileroVAD, speech: bytes) -> None:
    probabilities = np.array(await vad.stream().feed(speech))
    assert len(probabilities) == len(speech) // FRAME_BYTES
    silence_frames = len(HALF_SECOND) // FRAME_BYTES  # 15
    assert probabilities[: silence_frames - 2].max() < 0.1, probabilities[:silence_frames]
    sentence = probabilities[silence_frames:-silence_frames]
    assert (sentence > 0.5).mean() > 0.75, sentence.round(2)
    # The model needs a few frames to let go of the last word; the last 320 ms are silence to it.
    assert probabilities[-10:].max() < 0.1, probabilities[-silence_frames:]


@pytest.mark.parametrize("size", [320, 1184, 333, 32_000], ids=["10 ms", "37 ms", "odd bytes", "1 s"])
async def test_chunking_does_not_change_the_probabilities(vad: SileroVAD, speech: bytes, size: int) -> None:
    whole = await vad.stream().feed(speech)
    chunked = await feed_in_chunks(vad.stream(), speech, size)
    assert len(chunked) == len(whole)
    assert np.abs(np.array(chunked) - np.array(whole)).max() < 1e-4


async def test_streams_interleaved_do_not_disturb_each_other(vad: SileroVAD, speech: bytes) -> None:
    other = noise(len(speech) / 2 / RATE, 3000, seed=7)
    alone = [await vad.stream().feed(speech), await vad.stream().feed(other)]
    first, second = vad.stream(), vad.stream()
    together: list[list[float]] = [[], []]
    for a, b in zip(chunks(speech, 1184), chunks(other, 1184), strict=True):
        # Both at once, so that the two workers score them at the same time.
        got_a, got_b = await asyncio.gather(first.feed(a), second.feed(b))
        together[0] += got_a
        together[1] += got_b
    for mine, solo in zip(together, alone, strict=True):
        assert np.abs(np.array(mine) - np.array(solo)).max() < 1e-4


async def test_reset_forgets_the_audio_so_far(vad: SileroVAD, speech: bytes) -> None:
    fresh = await vad.stream().feed(speech)
    frames = vad.stream()
    await frames.feed(speech[: len(speech) // 2 + 700])  # mid-sentence, with a partial frame
    frames.reset()
    again = await frames.feed(speech)
    assert np.abs(np.array(again) - np.array(fresh)).max() < 1e-4


async def test_a_reset_during_a_feed_leaves_the_stream_fresh(vad: SileroVAD, speech: bytes) -> None:
    fresh = await vad.stream().feed(speech)
    frames = vad.stream()
    scoring = asyncio.create_task(frames.feed(speech))
    await asyncio.sleep(0)  # it took its frames and is being scored
    frames.reset()
    assert len(await scoring) == len(fresh)  # it still returns them
    again = await frames.feed(speech)
    assert np.abs(np.array(again) - np.array(fresh)).max() < 1e-4


async def test_overlapping_and_cancelled_feeds_keep_the_stream_in_step(vad: SileroVAD, speech: bytes) -> None:
    whole = await vad.stream().feed(speech)
    cut = 40 * FRAME_BYTES
    frames = vad.stream()
    cancelled = asyncio.create_task(frames.feed(speech[:cut]))
    await asyncio.sleep(0)  # it took its frames and is being scored
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # Its frames were scored all the same: what follows is scored as if it had not been cancelled.
    first, second = await asyncio.gather(frames.feed(speech[cut : 2 * cut]), frames.feed(speech[2 * cut :]))
    assert np.abs(np.array(first + second) - np.array(whole[40:])).max() < 1e-4


async def test_a_minute_of_audio_does_not_hold_the_event_loop(vad: SileroVAD, speech: bytes) -> None:
    minute = (speech * (60 * 2 * RATE // len(speech) + 1))[: 60 * 2 * RATE]
    # The machine is shared: scheduling noise may delay one run, holding the loop would delay all.
    attempts = [await _largest_loop_gap(vad.stream(), minute) for _ in range(3)]
    gap_s, work_s, count = min(attempts)
    assert count == 1875
    assert work_s > 0.05, "too little work to tell"
    assert gap_s < 0.020, attempts


async def _largest_loop_gap(frames: SileroFrames, pcm: bytes) -> tuple[float, float, int]:
    """The loop's largest lag (a 1 ms heartbeat's longest gap) while ``pcm`` is scored; the time the
    scoring took; the number of probabilities."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beating = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.01)
    gaps.clear()
    began = time.perf_counter()
    probabilities = await frames.feed(pcm)
    work_s = time.perf_counter() - began
    done.set()
    await beating
    return max(gaps), work_s, len(probabilities)


def test_a_missing_model_file_is_a_vad_error(tmp_path: Path) -> None:
    with pytest.raises(VADError, match="does not exist"):
        SileroVAD(SileroOptions(model_path=tmp_path / "silero_vad_v6.onnx"))


def test_a_file_that_is_not_a_model_is_a_vad_error(tmp_path: Path) -> None:
    path = tmp_path / "silero_vad_v6.onnx"
    path.write_text("not a model")
    with pytest.raises(VADError, match="cannot load the Silero VAD model"):
        SileroVAD(SileroOptions(model_path=path))


def test_another_onnx_model_is_a_vad_error() -> None:
    with pytest.raises(VADError, match="is not Silero VAD v6"):
        SileroVAD(SileroOptions(model_path=default_voice_path()))  # Piper's voice


def test_the_default_model_is_the_one_faster_whisper_ships() -> None:
    path = default_model_path()
    assert path.parts[-3:] == ("faster_whisper", "assets", "silero_vad_v6.onnx")
    assert path.is_file()


async def test_feeding_a_closed_detector_is_a_vad_error() -> None:
    detector = SileroVAD(SileroOptions())
    frames = detector.stream()
    await detector.aclose()
    with pytest.raises(VADError, match="closed"):
        await frames.feed(bytes(FRAME_BYTES))


async def test_a_feed_over_a_minute_long_is_scored_in_runs_with_the_same_result(vad: SileroVAD, speech: bytes) -> None:
    long = (speech * (70 * 2 * RATE // len(speech) + 1))[: 70 * 2 * RATE]  # 2,187 frames: two runs of the model
    whole = await vad.stream().feed(long)
    chunked = await feed_in_chunks(vad.stream(), long, 10 * 2 * RATE)
    assert len(whole) == 2187
    assert np.abs(np.array(chunked) - np.array(whole)).max() < 1e-4
