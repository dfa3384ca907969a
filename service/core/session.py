"""A conversation session: one command loop per stream.

Everything that can happen to a session is a command (:mod:`service.core.command`) on one queue, and
:meth:`Session.run` handles them one at a time, in order: the client's messages, its half-close, the
server's shutdown, a takeover by another stream or the store losing the session, a turn finishing by
itself. The idle timer is the loop's own wait for the next command. No command runs while another
does, so the session's state needs no locks and no flags for orderings.

A session is in one of four states (:class:`SessionState`); each turn is a :class:`TurnRecord` with
its own small state machine (:class:`TurnState`) and exactly one transition to its end. Two turns
matter at any time, each held in a named slot: ``current``, the turn in progress, and ``heard``, the
last turn that ended, whose audio the client may still be playing (an interrupt with ``played_ms``
then cuts its history). Older turns are gone: nothing of them can still leave or change.

A reply to the user's voice may begin before the user is known to be done: on a tentative
transcript (the user paused) it begins TENTATIVE, held in the outbox and out of the history; the
final transcript of the same words confirms it (its transcript, then all it prepared, leave at
once), and anything else (speech resuming, other words, text from the client, the stream ending)
discards it without a trace, its turn id free again.

Output goes through the :class:`~service.core.outbox.Outbox` (what leaves, when, numbered how);
the history goes to the store through a latest-wins :class:`~service.core.saver.HistorySaver`. The
session knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from service.core.aio import drop_tracebacks, first_of, to_the_end
from service.core.command import (
    BadMessage,
    ClaimLost,
    ClearAudio,
    ClientCommand,
    Command,
    CommandQueue,
    CommitAudio,
    HalfClose,
    Heard,
    HeardAll,
    Interrupt,
    Shutdown,
    SpeakText,
    SpeechBegan,
    SpeechEnded,
    SpeechResumed,
    Start,
    TurnFinished,
    UserAudio,
    UserText,
)
from service.core.engine import LLMEngine, LLMRequest, LLMUsage, TTSEngine
from service.core.events import (
    Failure,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    SpokenInput,
    Transcript,
    TurnEnd,
    TurnEnded,
    TurnEndReason,
    TurnStats,
)
from service.core.hearing import Ears, VoiceInput
from service.core.history import Conversation, heard_text
from service.core.logcontext import LOG_SESSION, LOG_TURN, lines_of_turn
from service.core.outbox import Outbox
from service.core.quotas import QuotaExceeded, Quotas
from service.core.saver import HistorySaver
from service.core.settings import (
    InputAudioRequest,
    SessionDefaults,
    SessionSettings,
    StartRequest,
    TokenScope,
    check_length,
    check_start,
    new_session_id,
    resolve_settings,
)
from service.core.store import Claim, SessionStore, StoredSession
from service.core.tracing import as_current, end_span, open_span, record_span
from service.core.turn import Turn, TurnOutcome, TurnRecord, TurnState, llm_deltas, queued_deltas
from service.errors import (
    EngineError,
    IdleTimeout,
    InvalidRequest,
    LLMError,
    NotAllowed,
    SessionLost,
    SessionNotFound,
    SessionTakenOver,
    STTError,
    TTSError,
)

__all__ = ["REMEMBERED_TURN_IDS", "Ending", "Session", "SessionState"]

log = logging.getLogger(__name__)

REMEMBERED_TURN_IDS = 1024
"""A client-chosen turn id must differ from the ids of this many turns before it in the stream."""


class SessionState(enum.Enum):
    NEW = "new"
    """Waiting for ``start``."""
    OPEN = "open"
    """Taking messages and running turns."""
    DRAINING = "draining"
    """Half-closed, or the server is shutting down: the turn in progress ends, no new one begins (after
    a half-close, what the client said before it is still answered)."""
    CLOSED = "closed"
    """Done: the loop returns."""


class Ending(enum.Enum):
    """Why a session's loop returned."""

    HALF_CLOSED = "half-closed"
    SHUTDOWN = "shutdown"


class Session:
    """One client's conversation. Create, then ``await run(commands)`` once."""

    def __init__(
        self,
        llm: LLMEngine,
        tts: TTSEngine,
        defaults: SessionDefaults,
        store: SessionStore,
        outbox: Outbox,
        voice_input: VoiceInput | None = None,
        *,
        principal: str = "",
        scope: TokenScope | None = None,
        quotas: Quotas | None = None,
        quota_principal: str = "",
    ) -> None:
        self._principal = principal
        self._quota_principal = quota_principal
        """Whose quotas this stream's turns count against (an API key's principal)."""
        self._scope = scope
        self._quotas = quotas
        """A client token's limits (None: an API key, or no credentials)."""
        """Who opened the stream (``key:<name>``; empty without credentials): the sessions it creates
        are theirs, and it may resume only theirs."""
        self._llm = llm
        self._tts = tts
        self._voice_input = voice_input
        self._ears: Ears | None = None
        self._hearing_out = False  # after a half-close, utterances are still being transcribed
        self._defaults = defaults
        self._store = store
        self._outbox = outbox
        self._commands: CommandQueue | None = None
        self.state = SessionState.NEW
        self._ending = Ending.HALF_CLOSED
        self.session_id = ""
        self.unanswered = 0
        """Messages that came after the server began shutting down and were not answered."""
        self._settings: SessionSettings | None = None
        self._claim: Claim | None = None
        self._saver: HistorySaver | None = None
        self._conversation = Conversation("")
        self._turns_started = 0
        self._used_turn_ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        """The ids of the last ``REMEMBERED_TURN_IDS`` turns (a bound, so a client that sends turn after
        turn cannot grow it for ever)."""
        self._current: TurnRecord | None = None
        self._heard: TurnRecord | None = None
        self._unflushed: str | None = None
        """The id of a speak turn the server ended before its flush (the user spoke over it, an engine
        failed): its later pieces, already on their way when the client could not yet know, are
        dropped, and its flush closes it, rather than opening a new speak turn that talks over the user
        (a QA pass). A turn the client itself stopped (an interrupt, other input) is not one."""
        self._watchers: list[asyncio.Task[None]] = []
        self._last_activity = time.monotonic()

    async def run(self, commands: CommandQueue) -> Ending:
        """Handle ``commands`` in order until the session closes; why it closed.

        Raises what ends the stream with an error: :class:`InvalidRequest`, :class:`SessionNotFound`,
        :class:`SessionTakenOver`, :class:`SessionLost`, :class:`IdleTimeout`, :class:`StoreUnavailable`,
        :class:`Overloaded`. However it ends (a cancel too), a turn in progress is stopped and kept in
        the history as heard, history not yet stored is written, the session is let go, and the outbox
        is closed.
        """
        self._commands = commands
        ended = False
        try:
            while self.state is not SessionState.CLOSED:
                await self._handle(await self._next_command(commands))
                if self.state is SessionState.DRAINING and self._current is None and not self._hearing_out:
                    self.state = SessionState.CLOSED
            ended = True
            return self._ending
        finally:
            await to_the_end(self._close(cut_short=not ended))

    # -- the loop ----------------------------------------------------------------------------------

    async def _next_command(self, commands: CommandQueue) -> Command:
        """The next command; raises :class:`IdleTimeout` when none came in time while no turn ran."""
        limit = self._defaults.idle_timeout_s
        while True:
            # (A tentative turn does not hold the timer: only more of the client's audio can confirm it.)
            running = self._current is not None and self._current.state is TurnState.RUNNING
            remaining = None if running else limit - (time.monotonic() - self._last_activity)
            if remaining is not None and remaining <= 0:
                raise IdleTimeout(
                    f"no message for {limit:g} s, so the stream was closed as idle; open a new one to go on"
                )
            try:
                async with asyncio.timeout(remaining):
                    return await commands.get()
            except TimeoutError:
                continue

    async def _handle(self, command: Command) -> None:
        if isinstance(command, ClientCommand):
            self._last_activity = time.monotonic()
        if isinstance(command, SpeakText) and self._late_piece(command):
            return  # (before the tentative reply is let go: it answers the user this piece would talk over)
        if isinstance(command, UserText | SpeakText | CommitAudio | Interrupt):
            # Each of these ends a tentative turn anyway; first, so that the id it held (never shown to
            # the client) is free for the client's own.
            await self._discard_tentative()
        match command:
            case Start(request):
                await self._start(request)
            case UserText(text, turn_id):
                await self._user_text(text, turn_id)
            case SpeakText(text, flush, turn_id):
                await self._speak_text(text, flush, turn_id)
            case Interrupt(played_ms, turn_id):
                self._require_started("interrupt")
                self._check_turn_id_length(turn_id, "interrupt.turn_id")
                await self._client_interrupt(played_ms, turn_id)
            case UserAudio(data):
                await self._require_ears("user_audio").feed(self._checked_audio(data))
            case CommitAudio(turn_id):
                self._check_turn_id(turn_id, "commit_audio.turn_id")
                ears = self._require_ears("commit_audio")
                if turn_id:  # (used from now: its transcript comes later, and a second commit may come first)
                    self._new_turn_id(turn_id)
                await ears.commit(turn_id)
            case ClearAudio():
                await self._require_ears("clear_audio").clear()
            case SpeechBegan(audio_start_ms):
                self._outbox.put_control(SpeechStarted(audio_start_ms, over_reply=self._reply_audible()))
                await self._interrupt(self._played_estimate(), estimated=True)  # barge-in by voice
            case SpeechEnded(audio_end_ms):
                self._outbox.put_control(SpeechStopped(audio_end_ms))
            case SpeechResumed():
                await self._discard_tentative()
            case Heard(_, text, spoken, None, True) if text:
                await self._heard_tentatively(text, spoken)
            case Heard(turn_id, text, spoken, error, False):
                await self._transcribed(turn_id, text, spoken, error)
            case HeardAll():
                self._hearing_out = False
            case HalfClose():
                if self._ending is Ending.SHUTDOWN and self.state is SessionState.DRAINING and not self.unanswered:
                    # The client has said all it will, and the shutdown cost it nothing yet: as if it had
                    # half-closed first (its half-close may have crossed the shutdown on the way), what it
                    # said is answered and its stream gets its normal end.
                    self._ending = Ending.HALF_CLOSED
                if self._ears is not None:
                    # What the client said before it half-closed is transcribed: answered, or, when the
                    # shutdown has already left a message unanswered, counted as such.
                    self._hearing_out = True
                    await self._ears.finish()
                self._drain(Ending.HALF_CLOSED)
            case Shutdown(now):
                await self._discard_tentative()
                self._drain(Ending.SHUTDOWN)
                if now and self.state is SessionState.DRAINING:
                    # The grace period is nearly over: what is left stops, after a half-close too, and the
                    # end says where to resume. The history keeps the turn as far as it was sent; an
                    # utterance still being transcribed is not answered (counted as such).
                    self._ending = Ending.SHUTDOWN
                    if self._hearing_out:
                        self._hearing_out = False
                        self.unanswered += 1
                    if self._current is not None:
                        await self._interrupt(None)
            case ClaimLost(vanished=True):
                raise SessionLost(
                    f"the session store lost session {self.session_id} (it expired there, or the store restarted "
                    "without its data); start a new session"
                )
            case ClaimLost():
                raise SessionTakenOver(
                    f"session {self.session_id} was resumed by another stream, which now has it; this stream "
                    "ends so that turns never interleave"
                )
            case TurnFinished(turn, error):
                await self._turn_finished(turn, error)
            case BadMessage(error):
                raise error

    # -- client commands ---------------------------------------------------------------------------

    async def _start(self, request: StartRequest) -> None:
        if self.state is not SessionState.NEW:
            raise InvalidRequest("`start` was already sent; send it only once, as the first message")
        voices = self._tts.voices()
        check_start(request, self._defaults, voices)
        self._check_scope(request)
        listen: InputAudioRequest | None = None
        if request.input_audio is not None:
            if self._voice_input is None:
                raise InvalidRequest("this server takes no voice input (it has no speech-to-text engine); send text")
            listen = request.input_audio.resolve(self._defaults.listen)  # its errors before anything is created
            language = request.input_audio.language
            if language and (problem := self._voice_input.stt.language_problem(language)) is not None:
                raise InvalidRequest(f"start.input_audio.language: {problem}")  # (each utterance would fail)
        stored: StoredSession | None = None
        if request.session_id:
            resumed = await self._store.resume(request.session_id, self._principal)
            if resumed is None:
                raise SessionNotFound(
                    f"no session {request.session_id!r}: it never existed or has expired; "
                    "leave start.session_id empty to begin a new one"
                )
            stored, self._claim = resumed
        settings = resolve_settings(request, stored, self._defaults, voices, self._tts.default_voice)
        if self._scope is not None and self._scope.voices and settings.voice not in self._scope.voices:
            raise NotAllowed(  # (the claim taken is let go as the stream ends)
                f"this client token does not allow the voice {settings.voice!r} (the session's, or the default); "
                f"ask for one it allows in start.voice: {', '.join(self._scope.voices)}"
            )
        if stored is None:
            stored = StoredSession(new_session_id(), *settings.stored_fields(), principal=self._principal)
            self._claim = await self._store.create(stored)
        assert self._claim is not None
        self.state = SessionState.OPEN
        self.session_id = stored.session_id
        LOG_SESSION.set(self.session_id[:8])  # (this task's log lines, and those of the tasks it starts)
        self._settings = settings
        self._turns_started = stored.turns_started
        self._conversation = Conversation(settings.system_prompt, list(stored.entries), self._defaults.history)
        self._saver = HistorySaver(self._store, self._claim)
        self._saver.start()
        self._watch(self._claim)
        self._outbox.put_control(
            SessionStarted(self.session_id, settings.audio, settings.voice, self._llm.name, self._tts.name)
        )
        if listen is not None:
            assert self._voice_input is not None and self._commands is not None  # checked above; set by run()
            self._ears = Ears(self._voice_input, listen, self._commands.put_nowait)
            self._ears.start()
        if request.session_id and settings.stored_fields() != _stored_fields(stored):
            self._saver.submit(self._snapshot())  # a new voice or prompt holds from now, even if no turn follows

    async def _user_text(self, text: str, turn_id: str) -> None:
        self._require_started("user_text")
        if not text.strip():
            raise InvalidRequest("user_text.text is empty; send the message to answer")
        check_length(text, "user_text.text", self._defaults.max_text_chars)
        self._check_turn_id(turn_id, "user_text.turn_id")
        if self._unanswerable():
            return
        await self._interrupt(None, by_client=True)
        settings = self._settings
        assert settings is not None
        request = LLMRequest(self._conversation.request_messages(text), settings.temperature, settings.max_tokens)
        self._begin(turn_id, llm_deltas(self._llm, request), user_text=text)

    async def _speak_text(self, text: str, flush: bool, turn_id: str) -> None:
        self._require_started("speak_text")
        if not text and not flush:
            raise InvalidRequest("speak_text.text is empty; send text, or set flush to end the speak turn")
        check_length(text, "speak_text.text", self._defaults.max_text_chars)
        turn = self._current
        if turn is None or turn.state is not TurnState.OPEN:
            if not text:
                raise InvalidRequest(
                    "speak_text.text is empty and no speak turn is open to flush; send the text to read aloud"
                )
            self._check_turn_id(turn_id, "speak_text.turn_id")
            if self._unanswerable():
                return
            await self._interrupt(None, by_client=True)
            turn = self._begin(turn_id, None, user_text=None)
            self._unflushed = None  # (a new speak turn, named otherwise: the old one's pieces are not coming)
        if turn.speak_chars + len(text) > self._defaults.max_text_chars:
            raise InvalidRequest(
                f"the speak turn's text would be over {self._defaults.max_text_chars} characters; "
                "flush it and start another"
            )
        turn.speak_chars += len(text)
        if text:
            turn.speak_input.put_nowait(text)
        if flush:
            turn.close_input()

    def _late_piece(self, piece: SpeakText) -> bool:
        """Whether ``piece`` belongs to a speak turn the server ended before its flush (see
        ``_unflushed``): then it is dropped, and if it is the flush, the turn's input is closed."""
        current = self._current
        if self._unflushed is None or (current is not None and current.state is TurnState.OPEN):
            return False
        if piece.turn_id not in ("", self._unflushed):
            return False  # (a new speak turn, named otherwise)
        if piece.flush:
            self._unflushed = None
        return True

    async def _client_interrupt(self, played_ms: int | None, turn_id: str) -> None:
        """The client's ``interrupt``: of the turn in progress; or, naming a turn, of that one only, if
        it is the turn in progress or the last one (cut while a newer turn goes on: the client
        stopped it as a transcript opened the newer one). Naming any other stops nothing."""
        current = self._current if self._tentative() is None else None
        if not turn_id or (current is not None and current.turn_id == turn_id):
            await self._interrupt(played_ms, by_client=True)
        elif self._heard is not None and self._heard.turn_id == turn_id:
            self._cut_heard(self._heard, played_ms)

    async def _interrupt(self, played_ms: int | None, *, estimated: bool = False, by_client: bool = False) -> None:
        """Stop the turn in progress at once; with none, cut the turn the client may still be hearing.

        Nothing more of the stopped turn leaves. The history keeps what the client heard: up to
        ``played_ms`` when it says, else all the audio that was sent. A tentative turn is discarded
        (the client never had any of it), and the turn before it cut. An ``estimated`` cut (a barge-in
        by voice, before the client has said what it played) stays open to the client's own report.
        ``by_client``: the client's own message stops it (it knows: a speak turn it had not flushed
        takes no more pieces as late ones).
        """
        await self._discard_tentative()
        turn = self._current
        if turn is not None:
            self._outbox.drop(turn.outlet)
            await turn.stop()
            end, _ = self._end(turn, TurnEndReason.INTERRUPTED, self._heard_text(turn, played_ms), by_client=by_client)
            self._outbox.put_control(end, turn.outlet)  # at once: a barge-in's next turn never waits for the store
            return
        if self._heard is not None:
            self._cut_heard(self._heard, played_ms, estimated=estimated)

    def _reply_audible(self) -> bool:
        """The client is hearing a reply, by the server's estimate: the turn in progress has sent
        audio, or the last one, not stopped, has audio not yet played."""
        current = self._current
        if current is not None and self._tentative() is None and current.outlet.first_audio_at is not None:
            return True
        heard = self._heard
        return (
            heard is not None
            and heard.outcome is not None
            and heard.outcome.reason is not TurnEndReason.INTERRUPTED  # (stopped: the client stops playing)
            and heard.outlet.first_audio_at is not None
            and heard.outlet.client_lead_ms(time.monotonic()) > 0
        )

    def _played_estimate(self) -> int | None:
        """What the client has played of the turn it may be hearing, when it has not said: the audio
        sent minus what it still holds (sent faster than real time), as if playback began with the
        first audio. A later ``interrupt`` with ``played_ms`` corrects it."""
        turn = self._current if self._current is not None and self._tentative() is None else self._heard
        if turn is None or turn.outlet.first_audio_at is None:
            return None
        lead = max(turn.outlet.client_lead_ms(time.monotonic()), 0.0)
        return max(round(turn.outlet.audio_ms_sent - lead), 0)

    async def _transcribed(
        self, turn_id: str, text: str | None, spoken: SpokenInput | None, error: Exception | None
    ) -> None:
        """An utterance's transcript opens a turn with it as the user's message (or confirms the
        tentative turn that began with the same words)."""
        settings = self._settings
        assert settings is not None
        tentative = self._tentative()
        if tentative is not None:
            if text and text[: self._defaults.max_text_chars] == tentative.user_text and not turn_id:
                self._confirm(tentative, spoken)
                return
            await self._discard_tentative()
        if self._ending is Ending.SHUTDOWN and self._unanswerable():
            return  # (after a half-close, what the client said before it is still answered)
        turn_id = self._new_turn_id(turn_id)
        if error is not None or not text:
            message = str(error) if error is not None else "nothing was understood"
            failure = _failure(error) if error is not None else None
            with lines_of_turn(turn_id):  # (the session's task belongs to no one turn)
                log.warning("turn %s failed: %s", turn_id, failure.logged if failure is not None else message)
            # (It took from the end of the speech, as its trace's span: its length is the transcription's,
            # not the 0 s of a turn begun only now.)
            stats = TurnStats(started=spoken.speech_end_at) if spoken is not None else TurnStats()
            stats.spoken = spoken
            self._outbox.put_control(
                TurnEnd(turn_id, TurnEndReason.FAILED, "", stats.snapshot(), message, failure=failure)
            )
            # Its trace: a turn span from the end of the speech, with the transcription that failed it.
            traced = open_span(
                "parley.turn",
                {"parley.session": self.session_id[:8], "parley.turn": turn_id},
                start=spoken.speech_end_at if spoken is not None else None,
            )
            _record_transcription(traced, spoken, error)
            end_span(traced, {"parley.end_reason": TurnEndReason.FAILED.value}, failure.logged if failure else message)
            return
        text = text[: self._defaults.max_text_chars]
        self._outbox.put_control(Transcript(turn_id, text, True))
        await self._interrupt(None)  # the speech already cut any reply; this only ends one still open
        request = LLMRequest(self._conversation.request_messages(text), settings.temperature, settings.max_tokens)
        turn = self._begin(turn_id, llm_deltas(self._llm, request), user_text=text)
        turn.stats.spoken = spoken

    async def _heard_tentatively(self, text: str, spoken: SpokenInput | None) -> None:
        """The user paused after saying ``text``: prepare the reply, held, unless anything else runs."""
        if self.state is not SessionState.OPEN or self._current is not None:
            return
        settings = self._settings
        assert settings is not None
        if self._quotas is not None:
            try:
                self._quotas.admit_turn(self._quota_principal, count=False)
            except QuotaExceeded:
                return  # (the final transcript says so, ending the stream)
        text = text[: self._defaults.max_text_chars]
        request = LLMRequest(self._conversation.request_messages(text), settings.temperature, settings.max_tokens)
        turn = self._begin("", llm_deltas(self._llm, request), user_text=text, tentative=True)
        turn.stats.spoken = spoken

    def _tentative(self) -> TurnRecord | None:
        turn = self._current
        return turn if turn is not None and turn.state is TurnState.TENTATIVE else None

    def _confirm(self, turn: TurnRecord, spoken: SpokenInput | None) -> None:
        """The tentative turn's utterance was the whole of it: its transcript, then what it holds, leave."""
        assert turn.user_text is not None
        if self._heard is not None:
            self._cut_heard(self._heard, None)  # as a new turn does: what of the last one waits is not sent
        self._outbox.put_control(Transcript(turn.turn_id, turn.user_text, True))
        earlier, turn.stats.spoken = turn.stats.spoken, spoken
        if spoken is not None and (earlier is None or earlier.transcription_began != spoken.transcription_began):
            _record_transcription(turn.span, spoken)  # (one of its own; the same as the tentative's is in the span)
        turn.confirm()
        if self._quotas is not None:
            self._quotas.count_turn(self._quota_principal)
        self._outbox.release(turn.outlet)
        if turn.finished is not None:
            assert self._commands is not None
            self._commands.put_nowait(TurnFinished(turn, turn.finished[0]))  # (its news came while held)

    async def _discard_tentative(self) -> None:
        """Stop a tentative turn and forget it: nothing of it left, nothing of it stays."""
        turn = self._tentative()
        if turn is None:
            return
        self._outbox.drop(turn.outlet)
        await turn.stop()
        turn.discard()
        turn.outlet.finish(None)
        self._current = None
        self._used_turn_ids.pop(turn.turn_id, None)
        if turn.turn_id == f"turn-{self._turns_started}":
            self._turns_started -= 1

    def _require_ears(self, what: str) -> Ears:
        self._require_started(what)
        if self._ears is None:
            raise InvalidRequest(f"`{what}` needs voice input: set start.input_audio when opening the session")
        return self._ears

    def _checked_audio(self, data: bytes) -> bytes:
        assert self._ears is not None
        if len(data) > self._ears.max_chunk_bytes:
            raise InvalidRequest(
                f"user_audio.data is {len(data)} bytes, over one second of audio ({self._ears.max_chunk_bytes} bytes "
                "at the input's rate); send it in smaller pieces"
            )
        return data

    def _unanswerable(self) -> bool:
        """The server is shutting down: a message that would begin a turn is not answered (nor does it
        cut the turn in progress, which is sent whole; a speak turn's text is complete as it was)."""
        if self.state is SessionState.DRAINING:
            self.unanswered += 1
            return True
        return False

    def _drain(self, ending: Ending) -> None:
        """End once the turn in progress has ended (a speak turn's text is complete as it is)."""
        if self.state is SessionState.NEW:
            self.state, self._ending = SessionState.CLOSED, ending
        elif self.state is SessionState.OPEN:
            self.state, self._ending = SessionState.DRAINING, ending
        if self._current is not None:
            self._current.close_input()

    # -- turns -------------------------------------------------------------------------------------

    def _begin(
        self,
        turn_id: str,
        text: AsyncGenerator[str | LLMUsage, None] | None,
        *,
        user_text: str | None,
        tentative: bool = False,
    ) -> TurnRecord:
        settings = self._settings
        assert settings is not None
        if self._quotas is not None and not tentative:
            self._quotas.admit_turn(self._quota_principal)  # raises QuotaExceeded: the stream ends, resumable later
        turn_id = self._new_turn_id(turn_id)
        stats = TurnStats()
        outlet = self._outbox.open_turn(turn_id, held=tentative)
        speak_input: asyncio.Queue[str | None] = asyncio.Queue()
        pipeline = Turn(
            turn_id,
            text if text is not None else queued_deltas(speak_input),
            tts=self._tts,
            voice=settings.voice,
            language=settings.voice_language,
            audio_format=settings.audio,
            emit=outlet.put,
            options=self._defaults.turn,
            piece_ms=self._defaults.outbox.max_message_ms,
            stats=stats,
            from_llm=user_text is not None,
            fill_until=outlet.fill_until,
            first_piece_ms=self._defaults.outbox.first_message_ms,
            pause_until=outlet.peek_fill_until,
            text_deltas=settings.text_deltas,
        )
        turn = TurnRecord(pipeline, outlet, stats, user_text, speak_input, tentative=tentative)
        turn.task = asyncio.create_task(self._run_turn(turn), name=f"turn {turn_id}")
        self._current = turn
        return turn

    def _new_turn_id(self, turn_id: str) -> str:
        """The client's id for a new turn, or the next free ``turn-N``; remembered from now."""
        if turn_id in self._used_turn_ids:
            return turn_id  # already allocated (a transcript announced it)
        while not turn_id or turn_id in self._used_turn_ids:
            self._turns_started += 1
            turn_id = f"turn-{self._turns_started}"
        self._used_turn_ids[turn_id] = None
        if len(self._used_turn_ids) > REMEMBERED_TURN_IDS:
            self._used_turn_ids.popitem(last=False)
        return turn_id

    async def _run_turn(self, turn: TurnRecord) -> None:
        """The turn's task: run the pipeline (in a ``parley.turn`` span), then tell the loop (unless it
        was stopped)."""
        LOG_TURN.set(turn.turn_id)
        error: BaseException | None = None
        spoken = turn.stats.spoken  # (a voice turn's span begins where the user stopped speaking)
        traced = open_span(
            "parley.turn",
            {"parley.session": self.session_id[:8], "parley.turn": turn.turn_id},
            start=spoken.speech_end_at if spoken is not None else None,
        )
        turn.span = traced
        _record_transcription(traced, spoken)
        if traced is not None:  # (it ends when the turn's end leaves: the timings are then the client's)
            turn.outlet.on_end = functools.partial(_end_turn_span, traced, turn)
        with as_current(traced):
            try:
                await turn.pipeline.run()
            except asyncio.CancelledError:
                raise
            except EngineError as failure:
                log.warning("turn %s failed: %s", turn.turn_id, failure.for_logs)
                error = failure
            except Exception as failure:
                log.exception("turn %s failed unexpectedly", turn.turn_id)
                error = failure
        if error is not None:  # (logged: what is left to do with it needs none of the frames it kept)
            drop_tracebacks(error)
        assert self._commands is not None
        self._commands.put_nowait(TurnFinished(turn, error))

    async def _turn_finished(self, turn: TurnRecord, error: BaseException | None) -> None:
        if turn.state is TurnState.ENDED:
            return  # it was stopped (interrupted, discarded) before this news arrived
        if turn.state is TurnState.TENTATIVE:
            turn.finished = (error,)  # handled when it is confirmed
            return
        if error is None:
            end, version = self._end(turn, TurnEndReason.COMPLETED, turn.pipeline.text.strip())
        else:
            message = str(error) if isinstance(error, EngineError) else "internal error; see the server log"
            spoken = heard_text(turn.pipeline.text, turn.pipeline.segments, float("inf"))
            end, version = self._end(turn, TurnEndReason.FAILED, spoken, message)
            end = dataclasses.replace(end, failure=_failure(error))
        # Stored before the client hears of it, so that a client that saw the end finds the turn on every
        # replica (the store's time is taken from no barge-in: nothing of this turn is left to stop).
        assert self._saver is not None
        if not await self._saver.saved(version):
            end = dataclasses.replace(end, history_unsaved=True)
        self._outbox.put_control(end, turn.outlet)

    def _end(
        self, turn: TurnRecord, reason: TurnEndReason, spoken: str, error: str = "", *, by_client: bool = False
    ) -> tuple[TurnEnd, int]:
        """Record the turn's end in the history and hand the history to the saver; the end to send, and
        the version of the history that holds it."""
        interrupted = reason is TurnEndReason.INTERRUPTED
        if turn.user_text is not None:
            self._conversation.add_exchange(turn.user_text, spoken, interrupted=interrupted)
            in_history = True
        else:
            in_history = self._conversation.add_spoken(spoken, interrupted=interrupted)
        if turn.state is TurnState.OPEN and not by_client:  # (a speak turn not flushed: more may be on the way)
            self._unflushed = turn.turn_id
        turn.end(TurnOutcome(reason, spoken, in_history))
        if self._quotas is not None:
            self._quotas.synthesized(self._quota_principal, sum(s.end - s.start for s in turn.pipeline.segments))
        self._current, self._heard = None, turn
        self._last_activity = time.monotonic()
        return TurnEnd(turn.turn_id, reason, spoken, turn.stats.snapshot(), error), self._save()

    def _cut_heard(self, turn: TurnRecord, played_ms: int | None, *, estimated: bool = False) -> None:
        """Interrupt a turn that ended on the server while the client may still be hearing it. After
        an ``estimated`` cut the turn may still be cut again, by the client's ``played_ms``."""
        assert turn.outcome is not None
        unsent_end = self._outbox.drop(turn.outlet)
        if unsent_end is None and played_ms is None:
            return  # everything was sent and the client says nothing of what it played
        if unsent_end is not None and unsent_end.reason is TurnEndReason.INTERRUPTED and played_ms is None:
            self._outbox.put_control(unsent_end, turn.outlet)  # already cut to what was heard: keep that
            return
        spoken = self._heard_text(turn, played_ms)
        whole = spoken == turn.outcome.spoken and turn.outcome.reason is not TurnEndReason.INTERRUPTED
        if whole and not turn.trimmed:
            if unsent_end is not None:
                self._outbox.put_control(unsent_end, turn.outlet)  # it was heard whole: nothing to cut
            return
        if turn.outcome.in_history:
            self._conversation.trim_last_reply(spoken)
            turn.trimmed = True
            self._save()
        if not estimated:
            self._heard = None
        if unsent_end is not None:
            self._outbox.put_control(
                TurnEnd(turn.turn_id, TurnEndReason.INTERRUPTED, spoken, unsent_end.moments, unsent_end.error),
                turn.outlet,
            )

    @staticmethod
    def _heard_text(turn: TurnRecord, played_ms: int | None) -> str:
        sent_ms = turn.outlet.audio_ms_sent
        heard_ms = sent_ms if played_ms is None else min(played_ms, sent_ms)
        return heard_text(turn.pipeline.text, turn.pipeline.segments, heard_ms)

    # -- the store ---------------------------------------------------------------------------------

    def _snapshot(self) -> StoredSession:
        assert self._settings is not None
        return StoredSession(
            self.session_id,
            *self._settings.stored_fields(),
            entries=list(self._conversation.entries),
            turns_started=self._turns_started,
            principal=self._principal,
        )

    def _save(self) -> int:
        assert self._saver is not None
        return self._saver.submit(self._snapshot())

    def _watch(self, claim: Claim) -> None:
        """Put :class:`ClaimLost` on the queue when the claim is lost or another stream wants it."""
        commands = self._commands
        assert commands is not None

        async def watch() -> None:  # (holds the queue, not the session: see _close)
            await first_of(claim.lost, claim.wanted)
            commands.put_nowait(ClaimLost(claim.vanished))

        self._watchers.append(asyncio.create_task(watch(), name=f"takeover watch {self.session_id[:8]}"))

    async def _close(self, *, cut_short: bool) -> None:
        """The stream is over: stop a turn in progress, write what is not yet stored, let the session
        go, close the outbox. A stream ``cut_short`` (a failure, a dropped connection) is a barge-in
        whose cut the client could not report: the turn in progress, or the last turn if its audio
        had not all been sent, is kept in the history as far as its audio was sent."""
        # A cancelled task keeps its traceback, whose frames keep their locals: a task the session held
        # that held the session would make the whole session (its history, its last turn) a reference
        # cycle, left to the garbage collector's older generations, whose collections then hold the
        # event loop for tens of milliseconds under load. So the session lets go of its watchers.
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.cancel()
        if self._ears is not None:
            await self._ears.aclose()
        await self._discard_tentative()
        owned = self._claim is not None and not self._claim.lost.is_set()
        turn = self._current
        if turn is None and cut_short and owned and self._heard is not None:
            self._cut_heard(self._heard, None)
        if turn is not None:
            self._outbox.drop(turn.outlet)
            await turn.stop()
            if owned:
                end, _ = self._end(turn, TurnEndReason.INTERRUPTED, self._heard_text(turn, None))
                self._outbox.put_control(end, turn.outlet)
            else:  # (taken over: none of it is this stream's to write; its end still says so, and counts)
                turn.end(TurnOutcome(TurnEndReason.INTERRUPTED, "", False))
                self._current = None
                taken = "the session was taken over by another stream: this turn is not in its history"
                self._outbox.put_control(
                    TurnEnd(turn.turn_id, TurnEndReason.INTERRUPTED, "", turn.stats.snapshot(), taken), turn.outlet
                )
        self.state = SessionState.CLOSED
        self._outbox.close()
        if self._saver is not None:
            await self._saver.aclose()
        if self._claim is not None:
            await self._store.release(self._claim)

    # -- checks ------------------------------------------------------------------------------------

    def _check_scope(self, request: StartRequest) -> None:
        """What a client token allows: its voices, its one session."""
        scope = self._scope
        if scope is None:
            return
        if scope.session_id and request.session_id != scope.session_id:
            raise NotAllowed("this client token may only resume its own session: send it as start.session_id")
        if scope.voices and request.voice and request.voice not in scope.voices:
            raise NotAllowed(
                f"this client token does not allow the voice {request.voice!r}; it allows {', '.join(scope.voices)}"
            )

    def _require_started(self, what: str) -> None:
        if self.state is SessionState.NEW:
            raise InvalidRequest(f"send `start` before `{what}`: the first message of a stream must be `start`")

    @staticmethod
    def _check_turn_id_length(turn_id: str, field: str) -> None:
        if len(turn_id) > 128:
            raise InvalidRequest(f"{field} is {len(turn_id)} characters; use at most 128")

    def _check_turn_id(self, turn_id: str, field: str) -> None:
        self._check_turn_id_length(turn_id, field)
        if turn_id in self._used_turn_ids:
            raise InvalidRequest(f"{field} {turn_id!r} was already used in this session; turn ids must be unique")


def _failure(error: BaseException) -> Failure:
    """Which engine failed a turn, for the metrics."""
    engine = (
        "llm"
        if isinstance(error, LLMError)
        else "tts"
        if isinstance(error, TTSError)
        else "stt"
        if isinstance(error, STTError)
        else "internal"
    )
    logged = error.for_logs if isinstance(error, EngineError) else "internal error"
    return Failure(engine, bool(getattr(error, "retryable", False)), logged)


def _record_transcription(traced: Any, spoken: SpokenInput | None, error: BaseException | None = None) -> None:
    """Record in a voice turn's span (or None) the transcription of its utterance, as it ran."""
    if traced is None or spoken is None or spoken.transcription_began is None:
        return
    began = spoken.transcription_began
    record_span("parley.transcription", traced, began, began + spoken.transcription_s, {}, error)


def _end_turn_span(traced: Any, turn: TurnRecord, ended: TurnEnded | None) -> None:
    """End a turn's span as its end leaves, with the timings the client got, in ms from the turn's
    start (0: the stage never happened; no text); or, for a turn whose end was never sent (a
    tentative reply discarded, a stream closed under a turn it no longer owned), with how far it got."""
    attributes: dict[str, Any] = {"parley.segments": len(turn.pipeline.segments)}
    if ended is None:
        stats, started = turn.stats, turn.stats.started
        for name, moment in (("first_llm_token_ms", stats.first_llm_token), ("first_segment_ms", stats.first_segment)):
            if moment is not None:
                attributes[f"parley.{name}"] = round((moment - started) * 1000)
        attributes["parley.end_reason"] = turn.outcome.reason.value if turn.outcome is not None else "discarded"
        end_span(traced, attributes)
        return
    timings = ended.timings
    attributes.update(
        {
            "parley.end_reason": ended.reason.value,
            "parley.first_llm_token_ms": timings.first_llm_token_ms,
            "parley.first_segment_ms": timings.first_segment_ms,
            "parley.first_audio_ms": timings.first_audio_ms,
            "parley.total_ms": timings.total_ms,
            "parley.audio_ms": timings.audio_duration_ms,
        }
    )
    if timings.speech_end_to_first_audio_ms:
        attributes["parley.speech_end_to_first_audio_ms"] = timings.speech_end_to_first_audio_ms
    failed = ended.reason is TurnEndReason.FAILED
    logged = ended.failure.logged if ended.failure is not None else ended.error
    end_span(traced, attributes, (logged or "failed") if failed else None)


def _stored_fields(stored: StoredSession) -> tuple[str, str, float | None, int | None]:
    return stored.system_prompt, stored.voice, stored.temperature, stored.max_tokens
