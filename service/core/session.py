"""A conversation session: client commands in, events out.

The session validates what the client sends, runs one :class:`~service.core.turn.Turn` at a time,
interrupts a turn on barge-in, keeps the conversation history (only what was heard), and queues the
events the transport must send. It knows nothing of gRPC: the servicer feeds it commands and drains
:meth:`Session.next_event`, telling it with :meth:`Session.mark_sent` what went out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from service.core.audio import AudioFormat, Encoding
from service.core.engine import LLMEngine, LLMRequest, LLMUsage, TTSEngine
from service.core.event_queue import EventQueue
from service.core.events import AudioChunk, Event, SessionStarted, TextDelta, TurnEnded, TurnEndReason, TurnStats
from service.core.history import Conversation, HistoryLimits, heard_text
from service.core.opening import Opened, StartRequest, check_length, open_session
from service.core.store import SessionStore
from service.core.turn import Turn, TurnOptions
from service.errors import EngineError, InvalidRequest, StoreUnavailable

__all__ = ["SessionDefaults", "Session", "StartRequest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionDefaults:
    """Server-side defaults and limits for every session."""

    system_prompt: str = "You are Parley, a friendly voice assistant. Answer briefly, in plain spoken sentences."
    temperature: float = 0.7
    max_tokens: int = 256
    max_text_chars: int = 4000
    buffered_events: int = 32
    turn: TurnOptions = TurnOptions()
    history: HistoryLimits = HistoryLimits()


@dataclass
class _ActiveTurn:
    turn: Turn
    stats: TurnStats
    user_text: str | None
    """The user's message; None for a speak turn."""
    speak_input: asyncio.Queue[str | None] | None = None
    """Where a speak turn's deltas go; None once flushed (and for LLM turns)."""
    speak_chars: int = 0
    finished: bool = False
    """No longer to end by itself: it completed, failed, or is being stopped."""
    recorded: bool = False
    """Its exchange is in the (in-memory) history."""
    played_ms: int | None = None
    """How much of it the client said it played, when it interrupted."""
    end_queued: asyncio.Event = field(default_factory=asyncio.Event)
    """Its TurnEnded is in the event queue (after its history was written, when it ended by itself)."""
    sent_audio_messages: int = 0
    reply_recorded: bool = False
    """The turn's reply is the last assistant message of the history."""
    task: asyncio.Task[None] | None = None


async def _cancel(active: _ActiveTurn) -> None:
    """Cancel a turn's task and wait until it has stopped."""
    assert active.task is not None
    active.task.cancel()
    await _stopped(active.task)


async def _stopped(task: asyncio.Task[None]) -> None:
    """Wait for ``task`` to end. Cancelling the wait does not cancel the task (unlike awaiting it)."""
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: the turn logs its own failures


async def _llm_deltas(llm: LLMEngine, request: LLMRequest) -> AsyncIterator[str | LLMUsage]:
    """The LLM's stream, opened inside the turn so that even opening it fails the turn, not the stream."""
    stream = llm.stream(request)
    try:
        async for delta in stream:
            yield delta
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _deltas(queue: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (text := await queue.get()) is not None:
        yield text


class Session:
    """One client's conversation. Use from a single event loop; commands are awaited in order."""

    def __init__(self, llm: LLMEngine, tts: TTSEngine, defaults: SessionDefaults, store: SessionStore) -> None:
        self._llm = llm
        self._tts = tts
        self._defaults = defaults
        self._store = store
        self._opened: Opened | None = None
        self._claimed = asyncio.Event()
        self._persisting = asyncio.Lock()
        self._changes = 0  # history and settings changes so far...
        self._saved_changes = 0  # ... and how many of them the store has
        self._max_merge_ms = float(defaults.turn.chunk_ms)
        self._events = EventQueue(defaults.buffered_events)
        self._started = False
        self._conversation = Conversation("")
        self._voice = ""
        self._format = AudioFormat(Encoding.PCM16, 0)
        self._temperature = defaults.temperature
        self._max_tokens = defaults.max_tokens
        self._turns_started = 0
        self._active: _ActiveTurn | None = None
        self._last: _ActiveTurn | None = None
        self._recent: collections.deque[_ActiveTurn] = collections.deque(maxlen=4)
        self._used_turn_ids: set[str] = set()
        self.last_activity = time.monotonic()
        self.session_id = ""

    # -- commands ----------------------------------------------------------------------------------

    async def start(self, request: StartRequest) -> None:
        """Open the session: a new one, or the stored one ``request.session_id`` names.

        Raises :class:`InvalidRequest` (already open, bad options), :class:`SessionNotFound` or
        :class:`StoreUnavailable`.
        """
        if self._started:
            raise InvalidRequest("`start` was already sent; send it only once, as the first message")
        opened = await open_session(
            request,
            self._tts,
            self._store,
            default_system_prompt=self._defaults.system_prompt,
            max_chars=self._defaults.max_text_chars,
        )
        self._started = True
        self._opened = opened
        self._claimed.set()
        stored = opened.stored
        self.session_id = stored.session_id
        self._turns_started = stored.turns_started
        self._voice = stored.voice
        self._format = opened.audio
        self._conversation = Conversation(stored.system_prompt, list(stored.entries), self._defaults.history)
        if stored.temperature is not None:
            self._temperature = stored.temperature
        if stored.max_tokens is not None:
            self._max_tokens = min(stored.max_tokens, self._defaults.max_tokens)
        self._events.put_control(
            SessionStarted(self.session_id, self._format, self._voice, self._llm.name, self._tts.name)
        )
        if opened.resumed and opened.changed:
            self._changes += 1
            await self._persist()  # a new voice or prompt holds from now, even if no turn follows

    async def taken_over(self) -> None:
        """Return when another stream has taken this session over. Safe to cancel."""
        await self._claimed.wait()
        assert self._opened is not None
        await self._opened.claim.lost.wait()

    async def user_text(self, text: str, turn_id: str = "") -> None:
        """Answer ``text``: interrupts any turn in progress, then starts an LLM turn."""
        self._require_started("user_text")
        if not text.strip():
            raise InvalidRequest("user_text.text is empty; send the message to answer")
        check_length(text, "user_text.text", self._defaults.max_text_chars)
        self._check_turn_id(turn_id, "user_text.turn_id")
        await self.interrupt(None)
        if self._events.closed:
            return  # the stream is ending (the server shuts down): no new turn
        request = LLMRequest(self._conversation.request_messages(text), self._temperature, self._max_tokens)
        self._begin(turn_id, _llm_deltas(self._llm, request), user_text=text)

    async def speak_text(self, text: str, flush: bool, turn_id: str = "") -> None:
        """Read ``text`` aloud. Extends the open speak turn, or starts one (interrupting any other)."""
        self._require_started("speak_text")
        if not text and not flush:
            raise InvalidRequest("speak_text.text is empty; send text, or set flush to end the speak turn")
        check_length(text, "speak_text.text", self._defaults.max_text_chars)
        active = self._active
        if active is None or active.speak_input is None:
            if not text:
                raise InvalidRequest(
                    "speak_text.text is empty and no speak turn is open to flush; send the text to read aloud"
                )
            self._check_turn_id(turn_id, "speak_text.turn_id")
            await self.interrupt(None)
            if self._events.closed:
                return  # the stream is ending (the server shuts down): no new turn
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            active = self._begin(turn_id, _deltas(queue), user_text=None, speak_input=queue)
        assert active.speak_input is not None
        if active.speak_chars + len(text) > self._defaults.max_text_chars:
            raise InvalidRequest(
                f"the speak turn's text would be over {self._defaults.max_text_chars} characters; "
                "flush it and start another"
            )
        active.speak_chars += len(text)
        if text:
            active.speak_input.put_nowait(text)
        if flush:
            active.speak_input.put_nowait(None)
            active.speak_input = None

    async def interrupt(self, played_ms: int | None) -> None:
        """Stop the turn in progress at once (its text source and synthesis are cancelled).

        With no turn in progress, the last turn is the one the client hears: audio of it still queued is
        dropped (its end becomes INTERRUPTED if not yet sent), and ``played_ms`` trims its history.
        Safe to cancel.
        """
        self._require_started("interrupt")
        active = self._active
        if active is None:
            if self._last is not None:
                await self._last.end_queued.wait()  # (its history may still be being written)
                await self._interrupt_last(self._last, played_ms)
            return
        active.finished = True
        active.played_ms = played_ms
        self._events.purge(active.turn.turn_id)  # nothing more of it leaves, even while it stops
        await _cancel(active)
        await self._record_interrupted(active)

    async def _record_interrupted(self, active: _ActiveTurn) -> None:
        """Put a stopped turn in the history as heard (to ``played_ms``, at most what was sent)."""
        if self._active is active:
            self._active = None
        if active.recorded:
            return
        sent_ms = active.stats.audio_ms_sent
        heard_ms = sent_ms if active.played_ms is None else min(active.played_ms, sent_ms)
        spoken = heard_text(active.turn.text, active.turn.segments, heard_ms)
        await self._finish(active, TurnEndReason.INTERRUPTED, spoken)

    async def finish(self) -> None:
        """The client is done sending: let the turn in progress end, then close the event stream."""
        active = self._active
        if active is not None:
            if active.speak_input is not None:
                active.speak_input.put_nowait(None)
                active.speak_input = None
            assert active.task is not None
            await _stopped(active.task)  # if this wait is cancelled, aclose stops the turn and records it
        if self._last is not None:
            await self._last.end_queued.wait()  # a turn that ended by itself may still be writing its history
        self._events.close()

    async def aclose(self) -> None:
        """The stream is over: let go of the session (it stays stored). Safe to call twice.

        A turn still running stops at once and is kept in the history as interrupted, with the text of
        the audio that was sent (a dropped connection is a barge-in whose cut the client could not
        report); history still being written is written before the session is let go.
        """
        owned = self._opened is not None and not self._opened.claim.lost.is_set()
        active = self._active
        if active is not None and not active.recorded:
            active.finished = True
            self._events.purge(active.turn.turn_id)
            await _cancel(active)
            if owned:
                await self._record_interrupted(active)
        self._active = None
        if owned and self._saved_changes < self._changes:
            # Changes whose write was cancelled (or is still under way) are written before letting go.
            await self._persist()
        self._events.close()
        if self._opened is not None:
            await self._store.release(self._opened.claim)

    # -- the transport's side ----------------------------------------------------------------------

    async def next_event(self) -> Event | None:
        """The next event to send, or None when the stream is over. Safe to cancel.

        Audio of one segment that queued up while the transport was busy leaves as one message (up to
        the longest audio message), so a loaded server sends fewer, larger messages; an idle one sends
        each chunk as soon as it exists. Audio messages are numbered here, gap-free per turn.
        """
        event = await self._events.get()
        if isinstance(event, TextDelta):
            following_text = self._events.take_text(event.turn_id)
            return TextDelta(event.turn_id, "".join([event.text, *following_text])) if following_text else event
        if not isinstance(event, AudioChunk):
            return event
        following = self._events.take_audio(event.turn_id, event.segment_index, self._max_merge_ms - event.duration_ms)
        active = self._turn_of(event.turn_id)
        sequence = 0
        if active is not None:
            sequence, active.sent_audio_messages = active.sent_audio_messages, active.sent_audio_messages + 1
        if not following:
            return AudioChunk(event.turn_id, event.segment_index, sequence, event.data, event.duration_ms)
        data = b"".join([event.data, *(e.data for e in following)])
        duration = event.duration_ms + sum(e.duration_ms for e in following)
        return AudioChunk(event.turn_id, event.segment_index, sequence, data, duration)

    def mark_sent(self, event: Event) -> None:
        """Record that ``event`` is being handed to the transport (call before writing it)."""
        if isinstance(event, AudioChunk):
            stats = self._stats_of(event.turn_id)
            if stats is not None:
                if stats.first_audio is None:
                    stats.first_audio = time.monotonic()
                stats.audio_ms_sent += event.duration_ms
        elif isinstance(event, TurnEnded):
            event.stats.ended = time.monotonic()

    @property
    def busy(self) -> bool:
        """A turn is in progress and not waiting for the client (an open speak turn waits)."""
        return self._active is not None and self._active.speak_input is None

    # -- internals ---------------------------------------------------------------------------------

    def _begin(
        self,
        turn_id: str,
        text: AsyncIterator[str | LLMUsage],
        *,
        user_text: str | None,
        speak_input: asyncio.Queue[str | None] | None = None,
    ) -> _ActiveTurn:
        while not turn_id or turn_id in self._used_turn_ids:
            self._turns_started += 1
            turn_id = f"turn-{self._turns_started}"
        self._used_turn_ids.add(turn_id)
        stats = TurnStats()
        turn = Turn(
            turn_id,
            text,
            tts=self._tts,
            voice=self._voice,
            audio_format=self._format,
            emit=self._events.put,
            options=self._defaults.turn,
            stats=stats,
            from_llm=user_text is not None,
        )
        active = _ActiveTurn(turn, stats, user_text, speak_input)
        active.task = asyncio.create_task(self._run(active), name=f"turn {turn_id}")
        self._active = active
        self._recent.append(active)
        return active

    async def _run(self, active: _ActiveTurn) -> None:
        turn_id = active.turn.turn_id
        try:
            await active.turn.run()
        except EngineError as error:
            log.warning("turn %s failed: %s", turn_id, error)
            await self._end_by_itself(active, TurnEndReason.FAILED, str(error))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("turn %s failed unexpectedly", turn_id)
            await self._end_by_itself(active, TurnEndReason.FAILED, "internal error; see the server log")
        else:
            await self._end_by_itself(active, TurnEndReason.COMPLETED, "")

    async def _end_by_itself(self, active: _ActiveTurn, reason: TurnEndReason, error: str) -> None:
        if active.finished:
            return
        self._active = None
        if reason is TurnEndReason.COMPLETED:
            spoken = active.turn.text.strip()
        else:
            spoken = heard_text(active.turn.text, active.turn.segments, float("inf"))
        await self._finish(active, reason, spoken, error)

    async def _finish(self, active: _ActiveTurn, reason: TurnEndReason, spoken: str, error: str = "") -> None:
        active.finished = True
        active.recorded = True
        self._changes += 1
        cut_short = reason is TurnEndReason.INTERRUPTED
        if active.user_text is not None:
            self._conversation.add_exchange(active.user_text, spoken, interrupted=cut_short)
            active.reply_recorded = True
        else:
            active.reply_recorded = self._conversation.add_spoken(spoken, interrupted=cut_short)
        self._last = active
        self.last_activity = time.monotonic()
        ended = TurnEnded(active.turn.turn_id, reason, spoken, active.stats, error)
        if cut_short:
            # A barge-in's next turn must not wait for the store: say it ended, then write it.
            self._events.put_control(ended)
            active.end_queued.set()
            await self._persist()
            return
        try:
            # Written first, so that a client that saw turn_ended finds the turn on every replica, even if
            # this one dies the next instant.
            await self._persist()
        finally:
            self._events.put_control(ended)
            active.end_queued.set()

    async def _persist(self) -> None:
        """Write the session to the store (the latest state wins; writes never overlap)."""
        opened = self._opened
        if opened is None:
            return
        async with self._persisting:
            stored = opened.stored
            stored.entries = list(self._conversation.entries)
            stored.turns_started = self._turns_started
            changes = self._changes
            try:
                await self._store.save(stored, opened.claim)
                self._saved_changes = max(self._saved_changes, changes)
            except StoreUnavailable as error:
                log.error("session %s: the turn ended but its history was not saved: %s", self.session_id[:8], error)

    async def _interrupt_last(self, last: _ActiveTurn, played_ms: int | None) -> None:
        """Interrupt a turn that ended on the server while the client may still be hearing it."""
        dropped = self._events.purge(last.turn.turn_id)
        unsent_end = next((e for e in dropped if isinstance(e, TurnEnded)), None)
        if unsent_end is None and played_ms is None:
            return  # everything was sent and the client says nothing of what it played
        if unsent_end is not None and unsent_end.reason is TurnEndReason.INTERRUPTED and played_ms is None:
            self._events.put_control(unsent_end)  # already cut to what was heard: keep that
            return
        heard_ms = last.stats.audio_ms_sent if played_ms is None else min(played_ms, last.stats.audio_ms_sent)
        spoken = heard_text(last.turn.text, last.turn.segments, heard_ms)
        if last.reply_recorded:
            self._conversation.trim_last_reply(spoken)
            self._changes += 1
        self._last = None
        if unsent_end is not None:
            self._events.put_control(
                TurnEnded(last.turn.turn_id, TurnEndReason.INTERRUPTED, spoken, last.stats, unsent_end.error)
            )
        await self._persist()

    def _stats_of(self, turn_id: str) -> TurnStats | None:
        active = self._turn_of(turn_id)
        return None if active is None else active.stats

    def _turn_of(self, turn_id: str) -> _ActiveTurn | None:
        for candidate in reversed(self._recent):
            if candidate.turn.turn_id == turn_id:
                return candidate
        return None

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise InvalidRequest(f"send `start` before `{what}`: the first message of a stream must be `start`")

    def _check_turn_id(self, turn_id: str, field: str) -> None:
        if len(turn_id) > 128:
            raise InvalidRequest(f"{field} is {len(turn_id)} characters; use at most 128")
        if turn_id in self._used_turn_ids:
            raise InvalidRequest(f"{field} {turn_id!r} was already used in this session; turn ids must be unique")
