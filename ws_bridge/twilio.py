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
import contextlib
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.logs import shorten_session_ids
from ws_bridge.calls import accepted_write, answered

__all__ = ["TWILIO_PATH", "TwilioCall", "TwilioOptions", "signature", "signature_valid"]

log = logging.getLogger(__name__)

TWILIO_PATH = "/twilio"
RATE = 8000
START_WAIT_S = 10.0
"""How long a socket may take to send ``start``."""
MAX_PAYLOAD_BYTES = RATE  # one second of μ-law (Twilio sends 20 ms)
MAX_PARAMETER_CHARS = 8000
HANG_UP_GRACE_S = 0.25
"""After a hang-up, how long the service has to apply the interrupt before the call is cancelled."""
RESUME_WITHIN_S = 15.0
"""A call whose service replica went away (it shut down, or dropped the connection) is resumed on
another for this long; then the call ends."""
RESUME_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
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
    _call_started: bool = False
    """The current ``Converse`` call has started its session (a resumption may fail before it does)."""

    async def run(self) -> None:
        try:
            async with asyncio.timeout(START_WAIT_S):
                start = await self._wait_for_start()
        except TimeoutError:
            await self.websocket.close(1008, "no start message: this endpoint speaks Twilio Media Streams")
            return
        except CallError as error:
            await self.websocket.close(1008, str(error)[:120])
            return
        except ConnectionClosed:
            return
        greeting = _parameters(start).get("greeting") or self.options.greeting
        request = self._start_request(start)
        resuming_since: float | None = None  # the service went away then, and the call is being resumed
        attempt = 0
        while True:
            self._call_started = False
            call = await self._open(request, greeting if resuming_since is None else "")
            to_service = asyncio.create_task(self._twilio_to_service(call))
            to_twilio = asyncio.create_task(self._service_to_twilio(call))
            try:
                await asyncio.wait({to_service, to_twilio}, return_when=asyncio.FIRST_COMPLETED)
                if to_service.done() and not to_service.cancelled() and to_service.exception() is None:
                    # The caller hung up (or the line dropped): nobody listens. The interrupt just sent cuts
                    # the reply where they stopped hearing it; nothing more is said, and an utterance not
                    # yet answered is not (the call is cancelled, not half-closed).
                    await asyncio.wait({to_twilio}, timeout=HANG_UP_GRACE_S)
            finally:
                call.cancel()
                for task in (to_service, to_twilio):
                    task.cancel()
                results = await asyncio.gather(to_service, to_twilio, return_exceptions=True)
            caller_there = isinstance(results[0], asyncio.CancelledError)  # (not hung up, no bad frame)
            ended = results[1] if isinstance(results[1], grpc.aio.AioRpcError) else None
            if caller_there and ended is not None and self._resumable(ended):
                # The replica went away (a rolling update, a crash): the call goes on with its session
                # on another one, while the caller hears silence (and Twilio plays what it holds).
                now = asyncio.get_running_loop().time()
                if self._call_started:
                    resuming_since, attempt = now, 0
                assert resuming_since is not None
                if now - resuming_since < RESUME_WITHIN_S:
                    log.info(
                        "twilio stream %s: the service ended the call (%s); resuming session %s… on another replica",
                        self.stream_sid,
                        shorten_session_ids(ended.details() or ""),
                        self.session_id[:8],
                    )
                    await asyncio.sleep(RESUME_BACKOFF_S[min(attempt, len(RESUME_BACKOFF_S) - 1)])
                    attempt += 1
                    request = self._start_request(start)
                    request.session_id = self.session_id
                    continue
            await self._end(results)
            return

    async def _open(self, start: pb.Start, greeting: str) -> grpc.aio.StreamStreamCall:
        """A ``Converse`` call for this phone call, started (and the greeting asked for)."""
        call = self.stub.Converse(metadata=(("authorization", f"Bearer {self.api_key}"),) if self.api_key else None)
        await answered(call)  # accepted, or refused: then the reader reports why
        await accepted_write(call, pb.ConverseRequest(start=start))
        if greeting:
            await accepted_write(call, pb.ConverseRequest(speak_text=pb.SpeakText(text=greeting, flush=True)))
        return call

    def _resumable(self, error: grpc.aio.AioRpcError) -> bool:
        """The service ended the call as a replica does that goes away: UNAVAILABLE (shutting down,
        the connection lost), once it had started a session to resume elsewhere."""
        return error.code() == grpc.StatusCode.UNAVAILABLE and bool(self.session_id) and not self.websocket.close_code

    async def _end(self, results: tuple[object, object]) -> None:
        """Close the socket saying how the call ended: its tasks' ``results``."""
        failure = next((r for r in results if isinstance(r, CallError)), None)
        unexpected = [
            r
            for r in results
            if isinstance(r, Exception) and not isinstance(r, CallError | ConnectionClosed | grpc.aio.AioRpcError)
        ]
        for bug in unexpected:
            log.error("twilio call %s failed", self.stream_sid, exc_info=bug)
        ended = results[1] if isinstance(results[1], grpc.aio.AioRpcError) else None
        with contextlib.suppress(ConnectionClosed):
            if unexpected and failure is None:
                await self.websocket.close(1011, "internal error; see the bridge's log")
            elif failure is not None:
                log.warning("twilio call %s: %s", self.stream_sid, failure)
                await self.websocket.close(1008, str(failure)[:120])
            elif ended is not None:
                said = shorten_session_ids(ended.details() or "")
                log.warning("twilio stream %s: the service ended the call: %s", self.stream_sid, said)
                code = 1008 if ended.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) else 1011
                await self.websocket.close(code, f"{ended.code().name}: {ended.details() or ''}"[:120])
            else:
                await self.websocket.close(1000, "the call ended")

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
        )

    async def _twilio_to_service(self, call: grpc.aio.StreamStreamCall) -> None:
        """The caller's audio and Twilio's marks, until Twilio says ``stop`` or the socket closes
        (both: the call is over, see :meth:`_hung_up`)."""
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
                    if audio:
                        await self._write(call, pb.ConverseRequest(user_audio=pb.UserAudio(data=audio)))
                elif event == "mark":
                    name = _object(message, "mark").get("name")
                    if not isinstance(name, str):
                        raise CallError("a mark without a name")
                    self._heard(name)
                elif event == "stop":
                    log.info("twilio stream %s stopped (the call ended)", self.stream_sid)
                    break
                elif event == "dtmf":
                    log.info("twilio stream %s: a key was pressed", self.stream_sid)  # (never which: a PIN?)
                elif event not in ("connected", "start"):
                    raise CallError(f"unknown event {event!r}")
        except ConnectionClosed:
            log.info("twilio stream %s: the socket closed without stop", self.stream_sid)
        await self._hung_up(call)

    async def _service_to_twilio(self, call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError | None:
        """Play the service's replies until the call ends; the error it ended with, if any."""
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                kind = response.WhichOneof("kind")
                if kind == "audio":
                    await self._play(response.audio)
                elif kind == "speech_started":
                    await self._barge_in(call)
                elif kind == "session_started":
                    self.session_id = response.session_started.session_id
                    self._call_started = True
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
        name = f"{audio.turn_id}/{audio.sequence}"
        self._marks[name] = (audio.turn_id, turn.sent_ms)
        if audio.data:
            await self._send({"event": "media", "media": {"payload": base64.b64encode(audio.data).decode()}})
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
        caller stopped hearing it (then :meth:`run` cancels the call)."""
        playing = self._turns.get(self._playing or "")
        stop = pb.Interrupt()  # a reply still being made stops too (kept as far as it was sent)
        if playing is not None and not playing.cleared and playing.heard_ms < playing.sent_ms:
            playing.cleared = True
            stop.played_ms = round(playing.heard_ms)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._write(call, pb.ConverseRequest(clear_audio=pb.ClearAudio()))
            await self._write(call, pb.ConverseRequest(interrupt=stop))

    async def _write(self, call: grpc.aio.StreamStreamCall, request: pb.ConverseRequest) -> None:
        async with self._writing:
            await call.write(request)

    async def _barge_in(self, call: grpc.aio.StreamStreamCall) -> None:
        """The caller spoke over the reply: Twilio drops what it holds; the service keeps what was heard."""
        playing = self._turns.get(self._playing or "")
        if playing is None or playing.cleared or playing.heard_ms >= playing.sent_ms:
            return  # nothing is playing
        playing.cleared = True
        await self._send({"event": "clear"})
        self._marks = {name: mark for name, mark in self._marks.items() if mark[0] != self._playing}
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
