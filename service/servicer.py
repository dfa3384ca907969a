"""The gRPC servicer: proto messages in, session commands; outgoing messages out, proto messages.

Each ``Converse`` stream has a reader (requests → commands on the session's queue), the session's
command loop (:meth:`service.core.session.Session.run`), a watcher that turns the server's shutdown
into a command, and a writer (the outbox's messages → responses). The reader, the loop and the
watcher share one task group. The writer runs beside it, not in it: gRPC core goes on sending a
message whose ``write`` was cancelled and then refuses the stream's status, so a failure elsewhere
must stop the writer between messages, never in the middle of one (:class:`Writer`).
Errors become gRPC status codes in one table, :data:`STATUS_FOR`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc._cython import cygrpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.auth import CALLER, UNAUTHENTICATED_MESSAGE, Authenticator, Caller, TokenError
from service.convert import command_from_proto, message_to_proto, voice_to_proto
from service.core.aio import drop_tracebacks, to_the_end
from service.core.command import BadMessage, CommandQueue, HalfClose, Shutdown
from service.core.engine import LLMEngine, TTSEngine
from service.core.events import SessionStarted, SpeechStarted, TurnEnded
from service.core.hearing import VoiceInput
from service.core.logcontext import LOG_SESSION, LOG_TURN, lines_of_turn
from service.core.outbox import Outbox
from service.core.quotas import QuotaExceeded, Quotas
from service.core.session import Ending, Session
from service.core.settings import SessionDefaults, is_session_id
from service.core.store import SessionStore
from service.errors import (
    ClientGone,
    ClientNotReading,
    IdleTimeout,
    InvalidRequest,
    NotAllowed,
    Overloaded,
    ParleyError,
    SessionLost,
    SessionNotFound,
    SessionTakenOver,
    ShuttingDown,
    StoreUnavailable,
)
from service.logs import Throttled, shorten_session_ids
from service.metrics import Metrics
from service.rpc import end_call

__all__ = ["STATUS_FOR", "StreamLimits", "VoiceServicer", "Writer", "status_for"]

log = logging.getLogger(__name__)

STATUS_FOR: dict[type[ParleyError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SessionTakenOver: grpc.StatusCode.ABORTED,
    SessionLost: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdleTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ClientNotReading: grpc.StatusCode.DEADLINE_EXCEEDED,
    ClientGone: grpc.StatusCode.CANCELLED,
}


_NO_ERROR_ENDS: dict[type[ParleyError], str] = {
    ClientGone: "hangup",
    IdleTimeout: "idle",
    ShuttingDown: "shutdown",
    SessionTakenOver: "takeover",
}
"""The failures that end a stream as its life goes, not as an error (``parley_stream_ends_total``'s
reason); any other is ``error``, counted by status in ``parley_rejected_streams_total``."""


def end_reason(failure: BaseException) -> str:
    """Why a stream that ended with ``failure`` ended (:data:`service.metrics.STREAM_END_REASONS`)."""
    return next((reason for kind, reason in _NO_ERROR_ENDS.items() if isinstance(failure, kind)), "error")


@dataclass(frozen=True)
class StreamLimits:
    """Limits on streams."""

    max_streams: int = 100
    send_timeout_s: float = 30.0
    """A client that reads nothing for this long while messages wait is disconnected."""


_ENDED_LINES: dict[type[ParleyError], Throttled] = {}
"""Per kind of end a client may cause at will (a bad request, a stream over the limit, an idle close):
its "stream ended" line, written at most once per 10 s (the metrics count every one)."""


def _log_ended(error: ParleyError) -> None:
    said = shorten_session_ids(str(error))
    if isinstance(error, ClientGone):
        log.debug("stream ended: %s", said)
    elif isinstance(error, (StoreUnavailable, SessionLost)):  # (the service's store failing, not a client)
        log.warning("stream ended: %s", said)
    elif isinstance(error, ShuttingDown):  # (once per stream, as the operator stops the service)
        log.info("stream ended: %s", said)
    else:
        kind = type(error)
        if (line := _ENDED_LINES.get(kind)) is None:
            line = _ENDED_LINES[kind] = Throttled(log, logging.INFO)
        line("stream ended: %s", said)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a stream that failed with ``error`` ends with."""
    for kind, code in STATUS_FOR.items():
        if isinstance(error, kind):
            _log_ended(error)
            return code, str(error)
    log.error("stream failed", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _retry_after(error: QuotaExceeded) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that says when to try again."""
    return (("retry-after-s", str(error.retry_after_s)),)


def _ms_or_none(ms: int) -> str:
    """A stage's time, or "none" for a stage that never happened (0 in :class:`TurnTimings`)."""
    return f"{ms} ms" if ms else "none"


def _log_turn(session: str, ended: TurnEnded, *, abandoned: bool = False) -> None:
    """``session``: the session's id, shortened, and whose it is (a key's name; never the key);
    ``abandoned``: the client went away before the turn's end reached it."""
    timings = ended.timings
    log.info(
        "session %s turn %s %s: first token %s, first audio %s, total %d ms, %.1f s of audio%s",
        session,
        ended.turn_id,
        "abandoned (the client went away)" if abandoned else ended.reason.value,
        _ms_or_none(timings.first_llm_token_ms),
        _ms_or_none(timings.first_audio_ms),
        timings.total_ms,
        timings.audio_duration_ms / 1000,
        f" ({ended.failure.logged if ended.failure is not None else ended.error})" if ended.error else "",
    )


class Writer:
    """Sends a stream's messages to the client, one at a time; stopped only between messages.

    gRPC core goes on sending a message whose ``write`` was cancelled, and refuses a status sent
    meanwhile (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``), which leaves the client waiting for an end that
    never comes. So when the stream fails elsewhere, :meth:`stop` lets the message in flight go (for
    up to the send timeout) before the status is sent.
    """

    def __init__(
        self,
        outbox: Outbox,
        context: grpc.aio.ServicerContext,
        send_timeout_s: float,
        session_id: Callable[[], str],
        metrics: Metrics | None = None,
        server_cancels: Callable[[], bool] = lambda: False,
    ) -> None:
        self._outbox = outbox
        self._session_id = session_id
        self._server_cancels = server_cancels  # (its shutdown's grace is over: a cancelled call is its doing)
        self._metrics = metrics
        self._encoding = ""
        self._context = context
        self._send_timeout_s = send_timeout_s
        self._stopping = False
        self._written = asyncio.Event()  # clear while a message is in flight
        self._written.set()
        # The send timeout: a watchdog timer that looks at the write in flight, instead of a deadline
        # armed and disarmed around every write (which cost about a twentieth of the event loop's time).
        self._writing_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False

    async def run(self) -> None:
        """Send messages until the outbox is closed and empty. Raises :class:`ClientNotReading`, or
        :class:`ClientGone` when a write fails because the call is over (the client cancelled or went
        away, or the server stopped)."""
        loop = asyncio.get_running_loop()
        # (No local holds this task: a failure's traceback keeps this frame, and the task keeps the
        # failure, a reference cycle that only the garbage collector would free.)
        try:
            while (message := await self._outbox.next()) is not None:
                ended = message if isinstance(message, TurnEnded) else None
                if ended is not None:  # (counted as it leaves the outbox: sent or not, it ended)
                    LOG_TURN.set(ended.turn_id)  # (this task's lines: the writer began before the session)
                if self._stopping:
                    if ended is not None:
                        self._account(ended)
                    return
                self._written.clear()
                self._writing_since = loop.time()
                if self._watchdog is None:
                    self._watchdog = loop.call_at(
                        self._writing_since + self._send_timeout_s, self._watch, asyncio.current_task()
                    )
                gone = False
                sent = message_to_proto(message)  # (a bug here is the service's, not a call that is over)
                try:
                    await self._context.write(sent)
                except asyncio.CancelledError:
                    raise  # (the watchdog, or a stop)
                except Exception as error:  # grpc.aio raises its own internal errors for a call that is over
                    gone = True
                    raise ClientGone(f"the call is over ({type(error).__name__})") from error
                finally:
                    self._writing_since = None
                    self._written.set()
                    if ended is not None:  # (after its write: whether the client was still there)
                        self._account(ended, abandoned=gone)
                if isinstance(message, SpeechStarted) and message.over_reply and self._metrics is not None:
                    self._metrics.barge_ins.inc()
                elif isinstance(message, SessionStarted):
                    self._encoding = message.audio.encoding.value
                    LOG_SESSION.set(message.session_id[:8])
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            raise ClientNotReading(
                f"the client read nothing for {self._send_timeout_s:g} s while replies waited; the stream was closed"
            ) from None
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    def _watch(self, task: asyncio.Task[Any] | None) -> None:
        """The watchdog's round: cancel the writer whose write has taken the send timeout, or come back
        when the write in flight would reach it (not at all while none is: the next write re-arms it)."""
        self._watchdog = None
        if self._writing_since is None or task is None or task.done():
            return
        loop = asyncio.get_running_loop()
        due = self._writing_since + self._send_timeout_s
        if loop.time() >= due:
            self._timed_out = True
            task.cancel()
        else:
            self._watchdog = loop.call_at(due, self._watch, task)

    def _account(self, ended: TurnEnded, *, abandoned: bool = False) -> None:
        """A turn's end in the log and the metrics (``abandoned`` too if the client cancelled the call:
        its hang-up ended the turn, which it did not hear end)."""
        abandoned = (abandoned or self._context.cancelled()) and not self._server_cancels()
        _log_turn(self._session_id(), ended, abandoned=abandoned)
        if self._metrics is not None:
            self._metrics.turn_ended(ended, self._encoding, abandoned=abandoned)

    def account_unsent(self, ends: list[TurnEnded], *, abandoned: bool) -> None:
        """Turns that ended without their end reaching the client (the stream ended under them):
        logged and counted all the same, as ``abandoned`` if the client went away (a write found the
        call over; or it cancelled the call). Call after :meth:`stop`."""
        for ended in ends:
            with lines_of_turn(ended.turn_id):  # (its line, as every line of a turn, names it)
                self._account(ended, abandoned=abandoned)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Stop ``task`` (running :meth:`run`) once no message is in flight; return when it has ended."""
        if not task.done():
            self._stopping = True
            if not self._written.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._send_timeout_s):
                        await self._written.wait()
            task.cancel()  # it waits for the next message (safe to cancel), or its write is stuck
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the stream's failure is taken from the task group


class VoiceServicer(voice_pb2_grpc.VoiceServiceServicer):
    """Serves ``parley.v1.VoiceService`` with the given engines."""

    def __init__(
        self,
        llm: LLMEngine,
        tts: TTSEngine,
        defaults: SessionDefaults,
        limits: StreamLimits,
        store: SessionStore,
        voice_input: VoiceInput | None = None,
        auth: Authenticator | None = None,
        quotas: Quotas | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self._auth = auth
        self._quotas = quotas
        self._token_streams: dict[str, int] = {}
        """Streams open per client token (by its id), for a token's own stream limit."""
        self._llm = llm
        self._tts = tts
        self._voice_input = voice_input
        self._store = store
        self._defaults = defaults
        self._limits = limits
        self.active_streams = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._shutting_down = asyncio.Event()
        self._cutting = asyncio.Event()
        self._grace_over = False  # (the server cancels the calls still open: no client hung up)

    def shut_down(self) -> None:
        """Begin a graceful shutdown: every stream ends once its turn in progress has been sent, with
        UNAVAILABLE and a message that says to resume the session elsewhere."""
        self._shutting_down.set()

    def cut_streams(self, why: str = "the grace period is nearly over") -> None:
        """The shutdown's grace period is nearly over (or the operator said not to wait): every turn
        still in progress stops at once (as if interrupted: the history keeps what was sent), so that
        its stream still ends with the message that says where to resume, before the server cancels
        whatever is left."""
        if self.active_streams:
            log.info("%s: %d stream(s) still open end now", why, self.active_streams)
        self._shutting_down.set()
        self._cutting.set()

    def grace_over(self) -> None:
        """The shutdown's grace period ends now: gRPC cancels the calls still open (counted as the
        shutdown's ends, not as clients that hung up)."""
        self._grace_over = True

    def _call_over(self) -> str:
        """Why a call that is over ended: the shutdown's, once its grace is over; else the client's."""
        return "shutdown" if self._grace_over else "hangup"

    async def drained(self) -> None:
        """Return once no stream is open (every stream's session has been let go)."""
        await self._drained.wait()

    async def ListVoices(
        self, request: pb.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVoicesResponse:
        return pb.ListVoicesResponse(
            voices=[voice_to_proto(v) for v in self._tts.voices()], default_voice=self._tts.default_voice
        )

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> None:
        if self.active_streams >= self._limits.max_streams:
            code, message = status_for(
                Overloaded(f"the server is at its limit of {self._limits.max_streams} streams; retry later")
            )
            await self._refuse(context, code, message)
        caller = CALLER.get()
        if self._auth is not None and caller is None:  # (never: the interceptor lets only callers through)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        scope = caller.token if caller else None
        if scope is not None and scope.max_streams:
            if self._token_streams.get(scope.token_id, 0) >= scope.max_streams:
                code, message = status_for(
                    Overloaded(f"this client token allows {scope.max_streams} streams at once; close one first")
                )
                await self._refuse(context, code, message)
        # Quotas count per API key: the tokens a key mints share its quota.
        quota_principal = caller.key_principal if caller else ""
        if self._quotas is not None:
            try:
                self._quotas.open_stream(quota_principal)
            except QuotaExceeded as error:
                await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), _retry_after(error))
        if scope is not None and scope.max_streams:
            self._token_streams[scope.token_id] = self._token_streams.get(scope.token_id, 0) + 1
        try:
            # Accepted: said at once (the response headers), before any request is read, so that a client
            # may wait for it before it writes. A refusal above is said the same way, as the call's end:
            # grpc aio's Python client reports a write that finds the call already over as INTERNAL,
            # hiding the server's status (grpc/grpc#36066), which a client that waits never meets.
            try:
                await context.send_initial_metadata(())
            except cygrpc.InternalError:  # (the call is over already: a deadline of a few ms, a client gone)
                if self.metrics is not None:
                    self.metrics.stream_ended("hangup")
                return  # (as a client's hang-up: said by no traceback, which anyone could cause at will)
            await self._serve(request_iterator, context, caller)
        finally:
            if self._quotas is not None:
                self._quotas.close_stream(quota_principal)
            if scope is not None and scope.max_streams:
                left = self._token_streams.pop(scope.token_id) - 1
                if left:
                    self._token_streams[scope.token_id] = left

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        trailing: tuple[tuple[str, str], ...] = (),
    ) -> NoReturn:
        """End a stream before it began (counted in the metrics)."""
        if self.metrics is not None:
            self.metrics.stream_ended("error", code.name)
        await context.abort(code, message, trailing)
        raise AssertionError("abort returns only by raising")

    async def CreateClientToken(
        self, request: pb.CreateClientTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClientToken:
        if self._auth is None or not self._auth.mints_tokens:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server mints no client tokens: it needs API keys and PARLEY_TOKEN_SECRET",
            )
        assert self._auth is not None
        caller = CALLER.get()
        if caller is None:  # (never: the interceptor lets only callers through)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        assert caller is not None
        if caller.token is None and (problem := self._scope_problem(request)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)  # (a token is refused below as it is)
        try:
            token, expires_at, principal = self._auth.mint(
                caller,
                ttl_s=request.ttl_s,
                subject=request.subject,
                voices=list(request.voices),
                session_id=request.session_id,
                max_streams=request.max_streams,
            )
        except TokenError as error:
            code = grpc.StatusCode.PERMISSION_DENIED if caller.token else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(error))
        log.info("client token for %s, valid until %d", principal, expires_at)
        return pb.ClientToken(token=token, expires_at=expires_at, principal=principal)

    def _scope_problem(self, request: pb.CreateClientTokenRequest) -> str | None:
        """What makes a token's scope one no stream could use (a voice this server lacks, a session id
        that is none), said to whoever asks for it rather than later, in an end user's browser."""
        known = {voice.id for voice in self._tts.voices()}
        if unknown := [voice for voice in request.voices if voice not in known]:
            return (
                f"voices: unknown voice {unknown[0][:128]!r}; ListVoices gives the choices: {', '.join(sorted(known))}"
            )
        if request.session_id and not is_session_id(request.session_id):
            return "session_id is not a session id (letters, digits, '-' and '_', at most 64): give a stream's"
        return None

    async def _serve(
        self,
        request_iterator: AsyncIterator[pb.ConverseRequest],
        context: grpc.aio.ServicerContext,
        caller: Caller | None,
    ) -> None:
        self.active_streams += 1
        if self.metrics is not None:
            self.metrics.active_streams.set(self.active_streams)
        self._drained.clear()
        try:
            try:
                failure = await self._converse(request_iterator, context, caller)
            except asyncio.CancelledError as cancelled:  # the client hung up (or the grace ran out)
                drop_tracebacks(cancelled)  # (its frames held the stream's objects: freed now, not by the collector)
                if self.metrics is not None:
                    self.metrics.stream_ended(self._call_over())
                raise
            if failure is None:
                if self.metrics is not None:
                    self.metrics.stream_ended("closed")
            else:
                code, message = status_for(failure)
                drop_tracebacks(failure)  # (logged: its frames hold the stream's objects, and tasks that hold it)
                if self.metrics is not None:
                    reason = end_reason(failure)
                    self.metrics.stream_ended(self._call_over() if reason == "hangup" else reason, code.name)
                # A client that reads nothing never gets the status: the call is then cancelled.
                trailing = _retry_after(failure) if isinstance(failure, QuotaExceeded) else ()
                await end_call(context, code, message, self._limits.send_timeout_s, trailing)
        finally:  # (the stream is counted until its call has ended)
            self.active_streams -= 1
            if self.metrics is not None:
                self.metrics.active_streams.set(self.active_streams)
            if self.active_streams == 0:
                self._drained.set()

    async def _converse(
        self, requests: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext, caller: Caller | None
    ) -> BaseException | None:
        """Run one stream; the error it ends with, if any."""
        outbox = Outbox(self._defaults.outbox)
        commands = CommandQueue()
        session = Session(
            self._llm,
            self._tts,
            self._defaults,
            self._store,
            outbox,
            self._voice_input,
            principal=caller.principal if caller else "",
            scope=caller.token if caller else None,
            quotas=self._quotas,
            quota_principal=caller.key_principal if caller else "",
        )
        owner = f" ({session_principal})" if (session_principal := caller.principal if caller else "") else ""
        writer = Writer(
            outbox,
            context,
            self._limits.send_timeout_s,
            lambda: session.session_id[:8] + owner,
            self.metrics,
            lambda: self._grace_over,
        )
        writing = asyncio.create_task(writer.run(), name="converse writer")
        failure: BaseException | None = None
        ending = Ending.HALF_CLOSED
        try:
            async with asyncio.TaskGroup() as group:
                others = (
                    group.create_task(self._read(requests, commands), name="converse reader"),
                    group.create_task(self._watch_shutdown(commands), name="converse shutdown watch"),
                    group.create_task(self._watch_writer(writing), name="converse writer outcome"),
                )
                ending = await session.run(commands)
                for task in others[:2]:
                    task.cancel()  # the session is over: stop reading and watching
            # (The group's end waited for the writer too: the outbox is closed, so it sent what was left.)
        except* Exception as errors:
            failure = errors.exceptions[0]
            # (asyncio's TaskGroup keeps the group it raised in a local of its finished frame: a cycle;
            # the errors after the first are not reported, and their frames may hold their tasks)
            traceback.clear_frames(errors.__traceback__)
            for other in errors.exceptions[1:]:
                drop_tracebacks(other)
        finally:
            await to_the_end(writer.stop(writing))
            writer.account_unsent(outbox.unsent_ends(), abandoned=isinstance(failure, ClientGone))
        if failure is not None:
            return failure
        if ending is Ending.SHUTDOWN:
            where = f"resume session {session.session_id} on another replica" if session.session_id else "reconnect"
            unanswered = (
                f" ({session.unanswered} message(s) sent after the shutdown began were not answered: send them again)"
                if session.unanswered
                else ""
            )
            return ShuttingDown(f"the server is shutting down; {where}{unanswered}")
        return None

    @staticmethod
    async def _watch_writer(writing: asyncio.Task[None]) -> None:
        """Fail the task group when the writer fails (it is not in the group; see the module docstring)."""
        await asyncio.wait({writing})
        if not writing.cancelled():
            writing.result()

    async def _watch_shutdown(self, commands: CommandQueue) -> None:
        await self._shutting_down.wait()
        commands.put_nowait(Shutdown())
        await self._cutting.wait()
        commands.put_nowait(Shutdown(now=True))

    @staticmethod
    async def _read(requests: AsyncIterator[pb.ConverseRequest], commands: CommandQueue) -> None:
        try:
            async for request in requests:
                await commands.put(command_from_proto(request))
        except InvalidRequest as error:  # bytes that are not a ConverseRequest (see service.rpc)
            await commands.put(BadMessage(error))  # in its turn, after what came before it
            return
        await commands.put(HalfClose())
