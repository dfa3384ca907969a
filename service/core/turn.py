"""One turn of the pipeline: text stream → segmenter → TTS (ordered, bounded look-ahead) → events.

A :class:`Turn` reads text deltas (from the LLM, or the client's ``speak_text``), forwards them as
captions, cuts them into segments, synthesizes up to ``lookahead`` segments ahead of the one whose
audio is leaving, and emits each segment's audio strictly in order, piece by piece as the engine
yields it. It talks to the world only through the engine interfaces and an ``emit`` coroutine (the
turn's outlet in the outbox, which sizes and numbers the messages), so it runs the same under a gRPC
servicer and in a plain test.

A :class:`TurnRecord` is the session's record of one turn: its pipeline, task and outlet, and its
state (:class:`TurnState`), which has exactly one transition to its end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.core.aio import discard_outcome, drop_tracebacks
from service.core.audio import AudioFormat, LeadingSilence, SegmentEncoder
from service.core.codecs import CodecOptions, StreamEncoder, stream_encoder
from service.core.engine import LLMEngine, LLMRequest, LLMUsage, TTSEngine
from service.core.events import AudioPiece, SegmentStarted, TextDelta, TurnEndReason, TurnStats
from service.core.history import SpokenSegment
from service.core.normalizer import speakable
from service.core.outbox import MAX_CAPTION_CHARS, OutboxLimits, Outlet
from service.core.segmenter import Segmenter, SegmentPolicy, TextSegment
from service.core.tracing import fail_span, span
from service.core.workpool import WorkPool
from service.errors import TTSError

__all__ = [
    "NoteFilter",
    "Turn",
    "TurnOptions",
    "TurnOutcome",
    "TurnRecord",
    "TurnState",
    "llm_deltas",
    "queued_deltas",
]

log = logging.getLogger(__name__)

_CODEC_POOL = WorkPool("codec", min(32, (os.cpu_count() or 1) + 4))  # (asyncio's default executor's size)
"""Where Opus and MP3 are encoded (FFmpeg releases the GIL): off the event loop, shared by every stream."""

READ_ROUND_MS = 200
"""Audio read from a TTS engine between two pauses, at least, while the client is well ahead (or a
message's worth, if that is less): see :meth:`Turn._read_pause`."""

READ_BEFORE_DEADLINE_S = 0.02
"""A read pause ends this long before the message being gathered must leave."""

SEGMENTER_SLICE_CHARS = 256
"""A delta is given to the segmenter this many characters at a time, letting other work run between:
its cost is linear in the text, but a few thousand characters of an unusual text (a one-line numbered
list, many quotes) can still take tens of milliseconds, which no stream may hold the loop for."""


@dataclass(frozen=True)
class TurnOptions:
    """How a turn paces its work."""

    lookahead: int = 2
    """Segments synthesized ahead of the one whose audio is being sent."""
    segments: SegmentPolicy = SegmentPolicy()
    codecs: CodecOptions = CodecOptions()


class SegmentAudio:
    """One segment's audio between its synthesis and the turn's sender: the engine's pieces, kept
    until the sender takes them a message's worth at a time.

    Appending wakes the sender only when what it waits for is there: a first piece, or (while the
    client is well ahead and the outbox lets audio wait to fill a message) a full message, the
    segment's end, or the deadline; so a piece costs no task switch of its own.
    """

    def __init__(self) -> None:
        self._pieces: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 1  # bytes that wake the waiter

    def append(self, piece: bytes) -> None:
        """A piece of PCM16 the engine made (never empty)."""
        self._pieces.append(piece)
        self._bytes += len(piece)
        if self._bytes >= self._wake_at:
            self._wake()

    def end(self, error: BaseException | None = None) -> None:
        """The segment's audio is complete, or failed with ``error``."""
        self._ended, self._error = True, error
        self._wake()

    @property
    def error(self) -> BaseException | None:
        """What failed the segment's synthesis, once it ended so."""
        return self._error

    async def take(self, limit: int, fill_until: float | None) -> bytes | None:
        """The next message's worth of audio: what waits, joined, at most ``limit`` bytes (an even
        number: a piece is cut between two samples to fill a message). Waits for a first piece; with
        ``fill_until`` (``time.monotonic``, which is also the event loop's clock), waits until then
        for a full message. None once the segment has ended; raises the engine's error (after the
        audio made before it). Safe to cancel (nothing is lost)."""
        while not self._pieces and not self._ended:
            await self._wait(1, None)
        if fill_until is not None and self._bytes < limit and not self._ended and time.monotonic() < fill_until:
            await self._wait(limit, fill_until)
        if not self._pieces:
            if self._error is not None:
                raise self._error
            return None
        taken: list[bytes] = []
        size = 0
        while self._pieces and size < limit:
            piece = self._pieces[0]
            room = limit - size
            if len(piece) <= room:
                self._pieces.popleft()
            else:
                piece, self._pieces[0] = piece[:room], piece[room:]
            taken.append(piece)
            size += len(piece)
        self._bytes -= size
        return taken[0] if len(taken) == 1 else b"".join(taken)

    async def _wait(self, wake_at: int, until: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_at = wake_at
        timer = None if until is None else loop.call_at(until, self._wake)
        try:
            await waiter
        finally:
            self._waiter, self._wake_at = None, 1
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Mark:
    """How far the turn's text has been captioned (handed to the outbox), for the sender to wait on:
    None, once no more caption will come (or none is sent), is as far as any segment goes."""

    def __init__(self, chars: int | None) -> None:
        self._chars = chars
        self._moved = asyncio.Event()

    def set_to(self, chars: int | None) -> None:
        self._chars = chars
        self._moved.set()

    async def reaches(self, chars: int) -> None:
        while self._chars is not None and self._chars < chars:
            self._moved.clear()
            await self._moved.wait()


@dataclass
class _Pending:
    """A segment on its way out: its synthesis task and the audio it produced so far (the turn's first
    spoken segment has neither: the sender synthesizes it and emits its audio as it comes)."""

    index: int
    segment: TextSegment
    spoken: str
    audio: SegmentAudio
    task: asyncio.Task[None] | None = None
    trim_lead: bool = False
    """The turn's first spoken segment: the listener waits for it in silence, so its synthesis is
    urgent, the sender runs it itself, and the engine's silence before the speech is dropped."""


class Turn:
    """Runs one turn. Create, then await :meth:`run` once."""

    def __init__(
        self,
        turn_id: str,
        text: AsyncGenerator[str | LLMUsage, None],
        *,
        tts: TTSEngine,
        voice: str,
        language: str,
        audio_format: AudioFormat,
        emit: Callable[[TextDelta | SegmentStarted | AudioPiece], Awaitable[None]],
        options: TurnOptions,
        piece_ms: int,
        stats: TurnStats,
        from_llm: bool,
        fill_until: Callable[[], float | None] = lambda: None,
        first_piece_ms: int = OutboxLimits.first_message_ms,
        pause_until: Callable[[], float | None] | None = None,
        text_deltas: bool = True,
    ) -> None:
        self.turn_id = turn_id
        self.text = ""
        """The turn's whole text so far (caption form)."""
        self.segments: list[SpokenSegment] = []
        """Every segment that has started to leave, with its audio timeline."""
        self._source = text
        self._tts = tts
        self._voice = voice
        self._language = language
        self._format = audio_format
        self._emit = emit
        self._options = options
        self._piece_ms = piece_ms
        self._piece_bytes = max(2, audio_format.sample_rate_hz * piece_ms // 1000 * 2)
        self._first_piece_bytes = max(2, audio_format.sample_rate_hz * min(piece_ms, first_piece_ms) // 1000 * 2)
        self._fill_until = fill_until
        self._pause_until = pause_until or fill_until  # (asks without fixing the deadline of a message)
        self._stats = stats
        self._from_llm = from_llm
        self._text_deltas = text_deltas  # (False: the client takes the text with each segment only)
        self._timeline_samples = 0
        self._encoder: StreamEncoder | None = None  # the turn's audio stream, begun with its first audio
        self._last_segment = 0
        self._spoke = False  # a segment with text to speak was scheduled
        # Look-ahead syntheses start once the first spoken segment has audio: before, they would take
        # cores (or a cloud engine's bandwidth) from the one the listener is waiting for.
        self._first_spoken = asyncio.Event()
        self._captioned = _Mark(0 if text_deltas else None)

    async def run(self) -> None:
        """Run the turn to its end.

        Safe to cancel: cancelling stops the text source and every synthesis in progress at once.
        Raises :class:`service.errors.EngineError` when an engine fails.
        """
        ready: asyncio.Queue[_Pending | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._options.lookahead + 1)
        pending: list[_Pending] = []
        reading_failed: Exception | None = None
        try:
            # The text is read in this task, so that the LLM's request leaves in the turn's first step
            # (a task of its own would start it one round of the event loop later, on the way to the
            # first audio); the sender waits for the first segment anyway. The sender failing stops
            # the reading at once (the group cancels this task); the reading failing lets the sender
            # say what was already cut into segments, and then fails the turn.
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send_in_order(ready, slots), name=f"send {self.turn_id}")
                try:
                    await self._produce(ready, slots, pending)
                except Exception as error:  # (its end was queued: the sender ends after what it has)
                    reading_failed = error
            if reading_failed is not None:
                raise reading_failed
            if self._encoder is not None and (tail := await self._finish_encoding(self._encoder)):
                await self._emit(AudioPiece(self.turn_id, self._last_segment, tail, 0.0))  # the stream's end
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None
        finally:
            reading_failed = None  # (the error's traceback holds this frame: a cycle, if the turn is stopped)
            tasks = [item.task for item in pending if item.task is not None]
            if running := [task for task in tasks if not task.done()]:  # (none, for a turn that ran to its end)
                for task in running:
                    task.cancel()
                await asyncio.wait(running)
            for task in tasks:  # (a cancelled synthesis's frames hold its segment, which holds the task)
                discard_outcome(task)

    async def _produce(
        self, ready: asyncio.Queue[_Pending | None], slots: asyncio.Semaphore, pending: list[_Pending]
    ) -> None:
        """Read the text, emit captions, cut segments and start their synthesis (look-ahead bound)."""
        segmenter = Segmenter(self._options.segments)
        # (Not the current span: the syntheses it starts are the turn's children, beside it.)
        traced = span("parley.llm" if self._from_llm else "parley.text", {"parley.turn": self.turn_id}, current=False)
        try:
            with traced:
                async with contextlib.aclosing(self._source) as source:
                    async for delta in source:
                        if isinstance(delta, LLMUsage):
                            self._stats.usage = delta
                            continue
                        if not delta:
                            continue
                        if self._from_llm and self._stats.first_llm_token is None:
                            self._stats.first_llm_token = time.monotonic()
                        self.text += delta
                        caption_put = not self._text_deltas  # (this delta's)
                        for start in range(0, len(delta), SEGMENTER_SLICE_CHARS):
                            if start:
                                await asyncio.sleep(0)  # a long delta never holds the event loop for long
                            cut = segmenter.push(delta[start : start + SEGMENTER_SLICE_CHARS])
                            # What the delta completes is started and handed to the sender before the
                            # delta's caption is handed on: the caption wakes the stream's writer, whose
                            # write would otherwise run before the TTS request is sent. (The sender
                            # starts a segment only once its caption has been handed on.)
                            items = await self._schedule(cut, slots, pending, wait=False)
                            for item in items:
                                ready.put_nowait(item)
                            if not caption_put:
                                caption_put = True
                                for at in range(0, len(delta), MAX_CAPTION_CHARS):  # (a long delta goes as several)
                                    await self._emit(TextDelta(self.turn_id, delta[at : at + MAX_CAPTION_CHARS]))
                                self._captioned.set_to(len(self.text))
                            await self._hand_over(cut[len(items) :], ready, slots, pending)
            await self._hand_over(segmenter.flush(), ready, slots, pending)
        finally:
            self._captioned.set_to(None)  # (no more caption: whatever comes of the text is what there is)
            ready.put_nowait(None)

    async def _schedule(
        self, segments: list[TextSegment], slots: asyncio.Semaphore, pending: list[_Pending], *, wait: bool
    ) -> list[_Pending]:
        """Start the synthesis of ``segments`` in order, each in a look-ahead slot: waiting for one to
        free (``wait``), or up to the first that finds none free. The segments started."""
        started: list[_Pending] = []
        for segment in segments:
            if slots.locked() and not wait:
                break
            await slots.acquire()
            if self._stats.first_segment is None:
                self._stats.first_segment = time.monotonic()
            spoken = speakable(segment.text, self._language)
            if segment.open_end and spoken[-1:].isalnum():
                spoken += ","  # a head of a sentence: read as going on, not as a finished statement
            item = _Pending(len(pending), segment, spoken, SegmentAudio(), trim_lead=not self._spoke)
            self._spoke = self._spoke or bool(spoken)
            if not item.spoken:
                item.audio.end()
            elif not item.trim_lead:  # (the first spoken segment is synthesized by the sender itself)
                item.task = asyncio.create_task(self._synthesize(item), name=f"tts {self.turn_id}/{item.index}")
            pending.append(item)
            started.append(item)
        return started

    async def _hand_over(
        self,
        segments: list[TextSegment],
        ready: asyncio.Queue[_Pending | None],
        slots: asyncio.Semaphore,
        pending: list[_Pending],
    ) -> None:
        """Start ``segments`` and give them to the sender one by one, as look-ahead slots free (the
        sender frees them as it goes)."""
        for segment in segments:
            (item,) = await self._schedule([segment], slots, pending, wait=True)
            ready.put_nowait(item)

    async def _synthesize(self, item: _Pending) -> None:
        """A look-ahead segment's task: synthesize it into its audio (in a ``parley.tts`` span), which
        always ends, with or without an error. It waits for the first spoken segment to have audio."""
        await self._first_spoken.wait()
        with self._tts_span(item) as traced:
            try:
                async with contextlib.aclosing(self._spoken_pieces(item)) as pieces:
                    async for piece in pieces:
                        item.audio.append(piece)
                item.audio.end()
            except TTSError as error:
                drop_tracebacks(error)  # (said by its text alone; its frames hold this segment, which holds it)
                item.audio.end(error)
            fail_span(traced, item.audio.error)  # (a failure ends the segment's audio, not the task)

    async def _speak_head(self, item: _Pending, spoken: SpokenSegment) -> None:
        """The first spoken segment, synthesized by the sender itself (in a ``parley.tts`` span), its
        pieces emitted as they come: the listener waits for them in silence, and handing them over
        from a task of their own would cost a task switch on the way to the first audio. (The outbox
        still gathers them into messages while the client is well ahead.) Raises the engine's
        :class:`TTSError` after what it made before it."""
        with self._tts_span(item) as traced:
            try:
                async with contextlib.aclosing(self._spoken_pieces(item)) as pieces:
                    async for piece in pieces:
                        while piece:  # (the turn's first message holds at most ``first_piece_ms``)
                            limit = self._take_limit()
                            await self._emit_audio(item.index, piece[:limit])
                            piece = piece[limit:]
                            spoken.duration_ms = self._format.duration_ms(self._timeline_samples) - spoken.start_ms
            except TTSError as error:
                fail_span(traced, error)
                raise

    def _tts_span(self, item: _Pending) -> contextlib.AbstractContextManager[Any]:
        """The ``parley.tts`` span of a segment's synthesis."""
        return span(
            "parley.tts", {"parley.turn": self.turn_id, "parley.segment": item.index, "parley.chars": len(item.spoken)}
        )

    async def _spoken_pieces(self, item: _Pending) -> AsyncGenerator[bytes, None]:
        """A segment's audio from the engine, resampled to the client's rate, in pieces of at most a
        message's worth (PCM16; the first spoken segment without the engine's silence before its
        speech). Raises :class:`TTSError` (an engine's bug too, logged). Close it (``aclosing``)."""
        encoder: SegmentEncoder | None = None
        silence: LeadingSilence | None = None
        unpaused_ms = 0.0
        try:
            speech = self._tts.synthesize(item.spoken, self._voice, urgent=item.trim_lead)
            async with contextlib.aclosing(speech) as audio:
                async for chunk in audio:
                    if encoder is None:
                        encoder = SegmentEncoder(chunk.sample_rate_hz, self._format.sample_rate_hz, self._piece_ms)
                        silence = LeadingSilence(chunk.sample_rate_hz) if item.trim_lead else None
                    elif chunk.sample_rate_hz != encoder.in_rate:
                        raise TTSError("the TTS engine changed its sample rate within a segment")
                    if item.trim_lead:
                        self._first_spoken.set()
                    pcm = chunk.pcm if silence is None else silence.feed(chunk.pcm)
                    for piece in encoder.feed(pcm):
                        yield piece
                    unpaused_ms += len(chunk.pcm) * 500 / chunk.sample_rate_hz
                    if unpaused_ms >= min(self._piece_ms, READ_ROUND_MS):  # a round's worth read
                        await self._read_pause(unpaused_ms)
                        unpaused_ms = 0.0
            if encoder is not None:
                for piece in encoder.finish():
                    yield piece
        except TTSError:
            raise
        except Exception as error:  # an engine bug must still end the turn cleanly
            log.exception("TTS engine failed on segment %d of turn %s", item.index, self.turn_id)
            raise TTSError(f"the TTS engine failed: {type(error).__name__}") from None
        finally:
            if item.trim_lead:
                self._first_spoken.set()

    async def _read_pause(self, read_ms: float) -> None:
        """After ``read_ms`` of audio read from a TTS engine since the last pause (a round: at least
        ``READ_ROUND_MS``, or a message's worth if that is less): while the client is well ahead (the
        outbox lets audio wait to fill a message), wait half that time, at most half a message's,
        so that the next read takes what the engine made meanwhile at once (a network stream's
        buffered bytes, a merged chunk) instead of costing the event loop a task switch per small
        chunk; rounds grow as the engine gets ahead, and an engine that hands over only small chunks
        is still read at twice real time. It ends ``READ_BEFORE_DEADLINE_S`` before the message being
        gathered must leave (the client would then hold only the fill lead), so that what the engine
        made meanwhile is read in time to go with it."""
        fill_until = self._pause_until()
        if fill_until is not None:
            left = fill_until - time.monotonic() - READ_BEFORE_DEADLINE_S
            await asyncio.sleep(min(left, read_ms / 2000, self._piece_ms / 2000))

    async def _send_in_order(self, ready: asyncio.Queue[_Pending | None], slots: asyncio.Semaphore) -> None:
        """Emit each segment and its audio strictly in order: what exists of it at once, or, while the
        outbox lets audio wait to fill a message (the client is well ahead), a message's worth at a time."""
        while (item := await ready.get()) is not None:
            await self._captioned.reaches(item.segment.end)  # (clients find a segment's text in the captions)
            start_ms = round(self._format.duration_ms(self._timeline_samples))
            spoken = SpokenSegment(item.segment.start, item.segment.end, float(start_ms))
            self.segments.append(spoken)
            await self._emit(SegmentStarted(self.turn_id, item.index, item.segment.text, item.spoken, start_ms))
            if item.spoken and item.task is None:
                await self._speak_head(item, spoken)
            else:
                while (piece := await item.audio.take(self._take_limit(), self._fill_until())) is not None:
                    await self._emit_audio(item.index, piece)
                    spoken.duration_ms = self._format.duration_ms(self._timeline_samples) - start_ms
            spoken.complete = True
            slots.release()

    def _take_limit(self) -> int:
        """The most audio to take at once, in bytes: a message's worth; for the turn's first message,
        ``first_message_ms``'s worth (an engine's first chunk may be a whole sentence)."""
        if self._timeline_samples:
            return self._piece_bytes
        return self._first_piece_bytes

    @staticmethod
    async def _finish_encoding(encoder: StreamEncoder) -> bytes:
        if not encoder.offload:
            return encoder.finish()
        return await asyncio.get_running_loop().run_in_executor(_CODEC_POOL, encoder.finish)

    async def _emit_audio(self, segment_index: int, data: bytes) -> None:
        count = len(data) // 2
        if self._encoder is None:
            self._encoder = stream_encoder(self._format, self._options.codecs)
        if self._encoder.offload:
            # Opus and MP3 take 2 to 3 ms per piece (FFmpeg, without the GIL): off the event loop, so
            # that the pieces of a segment, ready at once, do not hold it while the first one waits to leave.
            data = await asyncio.get_running_loop().run_in_executor(_CODEC_POOL, self._encoder.encode, data)
        else:
            data = self._encoder.encode(data)
        self._timeline_samples += count
        self._last_segment = segment_index
        # (A codec may hold part of a frame: the piece then carries fewer bytes than its duration,
        # and the next piece or the stream's end the rest; the timeline is the PCM's.)
        await self._emit(AudioPiece(self.turn_id, segment_index, data, self._format.duration_ms(count)))


def _first_error(failed: BaseExceptionGroup[BaseException]) -> BaseException:
    """What failed a turn's reading or sending (the other was then cancelled, so there is one error
    but for a race; a second is logged, not lost). The group holds their own errors, never a group."""
    first, *others = failed.exceptions
    for other in others:
        log.warning("a turn's second error, as it failed", exc_info=other)
    return first


class TurnState(enum.Enum):
    TENTATIVE = "tentative"
    """A reply to an utterance the user may not have finished (they paused): it runs, but its outlet
    is held and it is not in the history; it becomes RUNNING when the pause proves to be the end, or is
    discarded without a trace."""
    OPEN = "open"
    """A speak turn still taking text."""
    RUNNING = "running"
    """Its text is complete (or comes from the LLM) and its pipeline runs."""
    ENDED = "ended"


@dataclass(frozen=True)
class TurnOutcome:
    """How a turn ended."""

    reason: TurnEndReason
    spoken: str
    in_history: bool
    """Its reply is the last assistant message of the history (so an interrupt may still cut it)."""


class TurnRecord:
    """One turn: its pipeline, its task, its way out, and where it stands."""

    def __init__(
        self,
        pipeline: Turn,
        outlet: Outlet,
        stats: TurnStats,
        user_text: str | None,
        speak_input: asyncio.Queue[str | None],
        *,
        tentative: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.outlet = outlet
        self.stats = stats
        self.user_text = user_text
        """The user's message; None for a speak turn."""
        self.state = TurnState.RUNNING if user_text is not None else TurnState.OPEN
        if tentative:
            self.state = TurnState.TENTATIVE
        self.outcome: TurnOutcome | None = None
        self.trimmed = False
        """Its reply in the history was cut to what the client heard (perhaps by an estimate)."""
        self.finished: tuple[BaseException | None] | None = None
        """A tentative turn whose pipeline finished before it was confirmed: how (its error)."""
        self.speak_input = speak_input
        """Where a speak turn's text goes (a None after the last piece ends it)."""
        self.speak_chars = 0
        self.task: asyncio.Task[None] | None = None
        self.span: Any = None
        """Its ``parley.turn`` span, once its task opened it (None without tracing)."""

    @property
    def turn_id(self) -> str:
        return self.pipeline.turn_id

    def close_input(self) -> None:
        """A speak turn's text is complete (OPEN → RUNNING)."""
        if self.state is TurnState.OPEN:
            self.speak_input.put_nowait(None)
            self.state = TurnState.RUNNING

    def confirm(self) -> None:
        """TENTATIVE → RUNNING: the user had finished."""
        assert self.state is TurnState.TENTATIVE
        self.state = TurnState.RUNNING

    def discard(self) -> None:
        """TENTATIVE → ENDED, with no outcome: the user was not done; nothing of the turn left, or stays."""
        assert self.state is TurnState.TENTATIVE
        self.state = TurnState.ENDED

    def end(self, outcome: TurnOutcome) -> None:
        """The one transition to ENDED."""
        assert self.state is not TurnState.ENDED, f"turn {self.turn_id} ended twice"
        self.state, self.outcome = TurnState.ENDED, outcome

    async def stop(self) -> None:
        """Cancel the pipeline and wait until it has stopped (its engine streams are closed).

        A cancelled task keeps its cancellation, whose traceback's frames hold the task (through the
        pipeline's task group) and this record: reference cycles that only the garbage collector
        would free, with the turn's text, segments and audio state, in collections of its older
        generations that hold the event loop for tens of milliseconds once hundreds of streams leave
        such cycles. So the outcome is dropped and the task let go."""
        if self.task is None:
            return  # (stopped already)
        self.task.cancel()
        await asyncio.wait({self.task})
        task, self.task = self.task, None
        discard_outcome(task)


class NoteFilter:
    """Drops the history's notes ("[interrupted: …]") from a model's output, as a last line of
    defence: a model that repeats one must not have it spoken or captioned. Incremental: text that may
    be the start of a note is held (at most ``MAX_NOTE_CHARS``) until it is or is not one."""

    MAX_NOTE_CHARS = 96
    _WORD = "interrupted"

    def __init__(self) -> None:
        self._held = ""

    def feed(self, delta: str) -> str:
        text, self._held = self._held + delta, ""
        out: list[str] = []
        pos = 0
        while (bracket := text.find("[", pos)) >= 0:
            out.append(text[pos:bracket])
            verdict = self._note_at(text, bracket)
            if verdict is None:  # may still become a note
                self._held = text[bracket:]
                return "".join(out)
            if verdict == 0:
                out.append("[")
                pos = bracket + 1
            else:
                pos = bracket + verdict
        out.append(text[pos:])
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _note_at(self, text: str, start: int) -> int | None:
        """The length of the note at ``start``, 0 if there is none, None while it cannot be told."""
        rest = text[start + 1 : start + self.MAX_NOTE_CHARS]
        head = rest[: len(self._WORD)].lower()
        if not self._WORD.startswith(head):
            return 0
        if len(head) < len(self._WORD):
            return None
        close = rest.find("]")
        if close >= 0 and "\n" not in rest[:close]:
            return close + 2
        if "\n" in rest or len(rest) >= self.MAX_NOTE_CHARS - 1:
            return 0
        return None


async def llm_deltas(llm: LLMEngine, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
    """The LLM's stream, opened inside the turn so that even opening it fails the turn, not the
    stream, with the history's notes taken out (:class:`NoteFilter`)."""
    notes = NoteFilter()
    async with contextlib.aclosing(llm.stream(request)) as stream:
        async for delta in stream:
            if isinstance(delta, str):
                delta = notes.feed(delta)
                if not delta:
                    continue
            yield delta
    if rest := notes.flush():
        yield rest


async def queued_deltas(queue: asyncio.Queue[str | None]) -> AsyncGenerator[str, None]:
    """A speak turn's text, as the client sends it, until a None."""
    while (text := await queue.get()) is not None:
        yield text
