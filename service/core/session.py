"""A conversation session: client commands in, events out.

The session validates what the client sends, runs one :class:`~service.core.turn.Turn` at a time,
interrupts a turn on barge-in, keeps the conversation history (only what was heard), and queues the
events the transport must send. It knows nothing of gRPC: the servicer feeds it commands and drains
:meth:`Session.next_event`, telling it with :meth:`Session.mark_sent` what went out.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.core.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, AudioFormat, Encoding
from service.core.engine import LLMEngine, LLMRequest, LLMUsage, TTSEngine
from service.core.event_queue import EventQueue
from service.core.events import AudioChunk, Event, SessionStarted, TurnEnded, TurnEndReason, TurnStats
from service.core.history import Conversation, heard_text
from service.core.turn import Turn, TurnOptions
from service.errors import EngineError, InvalidRequest

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


@dataclass(frozen=True)
class StartRequest:
    """What the client asked for when opening the session (empty or None: the default)."""

    session_id: str = ""
    system_prompt: str = ""
    voice: str = ""
    encoding: Encoding = Encoding.PCM16
    sample_rate_hz: int = 0
    temperature: float | None = None
    max_tokens: int | None = None


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
    reply_recorded: bool = False
    """The turn's reply is the last assistant message of the history."""
    task: asyncio.Task[None] | None = None


async def _cancel(active: _ActiveTurn) -> None:
    """Cancel a turn's task and wait until it has stopped."""
    assert active.task is not None
    active.task.cancel()
    await asyncio.gather(active.task, return_exceptions=True)


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

    def __init__(self, llm: LLMEngine, tts: TTSEngine, defaults: SessionDefaults) -> None:
        self._llm = llm
        self._tts = tts
        self._defaults = defaults
        self._events = EventQueue(defaults.buffered_events)
        self._started = False
        self._conversation = Conversation("")
        self._voice = ""
        self._format = AudioFormat(Encoding.PCM16, 0)
        self._temperature = defaults.temperature
        self._max_tokens = defaults.max_tokens
        self._turn_numbers = itertools.count(1)
        self._active: _ActiveTurn | None = None
        self._last: _ActiveTurn | None = None
        self._recent: collections.deque[_ActiveTurn] = collections.deque(maxlen=4)
        self._used_turn_ids: set[str] = set()
        self.last_activity = time.monotonic()
        self.session_id = ""

    # -- commands ----------------------------------------------------------------------------------

    def start(self, request: StartRequest) -> None:
        """Open the session. Raises :class:`InvalidRequest` if it is already open or asks for the
        impossible."""
        if self._started:
            raise InvalidRequest("`start` was already sent; send it only once, as the first message")
        if request.session_id:
            raise InvalidRequest("resuming a session is not supported yet; leave `start.session_id` empty")
        voices = {voice.id: voice for voice in self._tts.voices()}
        voice_id = request.voice or self._tts.default_voice
        if voice_id not in voices:
            raise InvalidRequest(
                f"unknown voice {voice_id!r}; ListVoices gives the choices: {', '.join(sorted(voices))}"
            )
        rate = request.sample_rate_hz or voices[voice_id].sample_rate_hz
        if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
            raise InvalidRequest(
                f"sample_rate_hz {rate} is out of range; "
                f"use {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}, or 0 for the voice's own rate"
            )
        if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
            raise InvalidRequest(f"llm.temperature {request.temperature} is out of range; use 0 to 2")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise InvalidRequest(f"llm.max_tokens {request.max_tokens} must be at least 1")
        self._check_length(request.system_prompt, "start.system_prompt")
        self._started = True
        self.session_id = secrets.token_urlsafe(16)
        self._voice = voice_id
        self._format = AudioFormat(request.encoding, rate)
        self._conversation = Conversation(request.system_prompt or self._defaults.system_prompt)
        if request.temperature is not None:
            self._temperature = request.temperature
        if request.max_tokens is not None:
            self._max_tokens = min(request.max_tokens, self._defaults.max_tokens)
        self._events.put_control(
            SessionStarted(self.session_id, self._format, voice_id, self._llm.name, self._tts.name)
        )

    async def user_text(self, text: str, turn_id: str = "") -> None:
        """Answer ``text``: interrupts any turn in progress, then starts an LLM turn."""
        self._require_started("user_text")
        if not text.strip():
            raise InvalidRequest("user_text.text is empty; send the message to answer")
        self._check_length(text, "user_text.text")
        self._check_turn_id(turn_id, "user_text.turn_id")
        await self.interrupt(None)
        request = LLMRequest(self._conversation.request_messages(text), self._temperature, self._max_tokens)
        self._begin(turn_id, _llm_deltas(self._llm, request), user_text=text)

    async def speak_text(self, text: str, flush: bool, turn_id: str = "") -> None:
        """Read ``text`` aloud. Extends the open speak turn, or starts one (interrupting any other)."""
        self._require_started("speak_text")
        if not text and not flush:
            raise InvalidRequest("speak_text.text is empty; send text, or set flush to end the speak turn")
        self._check_length(text, "speak_text.text")
        active = self._active
        if active is None or active.speak_input is None:
            if not text:
                return  # a lone flush with nothing open: nothing to release
            self._check_turn_id(turn_id, "speak_text.turn_id")
            await self.interrupt(None)
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
                self._interrupt_last(self._last, played_ms)
            return
        active.finished = True
        self._active = None
        await _cancel(active)
        self._events.purge(active.turn.turn_id)
        heard_ms = active.stats.audio_ms_sent if played_ms is None else min(played_ms, active.stats.audio_ms_sent)
        self._finish(active, TurnEndReason.INTERRUPTED, heard_text(active.turn.text, active.turn.segments, heard_ms))

    async def finish(self) -> None:
        """The client is done sending: let the turn in progress end, then close the event stream."""
        active = self._active
        if active is not None:
            if active.speak_input is not None:
                active.speak_input.put_nowait(None)
                active.speak_input = None
            assert active.task is not None
            await asyncio.gather(active.task, return_exceptions=True)
        self._events.close()

    async def aclose(self) -> None:
        """Cancel whatever runs. Safe to call more than once."""
        active, self._active = self._active, None
        if active is not None:
            active.finished = True
            await _cancel(active)
        self._events.close()

    # -- the transport's side ----------------------------------------------------------------------

    async def next_event(self) -> Event | None:
        """The next event to send, or None when the stream is over. Safe to cancel."""
        return await self._events.get()

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
            turn_id = f"turn-{next(self._turn_numbers)}"
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
            self._end_by_itself(active, TurnEndReason.FAILED, str(error))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("turn %s failed unexpectedly", turn_id)
            self._end_by_itself(active, TurnEndReason.FAILED, "internal error; see the server log")
        else:
            self._end_by_itself(active, TurnEndReason.COMPLETED, "")

    def _end_by_itself(self, active: _ActiveTurn, reason: TurnEndReason, error: str) -> None:
        if active.finished:
            return
        self._active = None
        if reason is TurnEndReason.COMPLETED:
            spoken = active.turn.text.strip()
        else:
            spoken = heard_text(active.turn.text, active.turn.segments, float("inf"))
        self._finish(active, reason, spoken, error)

    def _finish(self, active: _ActiveTurn, reason: TurnEndReason, spoken: str, error: str = "") -> None:
        active.finished = True
        if active.user_text is not None:
            self._conversation.add_exchange(active.user_text, spoken)
            active.reply_recorded = True
        elif spoken:
            self._conversation.add_spoken(spoken)
            active.reply_recorded = True
        self._last = active
        self._events.put_control(TurnEnded(active.turn.turn_id, reason, spoken, active.stats, error))
        self.last_activity = time.monotonic()

    def _interrupt_last(self, last: _ActiveTurn, played_ms: int | None) -> None:
        """Interrupt a turn that ended on the server while the client may still be hearing it."""
        dropped = self._events.purge(last.turn.turn_id)
        unsent_end = next((e for e in dropped if isinstance(e, TurnEnded)), None)
        if unsent_end is None and played_ms is None:
            return  # everything was sent and the client says nothing of what it played
        heard_ms = last.stats.audio_ms_sent if played_ms is None else min(played_ms, last.stats.audio_ms_sent)
        spoken = heard_text(last.turn.text, last.turn.segments, heard_ms)
        if last.reply_recorded:
            self._conversation.trim_last_reply(spoken)
        self._last = None
        if unsent_end is not None:
            self._events.put_control(
                TurnEnded(last.turn.turn_id, TurnEndReason.INTERRUPTED, spoken, last.stats, unsent_end.error)
            )

    def _stats_of(self, turn_id: str) -> TurnStats | None:
        for candidate in reversed(self._recent):
            if candidate.turn.turn_id == turn_id:
                return candidate.stats
        return None

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise InvalidRequest(f"send `start` before `{what}`: the first message of a stream must be `start`")

    def _check_turn_id(self, turn_id: str, field: str) -> None:
        if len(turn_id) > 128:
            raise InvalidRequest(f"{field} is {len(turn_id)} characters; use at most 128")
        if turn_id in self._used_turn_ids:
            raise InvalidRequest(f"{field} {turn_id!r} was already used in this session; turn ids must be unique")

    def _check_length(self, text: str, field: str) -> None:
        if len(text) > self._defaults.max_text_chars:
            raise InvalidRequest(
                f"{field} is {len(text)} characters, over the limit of {self._defaults.max_text_chars}; send less"
            )
