"""The gRPC servicer: proto messages in, session calls, proto messages out.

Each ``Converse`` stream runs two tasks joined by the session's bounded event queue: a reader
(requests → session commands) and a writer (session events → responses), plus watchers for a
takeover of the session and for the server's shutdown. The writer is stopped only between messages.
Errors become gRPC status codes in one table, :data:`STATUS_FOR`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.convert import event_to_proto, start_from_proto, voice_to_proto
from service.core.engine import LLMEngine, TTSEngine
from service.core.events import TurnEnded
from service.core.session import Session, SessionDefaults
from service.core.store import SessionStore
from service.errors import (
    ClientNotReading,
    IdleTimeout,
    InvalidRequest,
    Overloaded,
    ParleyError,
    SessionNotFound,
    SessionTakenOver,
    ShuttingDown,
    StoreUnavailable,
)

__all__ = ["STATUS_FOR", "StreamLimits", "VoiceServicer"]

log = logging.getLogger(__name__)

STATUS_FOR: dict[type[ParleyError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SessionTakenOver: grpc.StatusCode.ABORTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdleTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ClientNotReading: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass(frozen=True)
class StreamLimits:
    """Limits on streams."""

    max_streams: int = 100
    idle_timeout_s: float = 600.0
    send_timeout_s: float = 30.0
    """A client that reads nothing for this long while messages wait is disconnected."""


def _status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS_FOR.items():
        if isinstance(error, kind):
            return code, str(error)
    log.error("stream failed", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _log_turn(session_id: str, ended: TurnEnded) -> None:
    stats = ended.stats
    log.info(
        "session %s turn %s %s: first token %d ms, first audio %d ms, total %d ms, %.1f s of audio%s",
        session_id[:8],
        ended.turn_id,
        ended.reason.value,
        stats.since_start_ms(stats.first_llm_token),
        stats.since_start_ms(stats.first_audio),
        stats.since_start_ms(stats.ended),
        stats.audio_ms_sent / 1000,
        f" ({ended.error})" if ended.error else "",
    )


class _Writer:
    """Sends a stream's events to the client, one message at a time; stopped only between messages.

    gRPC core goes on sending a message whose ``write`` was cancelled, and refuses a status sent
    meanwhile (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``), which leaves the client waiting for an end that
    never comes. So when the stream fails elsewhere, :meth:`stop` lets the message in flight go (for
    up to the send timeout) before the status is sent.
    """

    def __init__(self, session: Session, context: grpc.aio.ServicerContext, send_timeout_s: float) -> None:
        self._session = session
        self._context = context
        self._send_timeout_s = send_timeout_s
        self._stopping = False
        self._written = asyncio.Event()  # clear while a message is in flight
        self._written.set()

    async def run(self) -> None:
        """Send events until the session's event stream ends. Raises :class:`ClientNotReading`."""
        session = self._session
        while (event := await session.next_event()) is not None:
            if self._stopping:
                return
            session.mark_sent(event)
            self._written.clear()
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await self._context.write(event_to_proto(event))
            except TimeoutError:
                raise ClientNotReading(
                    f"the client read nothing for {self._send_timeout_s:g} s while replies waited; "
                    "the stream was closed"
                ) from None
            finally:
                self._written.set()
            if isinstance(event, TurnEnded):
                _log_turn(session.session_id, event)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Stop ``task`` (running :meth:`run`) once no message is in flight; return when it has ended."""
        if not task.done():
            self._stopping = True
            if not self._written.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._written.wait(), self._send_timeout_s)
            task.cancel()  # it waits for the next event (safe to cancel), or its write is stuck
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the stream's failure is taken from the task group


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (then re-raise that)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


class VoiceServicer(voice_pb2_grpc.VoiceServiceServicer):
    """Serves ``parley.v1.VoiceService`` with the given engines."""

    def __init__(
        self, llm: LLMEngine, tts: TTSEngine, defaults: SessionDefaults, limits: StreamLimits, store: SessionStore
    ) -> None:
        self._llm = llm
        self._tts = tts
        self._store = store
        self._defaults = defaults
        self._limits = limits
        self.active_streams = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._shutting_down = asyncio.Event()

    def shut_down(self) -> None:
        """Begin a graceful shutdown: every stream ends once its turn in progress has been sent, with
        UNAVAILABLE and a message that says to resume the session elsewhere."""
        self._shutting_down.set()

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
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is at its limit of {self._limits.max_streams} streams; retry later",
            )
        self.active_streams += 1
        self._drained.clear()
        session = Session(self._llm, self._tts, self._defaults, self._store)
        writer = _Writer(session, context, self._limits.send_timeout_s)
        # Outside the task group: a failure elsewhere stops it between messages, never during one.
        writing = asyncio.create_task(writer.run(), name="converse writer")
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                half_closed = asyncio.Event()
                group.create_task(self._read(request_iterator, session, half_closed), name="converse reader")
                watchers = (
                    group.create_task(self._watch_takeover(session), name="converse takeover watch"),
                    group.create_task(self._watch_shutdown(session), name="converse shutdown watch"),
                )
                group.create_task(self._joined(session, writing, half_closed, watchers), name="converse writer outcome")
        except* Exception as errors:
            failure = errors.exceptions[0]
        finally:
            try:
                await _to_the_end(self._close(writer, writing, session))
            finally:
                self.active_streams -= 1
                if self.active_streams == 0:
                    self._drained.set()
        if failure is not None:
            code, message = _status_for(failure)
            await context.abort(code, message)

    @staticmethod
    async def _close(writer: _Writer, writing: asyncio.Task[None], session: Session) -> None:
        """Stop the writer (between messages), then close the session (history written, claim let go)."""
        try:
            await writer.stop(writing)
        finally:
            await session.aclose()

    async def _joined(
        self,
        session: Session,
        writer: asyncio.Task[None],
        half_closed: asyncio.Event,
        watchers: tuple[asyncio.Task[None], ...],
    ) -> None:
        """The writer's outcome inside the task group, without the group being able to cancel it."""
        await asyncio.wait({writer})
        for watcher in watchers:
            watcher.cancel()  # the stream is over: stop watching
        writer.result()
        if self._shutting_down.is_set() and not half_closed.is_set():  # (a client that half-closed ends normally)
            where = f"resume session {session.session_id} on another replica" if session.session_id else "reconnect"
            raise ShuttingDown(f"the server is shutting down; {where}")

    async def _watch_shutdown(self, session: Session) -> None:
        """At shutdown, let the turn in progress end and begin no new one; the writer then sends what is
        left and ends, and the stream ends with it."""
        await self._shutting_down.wait()
        await session.finish()

    async def _watch_takeover(self, session: Session) -> None:
        await session.taken_over()
        raise SessionTakenOver(
            f"session {session.session_id} was resumed by another stream, which now has it; this stream ends "
            "so that turns never interleave"
        )

    async def _read(
        self, requests: AsyncIterator[pb.ConverseRequest], session: Session, half_closed: asyncio.Event
    ) -> None:
        iterator = aiter(requests)
        last_message = time.monotonic()
        pending: asyncio.Future[pb.ConverseRequest] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(iterator))
                idle_s = time.monotonic() - max(last_message, session.last_activity)
                limit = self._limits.idle_timeout_s
                if not session.busy and idle_s >= limit:
                    raise IdleTimeout(
                        f"no message for {limit:g} s, so the stream was closed as idle; open a new one to go on"
                    )
                done, _ = await asyncio.wait({pending}, timeout=limit if session.busy else limit - idle_s)
                if not done:
                    continue
                try:
                    request = pending.result()
                except StopAsyncIteration:
                    pending = None
                    half_closed.set()
                    await session.finish()
                    return
                pending = None
                last_message = time.monotonic()
                await self._handle(request, session)
        finally:
            if pending is not None:
                pending.cancel()

    async def _handle(self, request: pb.ConverseRequest, session: Session) -> None:
        kind = request.WhichOneof("kind")
        if kind == "start":
            await session.start(start_from_proto(request.start))
        elif kind == "user_text":
            await session.user_text(request.user_text.text, request.user_text.turn_id)
        elif kind == "speak_text":
            speak = request.speak_text
            await session.speak_text(speak.text, speak.flush, speak.turn_id)
        elif kind == "interrupt":
            played = request.interrupt.played_ms if request.interrupt.HasField("played_ms") else None
            if played is not None and played < 0:
                raise InvalidRequest(f"interrupt.played_ms is {played}; it cannot be negative")
            await session.interrupt(played)
        else:
            raise InvalidRequest(
                "the message sets none of start, user_text, speak_text, interrupt "
                "(an empty message, or a kind this server does not know)"
            )
