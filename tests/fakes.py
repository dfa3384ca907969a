"""Fake engines with configurable latency and faults, for tests that must not depend on models.

They speak the real engine interfaces and record what happened to them (requests, cancellations,
streams still open), so tests can check that an interrupt really stopped upstream work.
"""

from __future__ import annotations

import array
import asyncio
import copy
import math
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from service.core.engine import Audio, LLMRequest, Transcription, Voice
from service.core.store import Claim, StoredSession
from service.errors import LLMError, StoreUnavailable, STTError, TTSError
from service.stores.memory import MemoryStore


@dataclass
class FakeLLM:
    """Streams a fixed reply word by word."""

    reply: str = "Sure, here is the answer. It has two sentences, and this is the second one."
    first_token_s: float = 0.0
    token_s: float = 0.0
    fail_after_tokens: int | None = None
    name: str = "fake-llm"
    requests: list[LLMRequest] = field(default_factory=list)
    cancelled: int = 0
    open_streams: int = 0
    completed: int = 0

    def stream(self, request: LLMRequest) -> AsyncGenerator[str, None]:
        self.requests.append(request)
        return self._stream()

    async def _stream(self) -> AsyncGenerator[str, None]:
        self.open_streams += 1
        try:
            await asyncio.sleep(self.first_token_s)
            for i, token in enumerate(re.findall(r"\S+\s*|\s+", self.reply)):
                if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                    raise LLMError("fake LLM failure: the model went away", retryable=True)
                if i:
                    await asyncio.sleep(self.token_s)
                yield token
            self.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.open_streams -= 1

    async def aclose(self) -> None:
        pass


@dataclass
class FakeTTS:
    """Speaks a 440 Hz tone, 60 ms per character, in a few chunks."""

    sample_rate_hz: int = 16000
    ms_per_char: float = 60.0
    latency_s: float | Callable[[str], float] = 0.0
    chunk_s: float = 0.0
    chunks: int = 3
    fail_on: str | None = None
    name: str = "fake-tts"
    voice_ids: tuple[str, ...] = ("fake-voice", "fake-voice-2")
    texts: list[str] = field(default_factory=list)
    cancelled: int = 0
    open_streams: int = 0

    @property
    def default_voice(self) -> str:
        return self.voice_ids[0]

    def voices(self) -> list[Voice]:
        return [Voice(v, "en_US", self.sample_rate_hz, self.name) for v in self.voice_ids]

    def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
        self.texts.append(text)
        return self._synthesize(text)

    def duration_ms(self, text: str) -> float:
        return len(text) * self.ms_per_char

    async def _synthesize(self, text: str) -> AsyncGenerator[Audio, None]:
        self.open_streams += 1
        try:
            latency = self.latency_s(text) if callable(self.latency_s) else self.latency_s
            await asyncio.sleep(latency)
            if self.fail_on is not None and self.fail_on in text:
                raise TTSError("fake TTS failure: the voice broke")
            samples = int(self.duration_ms(text) * self.sample_rate_hz / 1000)
            per_chunk = math.ceil(samples / self.chunks)
            for start in range(0, samples, per_chunk):
                if start:
                    await asyncio.sleep(self.chunk_s)
                count = min(per_chunk, samples - start)
                yield Audio(tone(start, count, self.sample_rate_hz), self.sample_rate_hz)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.open_streams -= 1

    async def aclose(self) -> None:
        pass


def tone(start: int, count: int, rate: int) -> bytes:
    """``count`` samples of a 440 Hz tone at half scale, starting at sample ``start``."""
    import numpy as np

    t = (np.arange(start, start + count) / rate).astype("float64")
    return (np.sin(2 * math.pi * 440 * t) * 16000).astype("<i2").tobytes()


class SlowStore(MemoryStore):
    """A memory store whose writes take ``save_s`` (a store across a network), counting what happens and
    keeping a copy of what it stored, for tests to look at."""

    def __init__(self, save_s: float) -> None:
        super().__init__(ttl_s=3600)
        self.save_s = save_s
        self.failing = False
        """Saves raise StoreUnavailable (the store cannot be reached)."""
        self.saves_started = 0
        self.saves_done = 0
        self.releases = 0
        self._stored: dict[str, StoredSession] = {}
        self._owners: dict[str, Claim] = {}

    async def create(self, session: StoredSession) -> Claim:
        claim = await super().create(session)
        self._stored[session.session_id] = copy.deepcopy(session)
        self._owners[session.session_id] = claim
        return claim

    async def resume(self, session_id: str, principal: str = "") -> tuple[StoredSession, Claim] | None:
        resumed = await super().resume(session_id, principal)
        if resumed is not None:
            self._owners[session_id] = resumed[1]
        return resumed

    async def save(self, session: StoredSession, claim: Claim) -> bool:
        self.saves_started += 1
        await asyncio.sleep(self.save_s)
        if self.failing:
            raise StoreUnavailable("the session store (a fake) is unavailable")
        written = await super().save(session, claim)
        if written:
            self._stored[session.session_id] = copy.deepcopy(session)
        self.saves_done += 1
        return written

    async def release(self, claim: Claim) -> None:
        self.releases += 1
        await super().release(claim)
        if self._owners.get(claim.session_id) is claim:
            del self._owners[claim.session_id]

    def entries(self, session_id: str) -> list[tuple[str, str, bool]]:
        """The stored history (without claiming the session)."""
        return [(e.role, e.content, e.interrupted) for e in self._stored[session_id].entries]

    def owned(self, session_id: str) -> bool:
        """A stream holds the session."""
        return session_id in self._owners


@dataclass
class FakeDetector:
    """A speech detector that calls a frame speech when its samples are loud (|x| > 1000)."""

    sample_rate_hz: int = 16000
    frame_ms: float = 32.0
    latency_s: float = 0.0

    def stream(self) -> FakeFrames:
        return FakeFrames(self)

    async def aclose(self) -> None:
        pass


class FakeFrames:
    def __init__(self, detector: FakeDetector) -> None:
        self._detector = detector
        self._pending = b""

    async def feed(self, pcm: bytes) -> list[float]:
        if self._detector.latency_s:
            await asyncio.sleep(self._detector.latency_s)
        data = self._pending + pcm
        size = int(self._detector.sample_rate_hz * self._detector.frame_ms / 1000) * 2
        whole = len(data) - len(data) % size
        self._pending = data[whole:]
        scores = []
        for start in range(0, whole, size):
            frame = array.array("h", data[start : start + size])
            scores.append(0.95 if max(abs(x) for x in frame) > 1000 else 0.02)
        return scores

    def reset(self) -> None:
        self._pending = b""


@dataclass
class FakeSTT:
    """Transcribes every utterance as ``text`` (or the next of ``texts``) after ``latency_s``."""

    text: str = "What is the weather like?"
    texts: list[str] = field(default_factory=list)
    latency_s: float = 0.05
    no_speech_probability: float = 0.0
    fail: bool = False
    name: str = "fake-stt"
    sample_rate_hz: int = 16000
    heard: list[bytes] = field(default_factory=list)

    def language_problem(self, language: str) -> str | None:
        return None if language in ("en", "fr", "de") else f"the fake STT does not know {language!r}"

    async def transcribe(self, pcm: bytes, language: str | None = None) -> Transcription:
        self.heard.append(pcm)
        await asyncio.sleep(self.latency_s)
        if self.fail:
            raise STTError("fake STT failure: the model broke")
        text = self.texts.pop(0) if self.texts else self.text
        return Transcription(text, language or "en", self.no_speech_probability)

    async def aclose(self) -> None:
        pass


def loud(ms: int, rate: int = 16000, level: int = 8000) -> bytes:
    """A loud 300 Hz tone: speech to the fake detector."""
    count = rate * ms // 1000
    return array.array("h", (int(level * math.sin(2 * math.pi * 300 * i / rate)) for i in range(count))).tobytes()


def quiet(ms: int, rate: int = 16000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)
