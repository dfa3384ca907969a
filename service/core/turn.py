"""One turn of the pipeline: text stream → segmenter → TTS (ordered, bounded look-ahead) → events.

A :class:`Turn` reads text deltas (from the LLM, or the client's ``speak_text``), forwards them as
captions, cuts them into segments, synthesizes up to ``lookahead`` segments ahead of the one whose
audio is leaving, and emits each segment's audio strictly in order, chunk by chunk as the engine
yields it. It talks to the world only through the engine interfaces and an ``emit`` coroutine, so it
runs the same under a gRPC servicer and in a plain test.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from service.core.audio import AudioFormat, Encoding, SegmentEncoder, wav_stream_header
from service.core.engine import LLMUsage, TTSEngine
from service.core.events import AudioChunk, Event, SegmentStarted, TextDelta, TurnStats
from service.core.history import SpokenSegment
from service.core.normalizer import speakable
from service.core.segmenter import Segmenter, SegmentPolicy, TextSegment
from service.errors import TTSError

__all__ = ["Turn", "TurnOptions"]

log = logging.getLogger(__name__)

_END = object()
T = TypeVar("T")


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async iterator (an engine stream) on the way out, so its upstream work stops."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(frozen=True)
class TurnOptions:
    """How a turn paces its work."""

    lookahead: int = 2
    """Segments synthesized ahead of the one whose audio is being sent."""
    chunk_ms: int = 200
    """Longest audio message, in milliseconds."""
    segments: SegmentPolicy = SegmentPolicy()
    fill_lead_ms: int = 500
    """Once the client has this much audio in hand beyond a message's worth (counting from when the
    turn's first audio left), audio messages wait until they are full: fewer, larger messages,
    with no effect on the first audio or on playback."""


class _AudioBuffer:
    """A segment's audio on its way out: pieces, then _END or an error. One reader."""

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        self._ready.set()

    async def wait(self) -> None:
        """Return once an item is there."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()

    def peek(self) -> object | None:
        return self._items[0] if self._items else None

    def get_nowait(self) -> object:
        return self._items.popleft()


@dataclass
class _Pending:
    """A segment on its way out: its synthesis task and the audio it produced so far."""

    index: int
    segment: TextSegment
    spoken: str
    audio: _AudioBuffer
    task: asyncio.Task[None] | None = None


class Turn:
    """Runs one turn. Create, then await :meth:`run` once."""

    def __init__(
        self,
        turn_id: str,
        text: AsyncIterator[str | LLMUsage],
        *,
        tts: TTSEngine,
        voice: str,
        audio_format: AudioFormat,
        emit: Callable[[Event], Awaitable[None]],
        options: TurnOptions,
        stats: TurnStats,
        from_llm: bool,
    ) -> None:
        self.turn_id = turn_id
        self.text = ""
        """The turn's whole text so far (caption form)."""
        self.segments: list[SpokenSegment] = []
        """Every segment that has started to leave, with its audio timeline."""
        self._source = text
        self._tts = tts
        self._voice = voice
        self._format = audio_format
        self._emit = emit
        self._options = options
        self._stats = stats
        self._from_llm = from_llm
        self._sequence = 0
        self._timeline_samples = 0
        self._first_audio_at: float | None = None

    async def run(self) -> None:
        """Run the turn to its end.

        Safe to cancel: cancelling stops the text source and every synthesis in progress at once.
        Raises :class:`service.errors.EngineError` when an engine fails.
        """
        ready: asyncio.Queue[_Pending | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._options.lookahead + 1)
        pending: list[_Pending] = []
        produce = asyncio.create_task(self._produce(ready, slots, pending), name=f"produce {self.turn_id}")
        try:
            await self._send_in_order(ready, slots)
            await produce
        finally:
            produce.cancel()
            tasks = [item.task for item in pending if item.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(produce, *tasks, return_exceptions=True)

    async def _produce(
        self, ready: asyncio.Queue[_Pending | None], slots: asyncio.Semaphore, pending: list[_Pending]
    ) -> None:
        """Read the text, emit captions, cut segments and start their synthesis (look-ahead bound)."""
        segmenter = Segmenter(self._options.segments)
        try:
            async with _closing(self._source) as source:
                async for delta in source:
                    if isinstance(delta, LLMUsage):
                        self._stats.usage = delta
                        continue
                    if not delta:
                        continue
                    if self._from_llm and self._stats.first_llm_token is None:
                        self._stats.first_llm_token = time.monotonic()
                    self.text += delta
                    await self._emit(TextDelta(self.turn_id, delta))
                    for segment in segmenter.push(delta):
                        await self._schedule(segment, ready, slots, pending)
            for segment in segmenter.flush():
                await self._schedule(segment, ready, slots, pending)
        finally:
            ready.put_nowait(None)

    async def _schedule(
        self,
        segment: TextSegment,
        ready: asyncio.Queue[_Pending | None],
        slots: asyncio.Semaphore,
        pending: list[_Pending],
    ) -> None:
        if self._stats.first_segment is None:
            self._stats.first_segment = time.monotonic()
        await slots.acquire()
        item = _Pending(len(pending), segment, speakable(segment.text), _AudioBuffer())
        if item.spoken:
            item.task = asyncio.create_task(self._synthesize(item), name=f"tts {self.turn_id}/{item.index}")
        else:
            item.audio.put_nowait(_END)
        pending.append(item)
        ready.put_nowait(item)

    async def _synthesize(self, item: _Pending) -> None:
        """Synthesize one segment into its queue; the queue always ends with _END or an error."""
        encoder: SegmentEncoder | None = None
        try:
            async with _closing(self._tts.synthesize(item.spoken, self._voice)) as audio:
                async for chunk in audio:
                    if encoder is None:
                        encoder = SegmentEncoder(
                            chunk.sample_rate_hz, self._format.sample_rate_hz, self._options.chunk_ms
                        )
                    elif chunk.sample_rate_hz != encoder.in_rate:
                        raise TTSError("the TTS engine changed its sample rate within a segment")
                    for piece in encoder.feed(chunk.pcm):
                        item.audio.put_nowait(piece)
            if encoder is not None:
                for piece in encoder.finish():
                    item.audio.put_nowait(piece)
            item.audio.put_nowait(_END)
        except TTSError as error:
            item.audio.put_nowait(error)
        except Exception as error:  # an engine bug must still end the turn cleanly
            log.exception("TTS engine failed on segment %d of turn %s", item.index, self.turn_id)
            item.audio.put_nowait(TTSError(f"the TTS engine failed: {type(error).__name__}"))

    async def _send_in_order(self, ready: asyncio.Queue[_Pending | None], slots: asyncio.Semaphore) -> None:
        """Emit each segment and its audio strictly in order, chunks as soon as they exist."""
        while (item := await ready.get()) is not None:
            start_ms = round(self._format.duration_ms(self._timeline_samples))
            spoken = SpokenSegment(item.segment.start, item.segment.end, float(start_ms))
            self.segments.append(spoken)
            await self._emit(SegmentStarted(self.turn_id, item.index, item.segment.text, item.spoken, start_ms))
            finished = False
            while not finished:
                batch, finished, error = await self._batch(item.audio, fill_until=self._fill_until())
                if batch:
                    await self._emit_audio(item.index, batch[0] if len(batch) == 1 else b"".join(batch))
                    spoken.duration_ms = self._format.duration_ms(self._timeline_samples) - start_ms
                if error is not None:
                    raise error
            spoken.complete = True
            slots.release()

    def _fill_until(self) -> float | None:
        """Until when a message may wait to fill up: while the client still holds ``fill_lead_ms`` of
        audio (counting from when the turn's first audio left; it may have started playing later).
        None when the client is not that far ahead."""
        if self._first_audio_at is None:
            return None
        now = time.monotonic()
        lead_ms = self._format.duration_ms(self._timeline_samples) - (now - self._first_audio_at) * 1000
        if lead_ms < self._options.fill_lead_ms + self._options.chunk_ms:
            return None
        return now + (lead_ms - self._options.fill_lead_ms) / 1000

    async def _batch(
        self, audio: _AudioBuffer, *, fill_until: float | None
    ) -> tuple[list[bytes], bool, BaseException | None]:
        """Up to one message's worth of audio: the pieces ready now (a single piece when the sender keeps
        up, several when synthesis ran ahead), or, until ``fill_until``, as many as make a full message.
        Returns the pieces, whether the segment ended, and its error if it failed."""
        limit = max(2, self._format.sample_rate_hz * self._options.chunk_ms // 1000 * 2)  # bytes
        batch: list[bytes] = []
        size = 0
        while True:
            piece = audio.peek()
            if piece is None:
                if not batch:
                    await audio.wait()
                    continue
                if fill_until is None or size + len(batch[-1]) > limit:
                    return batch, False, None  # send what there is (another piece would hardly fit)
                try:
                    async with asyncio.timeout_at(fill_until):
                        await audio.wait()
                except TimeoutError:
                    return batch, False, None  # the client's lead is spent: send what there is
                continue
            if piece is _END:
                audio.get_nowait()
                return batch, True, None
            if isinstance(piece, BaseException):
                audio.get_nowait()
                return batch, True, piece
            assert isinstance(piece, bytes)
            if batch and size + len(piece) > limit:
                return batch, False, None  # it would overfill the message
            audio.get_nowait()
            batch.append(piece)
            size += len(piece)
            if size >= limit:
                return batch, False, None

    async def _emit_audio(self, segment_index: int, data: bytes) -> None:
        count = len(data) // 2
        if self._sequence == 0 and self._format.encoding is Encoding.WAV:
            data = wav_stream_header(self._format.sample_rate_hz) + data
        chunk = AudioChunk(self.turn_id, segment_index, self._sequence, data, self._format.duration_ms(count))
        if self._first_audio_at is None:
            self._first_audio_at = time.monotonic()
        self._sequence += 1
        self._timeline_samples += count
        await self._emit(chunk)
