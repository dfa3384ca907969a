"""The WebSocket bridge: one ``Converse`` call per WebSocket, and the demo page.

The bridge is a gRPC *client* of the service; it never imports the service's code. Each socket on
``/ws`` gets its own ``Converse`` call: client text frames become ``ConverseRequest`` messages,
server messages become text frames (audio: binary frames), see :mod:`ws_bridge.translate`.
Cancellation goes both ways: a closed socket cancels the call; an ended call closes the socket with a
code and a reason that say why. Plain HTTP requests get the demo page (``/``), the voices
(``/voices``, JSON) and a health check (``/healthz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import ipaddress
import json
import logging
import mimetypes
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import grpc
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.logs import Throttled
from ws_bridge.calls import CLOSE_CODE_FOR, accepted_write, answered, close
from ws_bridge.config import default
from ws_bridge.metrics import BridgeMetrics, close_label
from ws_bridge.reading import ReadingConnection
from ws_bridge.translate import BadFrame, error_frame, frame_from_response, request_from_text, to_json
from ws_bridge.twilio import TWILIO_PATH, TwilioCall, TwilioOptions, signature_valid

__all__ = ["CHANNEL_OPTIONS", "CLOSE_CODE_FOR", "Bridge", "BridgeOptions"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
WS_PATH = "/ws"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_CALL_ENDED = object()
_CONNECT_WAIT_S = 3.0
_SHUTTING_DOWN = "the bridge is shutting down"
_READY_WAIT_S = 0.8  # (within a readiness probe's own timeout, 1 s by default in Kubernetes)
# The service is usually next door: reconnect quickly after it restarts.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),  # (a phone call waits at most 15 s for the service)
]


@dataclass(frozen=True)
class BridgeOptions:
    """Where to listen, where the service is, and the limits; the defaults are the settings' own."""

    grpc_target: str = default("grpc_target")
    host: str = default("host")
    port: int = default("port")
    allowed_origins: tuple[str, ...] = ()
    """Origins allowed besides the bridge's own and localhost, e.g. ``https://app.example.com``."""
    max_frame_bytes: int = default("max_frame_bytes")
    max_sockets: int = default("max_sockets")
    ping_interval_s: float = default("ping_interval_s")
    ping_timeout_s: float = default("ping_interval_s")
    shutdown_grace_s: float = default("shutdown_grace_s")
    twilio: TwilioOptions = TwilioOptions()
    """Phone calls on ``/twilio``."""
    grpc_tls: bool = False
    """Reach the service with TLS (trusting ``grpc_ca``, or the system's CAs)."""
    grpc_ca: bytes | None = None
    tls_cert_file: Path | None = None
    """Serve https and wss with this certificate chain (PEM) and ``tls_key_file``; read again when
    either file changes (the next connection uses the new one)."""
    tls_key_file: Path | None = None
    api_key: str = ""
    """An API key of the service, for what the bridge itself calls with: phone calls on ``/twilio``."""
    metrics_port: int | None = None
    """Serve the bridge's Prometheus metrics on this port (same address)."""


@dataclass
class Bridge:
    """Start with :meth:`start`, stop with :meth:`aclose`."""

    options: BridgeOptions
    sockets: int = 0
    _server: Server | None = None
    _channel: grpc.aio.Channel | None = None
    _calls: set[ServerConnection] = field(default_factory=set)
    """The sockets of phone calls in progress (a call cannot move to another bridge: a shutdown lets
    them end, for a while)."""
    _no_calls: asyncio.Event = field(default_factory=asyncio.Event)
    _tls: _ServerTLS | None = None
    metrics: BridgeMetrics = field(default_factory=BridgeMetrics)
    metrics_port: int | None = None
    """The port its metrics are served on (once started, if they are)."""
    _origin_refused: Throttled = field(default_factory=lambda: Throttled(log, logging.INFO))
    _call_refused: Throttled = field(default_factory=lambda: Throttled(log, logging.WARNING))
    """(Lines anyone may cause at will: written once in a while; the metrics count every refusal.)"""

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the service (once started)."""
        assert self._channel is not None
        return self._channel

    @property
    def port(self) -> int:
        """The port it listens on (useful with port 0)."""
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self) -> Bridge:
        if self.options.grpc_tls or self.options.grpc_ca:
            credentials = grpc.ssl_channel_credentials(self.options.grpc_ca)
            self._channel = grpc.aio.secure_channel(self.options.grpc_target, credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.options.grpc_target, options=CHANNEL_OPTIONS)
        self._tls = (
            _ServerTLS(self.options.tls_cert_file, self.options.tls_key_file) if self.options.tls_cert_file else None
        )
        self._stub = voice_pb2_grpc.VoiceServiceStub(self._channel)
        if self.options.metrics_port is not None:  # (first: a port taken stops it before it says it listens)
            try:
                self.metrics_port = self.metrics.serve(self.options.host, self.options.metrics_port)
            except OSError as error:
                await self._channel.close()
                where = f"{self.options.host}:{self.options.metrics_port}"
                raise OSError(error.errno, f"cannot serve metrics on {where}: {error.strerror or error}") from None
        self._server = await serve(
            self._handle,
            self.options.host,
            self.options.port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            compression=None,  # audio does not compress; JSON frames are small
            max_size=self.options.max_frame_bytes,
            ping_interval=self.options.ping_interval_s,
            ping_timeout=self.options.ping_timeout_s,
            server_header="parley-bridge",
            ssl=self._tls.context if self._tls else None,
            # A client that reads nothing for as long as it may leave a ping unanswered is cut.
            create_connection=cast(
                "type[ServerConnection]",
                functools.partial(
                    ReadingConnection,
                    stall_s=self.options.ping_interval_s + self.options.ping_timeout_s,
                    on_cut=lambda why: self.metrics.refused.labels("not reading").inc(),
                ),
            ),
        )
        return self

    async def aclose(self, call_grace_s: float = 0.0, hurry: asyncio.Event | None = None) -> None:
        """Close every socket (1001, going away, saying why: a page connects again, and resumes its
        session, through another bridge or this one restarted) and the gRPC channel. Phone calls in
        progress, which cannot move, may first go on for up to ``call_grace_s`` (or until ``hurry`` is
        set), while the bridge takes no new socket and the pages are closed."""
        if self._server is not None:
            if call_grace_s > 0 and self._calls:
                self._server.server.close()  # (no new socket: a balancer sends it to another bridge)
                pages = [c for c in self._server.connections if c not in self._calls]
                await asyncio.gather(*(c.close(1001, _SHUTTING_DOWN) for c in pages), return_exceptions=True)
                log.info("shutting down: %d phone call(s) get %g s to end", len(self._calls), call_grace_s)
                waits = {asyncio.ensure_future(self._no_calls.wait())}
                if hurry is not None:
                    waits.add(asyncio.ensure_future(hurry.wait()))
                try:
                    await asyncio.wait(waits, timeout=call_grace_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
                if self._calls:
                    log.info("shutting down: %d phone call(s) still going on end now", len(self._calls))
            self._server.close(reason=_SHUTTING_DOWN)
            await self._server.wait_closed()
        if self._channel is not None:
            await self._channel.close()

    # -- HTTP --------------------------------------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if (problem := _malformed(request)) is not None:
            self.metrics.refused.labels("bad request").inc()
            log.info("refused a malformed request: %s", problem)
            return _text(http.HTTPStatus.BAD_REQUEST, f"a malformed request: {problem}")
        return await self._route(request)

    async def _route(self, request: Request) -> Response | None:
        if self._tls is not None:
            self._tls.reload_if_changed()  # (for the next connection: this one's handshake is done)
        path = urlsplit(request.path).path
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await self._http(path, request.headers.get("Authorization", ""))
        if path == TWILIO_PATH:  # Twilio's signature says it is Twilio (it sends no Origin)
            if not signature_valid(self.options.twilio, request):
                self.metrics.refused.labels("twilio signature").inc()
                log.warning("refused a /twilio socket without a valid X-Twilio-Signature")
                return _text(http.HTTPStatus.FORBIDDEN, "invalid or missing X-Twilio-Signature")
            if refused := self._unchecked_call_refused(request):
                return refused
            if self.sockets >= self.options.max_sockets:
                self.metrics.refused.labels("socket limit").inc()
                return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "the bridge is at its socket limit; try again later")
            return None
        if path != WS_PATH:
            return _text(http.HTTPStatus.NOT_FOUND, f"the WebSocket endpoints are {WS_PATH} and {TWILIO_PATH}")
        if _credential_in_query(request.path):
            self.metrics.refused.labels("credentials in URL").inc()
            log.warning("refused a socket with credentials in its URL")
            return _text(
                http.HTTPStatus.BAD_REQUEST,
                "credentials in a URL end up in access logs: send the token as the subprotocol bearer.<token> "
                'or in a first frame {"auth": {"token": "..."}}, never in the query string',
            )
        if refused := self._foreign_origin(request, WS_PATH):
            return refused
        if self.sockets >= self.options.max_sockets:
            self.metrics.refused.labels("socket limit").inc()
            return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "the bridge is at its socket limit; try again later")
        return None

    def _unchecked_call_refused(self, request: Request) -> Response | None:
        """Without a Twilio auth token nothing proves a call is Twilio's, and the call reaches the service
        with the bridge's own API key: such calls are refused unless the bridge is told to take them
        (development), and even then not from another site's page in a browser (which sends its Origin)."""
        if self.options.twilio.auth_token:
            return None
        if not self.options.twilio.unchecked:
            self.metrics.refused.labels("twilio unchecked").inc()
            self._call_refused("refused a /twilio socket: no PARLEY_TWILIO_AUTH_TOKEN to check it with")
            return _text(
                http.HTTPStatus.FORBIDDEN,
                "this bridge takes phone calls only with Twilio's signature: set PARLEY_TWILIO_AUTH_TOKEN "
                "(or, for development, PARLEY_TWILIO_UNCHECKED=true)",
            )
        return self._foreign_origin(request, TWILIO_PATH)

    def _foreign_origin(self, request: Request, path: str) -> Response | None:
        """HTTP 403 for a socket on ``path`` that a page of an origin not allowed opens, else None."""
        origin = request.headers.get("Origin")
        if origin is None or self._origin_allowed(origin, request.headers.get("Host", "")):
            return None
        self.metrics.refused.labels("origin").inc()
        self._origin_refused("refused a %s socket from origin %s", path, origin)
        return _text(http.HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed")

    def _origin_allowed(self, origin: str, host: str) -> bool:
        if origin in self.options.allowed_origins:
            return True
        parts = urlsplit(origin)
        if parts.hostname in _LOCAL_HOSTS:
            return True
        # The bridge's own origin (its page), when reached by IP address. A name in Host proves nothing:
        # a page whose DNS name was rebound to this address sends its own name in both headers.
        return bool(host) and parts.netloc == host and _is_ip_address(urlsplit(f"//{host}").hostname)

    async def _http(self, path: str, authorization: str = "") -> Response:
        if path == "/healthz":  # (liveness: the bridge answers, whatever the service does)
            return _text(http.HTTPStatus.OK, "ok")
        if path == "/readyz":
            return await self._ready()
        if path == "/voices":
            return await self._voices(authorization)
        name = "index.html" if path == "/" else path.removeprefix("/")
        file = STATIC / name
        if "/" in name or not file.is_file():
            return _text(http.HTTPStatus.NOT_FOUND, f"no such page: {path}")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        return _response(http.HTTPStatus.OK, content_type, file.read_bytes(), cache="no-cache")

    async def _ready(self) -> Response:
        """Readiness: 200 while the bridge's channel reaches the service (waiting up to
        :data:`_READY_WAIT_S` for it to connect), else 503 saying so: a load balancer then sends pages
        and calls to a bridge that can serve them."""
        channel = self.channel
        if channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            try:
                async with asyncio.timeout(_READY_WAIT_S):
                    await channel.channel_ready()
            except TimeoutError:
                return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "the voice service is not reachable")
        return _text(http.HTTPStatus.OK, "ready")

    async def _voices(self, authorization: str) -> Response:
        """The service's voices; an ``Authorization: Bearer`` header is passed on (with API keys on)."""
        metadata = (("authorization", authorization),) if authorization else None
        try:
            voices = await self._stub.ListVoices(
                pb.ListVoicesRequest(), timeout=_CONNECT_WAIT_S, wait_for_ready=True, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                body = error_frame(error.code().name, error.details() or "")
                return _response(http.HTTPStatus.UNAUTHORIZED, "application/json", body.encode())
            # Not reached within the wait (DEADLINE_EXCEEDED) is the service being unavailable too.
            code = "UNAVAILABLE" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else error.code().name
            body = error_frame(code, f"the voice service is unavailable: {error.details()}")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, "application/json", body.encode())
        return _response(http.HTTPStatus.OK, "application/json", json.dumps(to_json(voices)).encode())

    # -- WebSocket ---------------------------------------------------------------------------------

    async def _handle(self, websocket: ServerConnection) -> None:
        self.sockets += 1
        self.metrics.sockets.set(self.sockets)
        try:
            if urlsplit(websocket.request.path).path == TWILIO_PATH if websocket.request else False:
                self._calls.add(websocket)
                self._no_calls.clear()
                try:
                    await TwilioCall(
                        websocket,
                        self._stub,
                        self.options.twilio,
                        api_key=self.options.api_key,
                        on_bad_frame=lambda: self.metrics.refused.labels("bad frame").inc(),
                    ).run()
                finally:
                    self._calls.discard(websocket)
                    if not self._calls:
                        self._no_calls.set()
            else:
                await self._converse(websocket)
        finally:
            self.sockets -= 1
            self.metrics.sockets.set(self.sockets)
            protocol = websocket.protocol
            sent = protocol.close_sent.code if protocol.close_sent is not None else None
            received = protocol.close_rcvd.code if protocol.close_rcvd is not None else None
            label = close_label(sent, received, protocol.close_rcvd_then_sent)
            self.metrics.closes.labels(label).inc()
            if label == "1009" and sent == 1009:  # (websockets closes so on a frame over the size limit)
                self.metrics.refused.labels("frame too large").inc()

    async def _converse(self, websocket: ServerConnection) -> None:
        assert self._channel is not None
        try:  # give a service that is (re)starting a moment before saying it is down
            async with asyncio.timeout(_CONNECT_WAIT_S):
                await self._channel.channel_ready()
        except TimeoutError:
            message = f"the voice service at {self.options.grpc_target} is unavailable; try again later"
            with contextlib.suppress(ConnectionClosed):
                await websocket.send(error_frame("UNAVAILABLE", message))
            await close(websocket, 1013, f"UNAVAILABLE: {message}")  # (as every close for a call's end says)
            return
        # The service's stream is opened with the first frame to forward (start), which must come
        # within _FIRST_FRAME_S, after the auth frame if the token comes in one.
        token = _subprotocol_token(websocket)
        deadline = asyncio.get_running_loop().time() + _FIRST_FRAME_S
        first = await self._first_frame(websocket, deadline)
        if first is None:
            return
        if token is None:  # the token may come in a first frame {"auth": {"token": "..."}}
            token, forward = _auth_frame(first)
            if token is not None and not _TOKEN.fullmatch(token):
                token = ""
            if token == "":
                await self._refuse_frame(websocket, "auth.token must be a token (printable ASCII)", "UNAUTHENTICATED")
                return
            if forward is None and (forward := await self._first_frame(websocket, deadline)) is None:
                return
            first = forward
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            request = _request_of(first)
        except BadFrame as error:
            await self._refuse_frame(websocket, str(error))
            return
        call = self._stub.Converse(metadata=metadata)
        await answered(call)  # accepted, or refused (see accepted_write)
        await accepted_write(call, request)
        to_service = asyncio.create_task(self._client_to_service(websocket, call))
        to_client = asyncio.create_task(self._service_to_client(websocket, call))
        try:
            done, _ = await asyncio.wait({to_service, to_client}, return_when=asyncio.FIRST_COMPLETED)
            if to_service in done and to_service.result() is _CALL_ENDED:
                await to_client  # the call is over: let the other side report how, then close
        finally:
            call.cancel()  # the socket closed (or the call ended): stop the service's work for it
            for task in (to_service, to_client):
                task.cancel()
            await asyncio.gather(to_service, to_client, return_exceptions=True)

    @staticmethod
    async def _first_frame(websocket: ServerConnection, deadline: float) -> str | bytes | None:
        """The socket's next frame, or None once it is closed: by the client, or here when it did not
        come by ``deadline`` (the loop's time; saying so in an error frame first)."""
        try:
            async with asyncio.timeout_at(deadline):
                return await websocket.recv()
        except TimeoutError:
            why = f"no message for {_FIRST_FRAME_S:g} s: send start (or auth, then start) first"
            with contextlib.suppress(ConnectionClosed):
                await websocket.send(error_frame("INVALID_ARGUMENT", why))
            await close(websocket, 1008, why)
        except ConnectionClosed:
            pass
        return None

    async def _client_to_service(self, websocket: ServerConnection, call: grpc.aio.StreamStreamCall) -> object:
        """Forward client frames until the socket closes, a frame is bad, or the call ends
        (then returns ``_CALL_ENDED``)."""
        with contextlib.suppress(ConnectionClosed):
            async for message in websocket:
                try:
                    request = _request_of(message)
                except BadFrame as error:
                    await self._refuse_frame(websocket, str(error))
                    return None
                if not await accepted_write(call, request):
                    return _CALL_ENDED
        return None

    async def _refuse_frame(self, websocket: ServerConnection, why: str, code: str = "INVALID_ARGUMENT") -> None:
        """A frame the bridge cannot forward, first or later: counted, said in an error frame, and the
        socket closed with 1008."""
        self.metrics.refused.labels("bad frame").inc()
        with contextlib.suppress(ConnectionClosed):
            await websocket.send(error_frame(code, why))
        await close(websocket, 1008, why)

    async def _service_to_client(self, websocket: ServerConnection, call: grpc.aio.StreamStreamCall) -> None:
        """Forward server messages until the call ends, then close the socket saying why."""
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                await websocket.send(frame_from_response(response))
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"the voice service is unavailable: {details}"
            with contextlib.suppress(ConnectionClosed):
                await websocket.send(error_frame(code.name, details, _retry_after(error)))
            await close(websocket, CLOSE_CODE_FOR.get(code, 1011), f"{code.name}: {details}")
            return
        except ConnectionClosed:
            return
        await close(websocket, 1000, "the conversation ended")


_FIRST_FRAME_S = 30.0
_TOKEN = re.compile(r"[!-~]{1,8192}")  # printable ASCII: what gRPC metadata can carry
_HEADER_VALUE = re.compile(r"[ -~]{1,8192}")
_CREDENTIAL_NAMES = frozenset({"token", "access_token", "key", "api_key", "apikey", "authorization", "auth"})
SUBPROTOCOL = "parley"
_BEARER_PREFIX = "bearer."


class _ServerTLS:
    """The bridge's certificate, read again when its files change."""

    def __init__(self, cert_file: Path, key_file: Path | None) -> None:
        if key_file is None:
            raise ValueError("the bridge's TLS needs a key file too")
        self._files = (cert_file, key_file)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)  # raises at start-up: said plainly by __main__
        self._stamps = self._stamp()

    def _stamp(self) -> tuple[int, ...]:
        stamps: list[int] = []
        for path in self._files:
            try:
                stat = path.stat()
                stamps += [stat.st_mtime_ns, stat.st_size]
            except OSError:
                stamps += [-1, -1]
        return tuple(stamps)

    def reload_if_changed(self) -> None:
        stamps = self._stamp()
        if stamps == self._stamps:
            return
        self._stamps = stamps
        try:
            # On a scratch context first: a failed load_cert_chain may leave a context half changed
            # (the new certificate without its key), which would break every later handshake.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*self._files)
            self.context.load_cert_chain(*self._files)
        except (OSError, ssl.SSLError) as error:
            log.error("the bridge's TLS certificate was not reloaded (%s); the one in use stays", error)
            return
        log.info("the bridge's TLS certificate was reloaded from %s", self._files[0])


def _request_of(message: str | bytes) -> pb.ConverseRequest:
    """A binary frame is the user's voice (user_audio); JSON text frames are the rest. Raises BadFrame."""
    if isinstance(message, bytes):
        if _is_json_object(message):  # (a client's slip, a Buffer or bytes sent for text: it was taken for voice)
            raise BadFrame("a JSON message came in a binary frame: send messages as text frames (binary is voice)")
        return pb.ConverseRequest(user_audio=pb.UserAudio(data=message))
    return request_from_text(message)


def _is_json_object(frame: bytes) -> bool:
    """Whether a binary frame is a JSON object: never voice (PCM16 that happens to begin with ``{`` and
    end with ``}`` is not UTF-8 JSON between them), and checked only for a frame so shaped."""
    if frame[:1] not in (b"{", b" ", b"\t", b"\n", b"\r"):
        return False
    stripped = frame.strip()
    if stripped[:1] != b"{" or stripped[-1:] != b"}":
        return False
    try:
        return isinstance(json.loads(frame), dict)
    except (ValueError, RecursionError):
        return False


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``parley`` when offered (a token rides beside it as ``bearer.<token>``); no subprotocol else."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


def _subprotocol_token(websocket: ServerConnection) -> str | None:
    """The token offered as the subprotocol ``bearer.<token>`` (browsers cannot set headers)."""
    request = websocket.request
    if request is None:
        return None
    for value in request.headers.get_all("Sec-WebSocket-Protocol"):
        for offered in value.split(","):
            offered = offered.strip()
            if offered.startswith(_BEARER_PREFIX) and len(offered) > len(_BEARER_PREFIX):
                return offered[len(_BEARER_PREFIX) :]
    return None


def _auth_frame(frame: str | bytes) -> tuple[str | None, str | bytes | None]:
    """A first frame ``{"auth": {"token": "..."}}``: its token (``""`` when malformed) and no frame
    left to forward; any other frame: no token, and the frame itself."""
    if isinstance(frame, bytes) or '"auth"' not in frame[:64]:
        return None, frame
    try:
        message = json.loads(frame)
    except (json.JSONDecodeError, RecursionError):  # (forwarded as it is: refused as a bad frame)
        return None, frame
    if not isinstance(message, dict) or set(message) != {"auth"}:
        return None, frame
    token = message["auth"].get("token") if isinstance(message["auth"], dict) else None
    return (token if isinstance(token, str) and token else ""), None


_READ_HEADERS = ("Host", "Upgrade", "Origin", "Authorization", "X-Twilio-Signature")


def _malformed(request: Request) -> str | None:
    """What makes ``request`` one the bridge cannot read, or None: a header it reads given more than
    once, a URL (the path, ``Host``, ``Origin``) that does not parse, an ``Authorization`` that gRPC
    metadata cannot carry. (Each was an HTTP 500 and a traceback.)"""
    for name in _READ_HEADERS:
        if len(request.headers.get_all(name)) > 1:
            return f"the {name} header is given more than once"
    host, origin = request.headers.get("Host", ""), request.headers.get("Origin")
    for what, url in (("the path", request.path), ("Host", f"//{host}"), ("Origin", origin)):
        try:
            if url is not None:
                urlsplit(url).port  # noqa: B018 - raises ValueError for an address that does not parse
        except ValueError as error:
            return f"{what} is not a URL ({error})"
    authorization = request.headers.get("Authorization")
    if authorization is not None and not _HEADER_VALUE.fullmatch(authorization):
        return "the Authorization header must be printable ASCII"
    return None


def _credential_in_query(path: str) -> bool:
    query = urlsplit(path).query
    return any(name.lower() in _CREDENTIAL_NAMES for name, _ in parse_qsl(query, keep_blank_values=True))


def _retry_after(error: grpc.aio.AioRpcError) -> int | None:
    """The service's ``retry-after-s`` trailing metadata (a quota), if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-s":
            with contextlib.suppress(ValueError):
                return max(int(value), 0)
    return None


def _is_ip_address(name: str | None) -> bool:
    try:
        ipaddress.ip_address(name or "")
    except ValueError:
        return False
    return True


def _response(status: http.HTTPStatus, content_type: str, body: bytes, cache: str = "no-store") -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", cache)])
    return Response(status.value, status.phrase, headers, body)


def _text(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, "text/plain; charset=utf-8", (text + "\n").encode())
