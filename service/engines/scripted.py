"""Engines ``scripted``: an LLM and a TTS with fixed, known latency, for benchmarks and load tests.

Because every delay is known, the ideal time to first audio of a turn can be computed, and what a
benchmark measures beyond it is the service's own overhead. A profile names the delays:

- ``cloud``: the LLM's first token after 350 ms, then 40 tokens/s; the TTS's first audio 200 ms after
  a segment arrives, then audio made at 0.3 × real time in 40 ms chunks (a typical hosted pair);
  a reader that comes late gets the chunks made meanwhile as one, as from a network stream;
- ``quick``: the same shape ten times faster, for smoke tests.

The reply is a fixed script chosen by the user's message: one containing ``long`` gets a reply of
about 150 words, ``short`` a single sentence, anything else three sentences. Tokens are words with
their following space. Audio is a 220 Hz tone, 65 ms per character (about 15 characters a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import itertools
import math
import os
import re
import sys
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.engine import Audio, LLMRequest, LLMUsage, Voice

__all__ = ["PROFILES", "SCRIPTS", "LatencyProfile", "ScriptedLLM", "ScriptedTTS", "reply_for", "tokens_of"]


@dataclass(frozen=True)
class LatencyProfile:
    """Fixed delays of a scripted LLM and TTS."""

    first_token_s: float
    tokens_per_s: float
    tts_first_audio_s: float
    tts_real_time_factor: float
    """Seconds of work per second of audio after the first chunk."""
    tts_chunk_s: float = 0.04


PROFILES = {
    "cloud": LatencyProfile(first_token_s=0.35, tokens_per_s=40, tts_first_audio_s=0.2, tts_real_time_factor=0.3),
    "quick": LatencyProfile(first_token_s=0.035, tokens_per_s=400, tts_first_audio_s=0.02, tts_real_time_factor=0.03),
}

SCRIPTS = {
    "short": "Sure, the capital of France is Paris.",
    "medium": (
        "Sure, here is a quick answer for you. The capital of France is Paris, on the river Seine. "
        "It is famous for its museums, its cafes and the Eiffel Tower."
    ),
    "long": " ".join(
        [
            "Well, that is a big question, so let me walk you through it step by step.",
            "First, the sky looks blue because sunlight is made of many colors mixed together.",
            "When that light reaches the air, it bumps into tiny molecules of nitrogen and oxygen.",
            "Short blue waves are scattered much more strongly than long red waves.",
            "So blue light bounces around the whole sky and reaches your eyes from every direction.",
            "That is why the sky looks blue on a clear day, even far away from the sun.",
            "At sunset, the light travels through much more air before it reaches you.",
            "Most of the blue is scattered away on that long path.",
            "The reds and oranges are left, and they paint the clouds and the horizon.",
            "Violet light is scattered even more than blue, but our eyes are less sensitive to it.",
            "The sun also sends less violet than blue, so the sky looks blue rather than purple.",
            "On other planets the air is different, so their skies can look very different too.",
            "Mars, for example, has a dusty sky that looks butterscotch during the day.",
            "I hope that helps you picture what is happening above us.",
        ]
    ),
}

_MS_PER_CHAR = 65.0
_RATE = 24000


async def _until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    """Return at ``due`` (``time.monotonic``), never before, or, once it has passed, after letting the
    other tasks run. What ``asyncio.sleep`` does, without its bookkeeping (a chunk of a benchmark engine
    must cost the event loop as little as it can), and to the microsecond where :class:`_Clock` can."""
    if due <= time.monotonic():
        await asyncio.sleep(0)
        return
    clock = _clock(loop)
    if clock is not None:
        future = clock.at(due)
        try:
            await future
        except asyncio.CancelledError:
            clock.drop(future)  # (its future holds the loop: kept, it would keep the loop and its timerfd)
            raise
        return
    # (uvloop's timers count whole milliseconds, and may come a fraction of one early: the benchmark's
    # ideal must never be beaten by an engine that is.)
    while (left := due - time.monotonic()) > 0:
        future = loop.create_future()
        timer = loop.call_later(left, _wake, future)
        try:
            await future
        except asyncio.CancelledError:
            timer.cancel()
            raise


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _timerfd_calls() -> tuple[Any, Any] | None:
    """libc's ``timerfd_create`` and ``timerfd_settime`` (Linux; Python has them only from 3.13)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p)
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _timerfd_calls() if sys.platform == "linux" else None
_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1


class _Clock:
    """Wakes the scripted engines' waits at their due times to the microsecond, through one timerfd
    the event loop watches: as a network engine's bytes wake it the moment they arrive. The event
    loop's own timers count whole milliseconds (uvloop's; and the kernel's poll timeout), so an engine
    event waiting on one came up to a millisecond late, twice on the way to a turn's first audio,
    and the benchmark counted that as the service's overhead. One per event loop (see :func:`_clock`)."""

    def __init__(self, fd: int, settime: Any) -> None:
        self._fd = fd
        self._settime = settime
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._count = itertools.count()
        self._armed = math.inf
        self._spec = _Itimerspec()

    def at(self, due: float) -> asyncio.Future[None]:
        """A future done at ``due`` (``time.monotonic``, the kernel's CLOCK_MONOTONIC), never before.
        Cancel it to stop waiting."""
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (due, next(self._count), future))
        if due < self._armed:
            self._arm(due)
        return future

    def drop(self, future: asyncio.Future[None]) -> None:
        """Forget a cancelled wait at once (the timerfd may still expire for it: nothing is then due)."""
        self._heap = [entry for entry in self._heap if entry[2] is not future]
        heapq.heapify(self._heap)

    def fire(self) -> None:
        """The timerfd expired: wake what is due, and arm it for the next."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        now = time.monotonic()
        heap = self._heap
        while heap and heap[0][0] <= now:
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_result(None)
        self._armed = math.inf
        if heap:
            self._arm(heap[0][0])

    def _arm(self, due: float) -> None:
        self._armed = due
        seconds = int(due)
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = max(1, int((due - seconds) * 1e9))  # (all zeros would disarm it)
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clock | None] = weakref.WeakKeyDictionary()


def _clock(loop: asyncio.AbstractEventLoop) -> _Clock | None:
    """The loop's :class:`_Clock` (its timerfd is closed as the loop goes), or None where there is no
    timerfd (the loop's own timers are used)."""
    try:
        return _CLOCKS[loop]
    except KeyError:
        pass
    clock = None
    if _TIMERFD is not None:
        create, settime = _TIMERFD
        fd = create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)  # (TFD_NONBLOCK, TFD_CLOEXEC)
        if fd >= 0:
            clock = _Clock(fd, settime)
            loop.add_reader(fd, clock.fire)
            weakref.finalize(loop, os.close, fd)
    _CLOCKS[loop] = clock
    return clock


def reply_for(request_text: str) -> str:
    """The script a user message gets."""
    lowered = request_text.lower()
    for name in ("long", "short"):
        if name in lowered:
            return SCRIPTS[name]
    return SCRIPTS["medium"]


def tokens_of(text: str) -> list[str]:
    """The tokens a scripted reply streams: words with their following space."""
    return re.findall(r"\S+\s*", text)


class ScriptedLLM:
    """Streams a script at the profile's pace."""

    def __init__(self, profile: LatencyProfile, profile_name: str = "cloud") -> None:
        self._profile = profile
        self.name = f"scripted/{profile_name}"

    def stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        """Yield the script's tokens on schedule. Safe to cancel."""
        return self._stream(request)

    async def _stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        tokens = tokens_of(reply_for(request.messages[-1].content))[: request.max_tokens]
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        for index, token in enumerate(tokens):
            await _until(loop, began + self._profile.first_token_s + index / self._profile.tokens_per_s)  # (no drift)
            yield token
        yield LLMUsage(sum(len(m.content) for m in request.messages) // 4, len(tokens))

    async def aclose(self) -> None:
        pass


class ScriptedTTS:
    """Makes tone audio for a text at the profile's pace."""

    def __init__(self, profile: LatencyProfile) -> None:
        self._profile = profile
        self.name = "scripted"

    @property
    def default_voice(self) -> str:
        return "scripted"

    def voices(self) -> list[Voice]:
        return [Voice("scripted", "en_US", _RATE, self.name)]

    @staticmethod
    def duration_s(text: str) -> float:
        """The audio duration the scripted TTS makes for ``text``."""
        return len(text) * _MS_PER_CHAR / 1000

    def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
        """Yield the text's audio in chunks on schedule. Safe to cancel."""
        return self._synthesize(text)

    async def _synthesize(self, text: str) -> AsyncGenerator[Audio, None]:
        profile = self._profile
        total = int(self.duration_s(text) * _RATE)
        chunk = int(profile.tts_chunk_s * _RATE)
        loop = asyncio.get_running_loop()
        began = time.monotonic()

        def made_at(sample: int) -> float:  # when the chunk starting at ``sample`` is made (no drift)
            return began + profile.tts_first_audio_s + sample / _RATE * profile.tts_real_time_factor

        start = 0
        while start < total:
            await _until(loop, made_at(start))
            # A reader that comes late gets every chunk made meanwhile at once, as a network stream's
            # reader gets the bytes buffered since its last read.
            end = min(start + chunk, total)
            now = time.monotonic()
            while end < total and made_at(end) <= now:
                end = min(end + chunk, total)
            yield Audio(_tone(start, end - start), _RATE)
            start = end

    async def aclose(self) -> None:
        pass


# One second of a 220 Hz tone holds exactly 220 periods, so it loops without a click.
_SECOND = (np.sin(2 * math.pi * 220 * np.arange(_RATE) / _RATE) * 12000).astype("<i2").tobytes()


def _tone(start: int, count: int) -> bytes:
    """``count`` samples of the tone from sample ``start``, cut from the precomputed second (cheap:
    a benchmark engine must not be what the benchmark measures)."""
    offset = (start % _RATE) * 2
    data = _SECOND[offset : offset + count * 2]
    while len(data) < count * 2:
        data += _SECOND[: count * 2 - len(data)]
    return data
