"""Phone calls: Twilio Media Streams (bidirectional, ``<Connect><Stream>``) on ``/twilio``.

One call is one socket and one ``Converse`` call, with G.711 μ-law at 8 kHz both ways and the
server's turn detection. Twilio's messages (its documented JSON: ``connected``, ``start``, ``media``,
``mark``, ``dtmf``, ``stop``) become ``ConverseRequest`` messages; the service's audio goes back as
``media`` messages (base64 μ-law, no header), each followed by a ``mark`` that Twilio echoes when the
caller has heard the audio before it. So the bridge knows how much of each reply the caller heard:
when the caller speaks over a reply, it sends ``clear`` (Twilio drops what it buffered) and an
``interrupt`` whose ``played_ms`` is where the last acknowledged mark was, and the conversation's
history keeps exactly what was heard.

``start.customParameters`` (``<Parameter>`` in the TwiML) may carry ``system_prompt``, ``voice``,
``session_id`` (to resume a conversation) and ``greeting`` (said when the call starts); the service
validates them as it does any ``start``. With a Twilio auth token configured, the upgrade request
must carry a valid ``X-Twilio-Signature`` (HMAC-SHA1 of the stream URL, keyed with the token).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.logs import shorten_session_ids
from ws_bridge.calls import CLOSE_CODE_FOR, accepted_write, answered, close

__all__ = ["TWILIO_PATH", "TwilioCall", "TwilioOptions", "signature", "signature_valid"]

log = logging.getLogger(__name__)

TWILIO_PATH = "/twilio"
RATE = 8000
START_WAIT_S = 10.0
"""How long a socket may take to send ``start``."""
MAX_PAYLOAD_BYTES = RATE  # one second of μ-law (Twilio sends 20 ms)
MAX_HELD_BYTES = RATE
"""The caller's audio held while no ``Converse`` call is current (before the first has started its
session, or between two): the newest second, sent first to the next once it has started."""
MARK_EVERY_MS = 200
MARK_EVERY_BYTES = RATE * MARK_EVERY_MS // 1000  # (μ-law: a byte a sample)
MAX_PARAMETER_CHARS = 8000
MAX_SID_CHARS = 64
"""Longest streamSid or callSid taken (Twilio's are 34 characters): the stream's id goes back with every
message sent to the call, and both into the log."""
HANG_UP_GRACE_S = 0.25
"""After a hang-up, how long the service has to apply the interrupt before the call is cancelled."""
RESUME_WITHIN_S = 15.0
"""A call waits this long for a replica to take it: when it comes in, and when its replica went away
(it shut down, or dropped the connection; the session is then resumed on another); then it ends."""
RESUME_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
MAX_QUICK_DROPS = 2
"""Streams in a row ended soon after they started (within :data:`RESUME_WITHIN_S`) that still get a
wait of their own; after more, a flapping service gets only what is left of the last wait."""
_PARAMETERS = ("system_prompt", "voice", "session_id", "greeting")


@dataclass(frozen=True)
class TwilioOptions:
    auth_token: str = ""
    """Twilio's auth token: with it, unsigned or wrongly signed upgrade requests are refused."""
    public_url: str = ""
    """The stream URL as Twilio is given it (``wss://example.com/twilio``), which it signs; empty: the
    upgrade request's ``Host`` with ``wss://``."""
    greeting: str = ""
    """Said when a call starts, unless the call's parameters give their own."""
    unchecked: bool = False
    """Without an auth token, take calls that nothing proves are Twilio's (development only); else
    refuse them."""


def signature(auth_token: str, url: str) -> str:
    """Twilio's request signature for a URL without POST parameters (a WebSocket upgrade)."""
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_valid(options: TwilioOptions, request: Request) -> bool:
    """Whether the upgrade request is Twilio's (always, without an auth token)."""
    if not options.auth_token:
        return True
    given = request.headers.get("X-Twilio-Signature", "")
    if not options.public_url:
        url = f"wss://{request.headers.get('Host', '')}{request.path}"
    elif "?" in options.public_url:
        url = options.public_url  # the exact URL, query included
    else:  # the URL without its query: the call's own query (per-call parameters) follows
        url = options.public_url + (request.path[request.path.index("?") :] if "?" in request.path else "")
    return hmac.compare_digest(given.encode(), signature(options.auth_token, url).encode())


class CallError(Exception):
    """The socket sent what is not Twilio's protocol: the call ends (close 1008)."""


@dataclass
class _Turn:
    sent_ms: float = 0.0
    heard_ms: float = 0.0
    cleared: bool = False


@dataclass
class TwilioCall:
    """One phone call: run it with :meth:`run`."""

    websocket: ServerConnection
    stub: voice_pb2_grpc.VoiceServiceStub
    options: TwilioOptions
    api_key: str = ""
    """The bridge's API key for the service (Twilio is checked by its signature, not by a key)."""
    on_bad_frame: Callable[[], None] | None = None
    """Told when the socket sent what is not Twilio's protocol (the call is refused or ends: 1008)."""
    stream_sid: str = ""
    _turns: dict[str, _Turn] = field(default_factory=dict)
    _marks: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Mark name → (turn, where its audio ends in the turn's timeline)."""
    _playing: str | None = None
    """The last turn whose audio was sent: what the caller may be hearing."""
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One write at a time on the call (the caller's audio and a barge-in come from two tasks)."""
    session_id: str = ""
    """The call's session, once the service has started it: what a call resumed elsewhere asks for."""
    _call: grpc.aio.StreamStreamCall | None = None
    """The ``Converse`` call the caller's audio goes to, once it has started its session; None before
    and between two (the audio is then held: :data:`MAX_HELD_BYTES`)."""
    _held: collections.deque[bytes] = field(default_factory=collections.deque)
    _held_bytes: int = 0
    _call_turns: set[str] = field(default_factory=set)
    """The turns of the current ``Converse`` call (an interrupt names only those)."""
    _started: asyncio.Event = field(default_factory=asyncio.Event)
    """The current ``Converse`` call has started its session (a resumption may fail before it does)."""
    _started_at: float = 0.0
    _conversations: int = 0
    """Conversations this call went on in after the first (a session lost: see :meth:`_converse`)."""
    _keys_pressed: int = 0
    """``dtmf`` events of the call (a line each would let a caller flood the log)."""

    async def run(self) -> None:
        try:
            async with asyncio.timeout(START_WAIT_S):
                start = await self._wait_for_start()
        except TimeoutError:
            await close(self.websocket, 1008, "no start message: this endpoint speaks Twilio Media Streams")
            return
        except CallError as error:
            log.warning("refused a /twilio call: %s", error)
            self._bad_frame()
            await close(self.websocket, 1008, str(error))
            return
        except ConnectionClosed:
            return
        greeting = _parameters(start).get("greeting") or self.options.greeting
        # One reader of Twilio's messages for the whole phone call, whichever Converse call is current.
        from_twilio = asyncio.create_task(self._from_twilio())
        try:
            code, reason = await self._converse(start, greeting, from_twilio)
        finally:
            from_twilio.cancel()
            await asyncio.gather(from_twilio, return_exceptions=True)
            if self._keys_pressed:
                log.info("twilio stream %s: %d key press(es) during the call", self.stream_sid, self._keys_pressed)
        with contextlib.suppress(ConnectionClosed):
            await close(self.websocket, code, shorten_session_ids(reason))

    async def _converse(self, start: dict[str, Any], greeting: str, from_twilio: asyncio.Task[None]) -> tuple[int, str]:
        """Hold the phone call's conversation until it ends; the socket's close code and reason.

        A call waits for a replica to take it for :data:`RESUME_WITHIN_S`: when it comes in (the
        service may be restarting, or the bridge's channel waiting to reconnect), and when the service
        ends its stream as a replica does that goes away (a rolling update, a crash): the conversation
        then goes on with its session on another replica, while the caller hears silence (and Twilio
        plays what it holds)."""
        loop = asyncio.get_running_loop()
        request = self._start_request(start)
        waiting_since = loop.time()  # the wait for a replica to take the call began then
        attempt = 0
        quick_drops = 0  # streams in a row that ended within RESUME_WITHIN_S of starting
        asked_session = True  # the call's own session_id parameter may be resumed (until its session is lost)
        while True:
            call = await self._open(request, "" if self.session_id else greeting)
            to_twilio = asyncio.create_task(self._to_twilio(call))
            try:
                if not await self._started_in_time(from_twilio, to_twilio, waiting_since + RESUME_WITHIN_S):
                    log.warning("twilio stream %s: no replica of the service took the call", self.stream_sid)
                    return (
                        CLOSE_CODE_FOR[grpc.StatusCode.UNAVAILABLE],
                        f"UNAVAILABLE: no replica of the voice service took the call within {RESUME_WITHIN_S:g} s",
                    )
                if self._started.is_set():
                    await self._take_audio(call)
                await asyncio.wait({from_twilio, to_twilio}, return_when=asyncio.FIRST_COMPLETED)
                if from_twilio.done():
                    return await self._caller_ended(from_twilio, call, to_twilio)
            finally:
                self._call = None
                call.cancel()
                to_twilio.cancel()
                ended = (await asyncio.gather(to_twilio, return_exceptions=True))[0]
            if not isinstance(ended, grpc.aio.AioRpcError):
                if ended is None:
                    return 1000, "the call ended"
                log.error("twilio call %s failed", self.stream_sid, exc_info=ended)
                return 1011, "internal error; see the bridge's log"
            said = shorten_session_ids(ended.details() or "")
            now = loop.time()
            if ended.code() == grpc.StatusCode.NOT_FOUND and self.session_id:
                # The session this call was in is gone (a service restarted with sessions in its memory):
                # the caller is still on the line; the call goes on in a new conversation (greeted again).
                log.warning(
                    "twilio stream %s: session %s… is gone (%s); the call goes on in a new conversation",
                    self.stream_sid,
                    self.session_id[:8],
                    said,
                )
                asked_session = False
                self._new_conversation()
                waiting_since, attempt = now, 0  # (its own wait for a replica to start it)
                request = self._start_request(start)
                request.session_id = ""
                continue
            if self._retryable(ended):
                # A stream that had started makes this a new outage, with a wait of its own; but streams
                # that keep being dropped soon after they start (a flapping replica) get no more.
                if self._started.is_set():
                    quick_drops = quick_drops + 1 if now - self._started_at < RESUME_WITHIN_S else 0
                    if quick_drops <= MAX_QUICK_DROPS:
                        waiting_since, attempt = now, 0
                if now < waiting_since + RESUME_WITHIN_S:
                    if self.session_id:
                        log.info(
                            "twilio stream %s: the service ended the call (%s); resuming session %s… elsewhere",
                            self.stream_sid,
                            said,
                            self.session_id[:8],
                        )
                    else:
                        log.info(
                            "twilio stream %s: the service did not take the call (%s); trying again",
                            self.stream_sid,
                            said,
                        )
                    await asyncio.wait({from_twilio}, timeout=RESUME_BACKOFF_S[min(attempt, len(RESUME_BACKOFF_S) - 1)])
                    if from_twilio.done():
                        return await self._caller_ended(from_twilio)
                    attempt += 1
                    request = self._start_request(start)
                    request.session_id = self.session_id or (request.session_id if asked_session else "")
                    continue
            log.warning("twilio stream %s: the service ended the call: %s", self.stream_sid, said)
            return CLOSE_CODE_FOR.get(ended.code(), 1011), f"{ended.code().name}: {ended.details() or ''}"

    def _new_conversation(self) -> None:
        """The call's session is gone: the next stream starts a new one, which numbers its turns from
        turn-1 again; what was played of the old ones, and their marks (which Twilio may still echo),
        are not taken for the new ones'."""
        self.session_id = ""
        self._turns, self._marks, self._playing = {}, {}, None
        self._conversations += 1

    async def _open(self, start: pb.Start, greeting: str) -> grpc.aio.StreamStreamCall:
        """A ``Converse`` call for this phone call, started (and the greeting asked for): the current one."""
        self._started.clear()
        self._call_turns = set()
        call = self.stub.Converse(metadata=(("authorization", f"Bearer {self.api_key}"),) if self.api_key else None)
        await answered(call)  # accepted, or refused: then the reader reports why
        await accepted_write(call, pb.ConverseRequest(start=start))
        if greeting:
            await accepted_write(call, pb.ConverseRequest(speak_text=pb.SpeakText(text=greeting, flush=True)))
        return call

    async def _take_audio(self, call: grpc.aio.StreamStreamCall) -> None:
        """``call`` started its session: it gets the caller's audio from now on, what was held first
        (more may come while that goes: it is held too, and goes next). Held audio is kept for a call
        that has started: one refused on the way (a replica full or going away) would lose it."""
        while self._held:
            audio = self._held.popleft()
            self._held_bytes -= len(audio)
            # (Through the lock: the reply's reader may write an interrupt meanwhile, and two writes at
            # once fail the call with INTERNAL, "Internal error from Core".)
            await self._write(call, pb.ConverseRequest(user_audio=pb.UserAudio(data=audio)))
        self._call = call

    async def _started_in_time(
        self, from_twilio: asyncio.Task[None], to_twilio: asyncio.Task[Any], deadline: float
    ) -> bool:
        """False if the stream has neither started its session nor ended by ``deadline`` (nor the caller
        hung up)."""
        started = asyncio.create_task(self._started.wait())
        try:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait({from_twilio, to_twilio, started}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        return from_twilio.done() or to_twilio.done() or self._started.is_set()

    def _retryable(self, error: grpc.aio.AioRpcError) -> bool:
        """The service ended the stream as a replica does that goes away, or is not there yet:
        UNAVAILABLE (shutting down, the connection lost or refused); or, before the stream started its
        session, RESOURCE_EXHAUSTED (the replica reached is full: another may not be)."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return True
        return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not self._started.is_set()

    async def _caller_ended(
        self,
        from_twilio: asyncio.Task[None],
        call: grpc.aio.StreamStreamCall | None = None,
        to_twilio: asyncio.Task[Any] | None = None,
    ) -> tuple[int, str]:
        """Twilio's side ended: the caller hung up (the call's reply is cut where they stopped hearing
        it), or the socket sent what is not Twilio's protocol."""
        error = None if from_twilio.cancelled() else from_twilio.exception()
        if isinstance(error, CallError):
            log.warning("twilio call %s: %s", self.stream_sid, error)
            self._bad_frame()
            return 1008, str(error)
        if error is not None:
            log.error("twilio call %s failed", self.stream_sid, exc_info=error)
            return 1011, "internal error; see the bridge's log"
        if call is not None and to_twilio is not None:
            # Nobody listens. The interrupt cuts the reply where they stopped hearing it; nothing more is
            # said, and an utterance not yet answered is not (the call is cancelled, not half-closed).
            await self._hung_up(call)
            await asyncio.wait({to_twilio}, timeout=HANG_UP_GRACE_S)
        return 1000, "the call ended"

    async def _wait_for_start(self) -> dict[str, Any]:
        async for frame in self.websocket:
            message = _message(frame)
            event = message.get("event")
            if event == "connected":
                continue
            if event != "start":
                raise CallError(f"expected start, got {event!r}")
            start = message.get("start")
            if not isinstance(start, dict) or not isinstance(message.get("streamSid"), str):
                raise CallError("start without a streamSid or its start object")
            for name, value in (("streamSid", message["streamSid"]), ("callSid", start.get("callSid", ""))):
                if not isinstance(value, str) or len(value) > MAX_SID_CHARS:  # (Twilio's are 34 characters)
                    raise CallError(f"{name} must be text of at most {MAX_SID_CHARS} characters")
            media = _object(start, "mediaFormat")
            if (media.get("encoding"), media.get("sampleRate"), media.get("channels")) != ("audio/x-mulaw", RATE, 1):
                raise CallError(f"unsupported mediaFormat {media!r}: expected audio/x-mulaw, 8000 Hz, 1 channel")
            _parameters(start)  # checked now: a bad one ends the call before the service is asked
            self.stream_sid = message["streamSid"]
            log.info("twilio call %s (stream %s) started", start.get("callSid", "?"), self.stream_sid)
            return start
        raise ConnectionClosed(None, None)

    def _start_request(self, start: dict[str, Any]) -> pb.Start:
        parameters = _parameters(start)
        return pb.Start(
            session_id=parameters.get("session_id", ""),
            voice=parameters.get("voice", ""),
            system_prompt=parameters.get("system_prompt", ""),
            audio=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=RATE),
            input_audio=pb.InputAudio(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=RATE),
            captions=pb.CAPTION_MODE_SEGMENTS,  # (a call shows no text: no caption deltas, half the messages)
        )

    async def _from_twilio(self) -> None:
        """The caller's audio (to the current ``Converse`` call; dropped between two) and Twilio's marks,
        until Twilio says ``stop`` or the socket closes: the caller hung up. Raises :class:`CallError`."""
        try:
            async for frame in self.websocket:
                message = _message(frame)
                event = message.get("event")
                if event == "media":
                    payload = _object(message, "media").get("payload")
                    if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD_BYTES * 4 // 3 + 4:
                        raise CallError("a media message without a payload, or over a second of audio")
                    try:
                        audio = base64.b64decode(payload, validate=True)
                    except binascii.Error as error:
                        raise CallError(f"a media payload that is not base64: {error}") from error
                    if len(audio) > MAX_PAYLOAD_BYTES:
                        raise CallError("a media message without a payload, or over a second of audio")
                    if not audio:
                        continue
                    if (call := self._call) is not None:
                        await self._write(call, pb.ConverseRequest(user_audio=pb.UserAudio(data=audio)))
                    else:
                        self._hold(audio)
                elif event == "mark":
                    name = _object(message, "mark").get("name")
                    if not isinstance(name, str):
                        raise CallError("a mark without a name")
                    self._heard(name)
                elif event == "stop":
                    log.info("twilio stream %s stopped (the call ended)", self.stream_sid)
                    return
                elif event == "dtmf":
                    self._keys_pressed += 1  # (never which: a PIN?; counted, and logged as the call ends)
                elif event not in ("connected", "start"):
                    raise CallError(f"unknown event {event!r}")
        except ConnectionClosed:
            log.info("twilio stream %s: the socket closed without stop", self.stream_sid)

    def _hold(self, audio: bytes) -> None:
        """Keep the caller's audio for the next ``Converse`` call: the newest :data:`MAX_HELD_BYTES`."""
        self._held.append(audio)
        self._held_bytes += len(audio)
        while self._held_bytes > MAX_HELD_BYTES:
            excess, oldest = self._held_bytes - MAX_HELD_BYTES, self._held[0]
            if len(oldest) <= excess:
                self._held.popleft()
                self._held_bytes -= len(oldest)
            else:
                self._held[0] = oldest[excess:]
                self._held_bytes -= excess

    def _bad_frame(self) -> None:
        if self.on_bad_frame is not None:
            self.on_bad_frame()

    async def _to_twilio(self, call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError | None:
        """Play the service's replies until the call ends; the error it ended with, if any."""
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                kind = response.WhichOneof("kind")
                if kind == "audio":
                    self._call_turns.add(response.audio.turn_id)
                    await self._play(response.audio)
                elif kind == "speech_started":
                    await self._barge_in(call)
                elif kind == "session_started":
                    self.session_id = response.session_started.session_id
                    self._started_at = asyncio.get_running_loop().time()
                    self._started.set()
                elif kind == "turn_ended" and response.turn_ended.error:
                    log.warning("twilio stream %s: turn failed: %s", self.stream_sid, response.turn_ended.error)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    async def _play(self, audio: pb.AudioChunk) -> None:
        turn = self._turns.setdefault(audio.turn_id, _Turn())
        if turn.cleared:
            return
        turn.sent_ms += audio.duration_ms
        if self._playing != audio.turn_id:  # a new reply: the last one's marks no longer matter
            self._marks.clear()
            self._turns = {audio.turn_id: turn}
        self._playing = audio.turn_id
        # A mark at least every MARK_EVERY_MS of audio, however long the service's messages are
        # (PARLEY_AUDIO_CHUNK_MS): the marks say how far the caller heard, and so where a barge-in cuts.
        data, ended_ms = audio.data, turn.sent_ms
        pieces = range(0, len(data), MARK_EVERY_BYTES) if data else range(1)
        for part, offset in enumerate(pieces):
            piece = data[offset : offset + MARK_EVERY_BYTES]
            name = f"{audio.turn_id}/{audio.sequence}" + (f".{part}" if len(pieces) > 1 else "")
            if self._conversations:
                name = f"{self._conversations}:{name}"
            heard_ms = (
                ended_ms - audio.duration_ms * (len(data) - offset - len(piece)) / len(data) if data else ended_ms
            )
            self._marks[name] = (audio.turn_id, heard_ms)
            if piece:
                await self._send({"event": "media", "media": {"payload": base64.b64encode(piece).decode()}})
            await self._send({"event": "mark", "mark": {"name": name}})

    def _heard(self, name: str) -> None:
        """Twilio played the audio up to mark ``name``."""
        found = self._marks.pop(name, None)
        if found is None:
            return
        turn = self._turns.get(found[0])
        if turn is not None and not turn.cleared:
            turn.heard_ms = max(turn.heard_ms, found[1])

    async def _hung_up(self, call: grpc.aio.StreamStreamCall) -> None:
        """Nobody listens any more: an utterance in progress is dropped, and the reply stops where the
        caller stopped hearing it (then the call is cancelled)."""
        playing = self._turns.get(self._playing or "")
        stop = pb.Interrupt()  # a reply still being made stops too (kept as far as it was sent)
        if playing is not None and not playing.cleared and playing.heard_ms < playing.sent_ms:
            playing.cleared = True
            if self._playing in self._call_turns:  # (a turn of a replica that went away is not this call's)
                stop.played_ms = round(playing.heard_ms)
        await self._write(call, pb.ConverseRequest(clear_audio=pb.ClearAudio()))
        await self._write(call, pb.ConverseRequest(interrupt=stop))

    async def _write(self, call: grpc.aio.StreamStreamCall, request: pb.ConverseRequest) -> None:
        """Write on ``call``, unless it is over: its reader then reports why (the service's status)."""
        async with self._writing:
            await accepted_write(call, request)

    async def _barge_in(self, call: grpc.aio.StreamStreamCall) -> None:
        """The caller spoke over the reply: Twilio drops what it holds; the service keeps what was heard."""
        playing = self._turns.get(self._playing or "")
        if playing is None or playing.cleared or playing.heard_ms >= playing.sent_ms:
            return  # nothing is playing
        playing.cleared = True
        await self._send({"event": "clear"})
        self._marks = {name: mark for name, mark in self._marks.items() if mark[0] != self._playing}
        if self._playing in self._call_turns:  # (a reply from a replica that went away: only Twilio held it)
            await self._write(call, pb.ConverseRequest(interrupt=pb.Interrupt(played_ms=round(playing.heard_ms))))

    async def _send(self, message: dict[str, Any]) -> None:
        await self.websocket.send(json.dumps({**message, "streamSid": self.stream_sid}))


def _message(frame: str | bytes) -> dict[str, Any]:
    if isinstance(frame, bytes):
        raise CallError("a binary frame: Twilio Media Streams sends JSON text")
    try:
        message = json.loads(frame)
    except json.JSONDecodeError as error:
        raise CallError(f"a frame that is not JSON: {error}") from error
    except RecursionError:
        raise CallError("a frame nested too deeply") from None
    if not isinstance(message, dict):
        raise CallError("a frame that is not a JSON object")
    return message


def _object(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise CallError(f"{key} is not an object")
    return value


def _parameters(start: dict[str, Any]) -> dict[str, str]:
    given = start.get("customParameters") or {}
    if not isinstance(given, dict):
        raise CallError("customParameters is not an object")
    chosen = {k: v for k, v in given.items() if k in _PARAMETERS}
    for name, value in chosen.items():
        if not isinstance(value, str) or len(value) > MAX_PARAMETER_CHARS:
            raise CallError(f"customParameters.{name} must be text of at most {MAX_PARAMETER_CHARS} characters")
    return chosen
