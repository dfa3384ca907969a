"""The gRPC server: the voice service, health checking, reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parley.v1 import voice_pb2
from service.auth import Authenticator, AuthInterceptor, KeyRing
from service.config import address
from service.core.engine import LLMEngine, TTSEngine
from service.core.hearing import VoiceInput
from service.core.quotas import QuotaLimits, Quotas
from service.core.settings import SessionDefaults
from service.core.store import DEFAULT_SESSION_TTL_S, SessionStore
from service.errors import StoreUnavailable
from service.metrics import Metrics
from service.rpc import add_voice_service
from service.servicer import StreamLimits, VoiceServicer
from service.stores.memory import MemoryStore
from service.tls import ServerCertificates
from service.workers import HURRY, port_taken

__all__ = ["DRAIN_S", "RunningServer", "serve_until_signal", "start_server"]

log = logging.getLogger(__name__)

SERVICE_NAME = voice_pb2.DESCRIPTOR.services_by_name["VoiceService"].full_name
CONVERSE_METHOD = f"/{SERVICE_NAME}/Converse"
DRAIN_S = 10.0  # streams cut at shutdown write their history (a store write or two) within this
CUT_LEAD_S = 2.0  # turns still running this long before the grace period ends are stopped (see RunningServer.stop)
GRACE_OVER_LEAD_S = 0.05  # the servicer is told the grace is over this long before gRPC cancels the calls left
KEEPALIVE_TIMEOUT_S = 20.0
"""How long a connection has to answer the server's keepalive ping: a client on a busy machine or a slow
network answers late, not never."""
CLIENT_PING_MIN_S = 5.0
"""The shortest interval between a client's own keepalive pings on a connection with no data the server
accepts (gRPC's default is 5 minutes: a client pinging every 30 s would be sent away, GOAWAY "Too many
pings"). Half the 10 s many clients take as their shortest, so that one pinging every 10 s is never
early."""


@dataclass
class RunningServer:
    """A started server and the port it listens on."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: VoiceServicer
    tls: ServerCertificates | None = None
    metrics_port: int | None = None
    """Where ``/metrics`` is served (on the same host), if it is."""
    store_watch: asyncio.Task[None] | None = None
    """Checks the session store, and says in the health service whether streams can start."""

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new streams, give streams in flight ``grace_s`` to finish, then
        wait (a bounded time) until the streams cut short have written their history.

        A turn still running :data:`CUT_LEAD_S` before the grace period ends (half way through a
        shorter one) is stopped then, so that its stream ends with Parley's UNAVAILABLE, which says
        where to resume the session, rather than with gRPC's cancellation of every call left."""
        if self.store_watch is not None:
            self.store_watch.cancel()
        await self.health.enter_graceful_shutdown()
        self.servicer.shut_down()
        loop = asyncio.get_running_loop()
        cutting = loop.call_later(grace_s - min(CUT_LEAD_S, grace_s / 2), self.servicer.cut_streams)
        # (Just before gRPC cancels the calls still open, so that their ends count as the shutdown's.)
        ending = loop.call_later(max(0.0, grace_s - GRACE_OVER_LEAD_S), self.servicer.grace_over)
        try:
            await self.server.stop(grace_s)
        finally:
            cutting.cancel()
            ending.cancel()
        try:
            async with asyncio.timeout(DRAIN_S):
                await self.servicer.drained()
        except TimeoutError:
            log.warning(
                "%d stream(s) still closing after %g s; stopping without them", self.servicer.active_streams, DRAIN_S
            )


async def start_server(
    llm: LLMEngine,
    tts: TTSEngine,
    *,
    host: str,
    port: int,
    defaults: SessionDefaults,
    limits: StreamLimits,
    store: SessionStore | None = None,
    voice_input: VoiceInput | None = None,
    keys: KeyRing | None = None,
    open_reflection: bool = False,
    tls: ServerCertificates | None = None,
    token_secret: str = "",
    quotas: QuotaLimits | None = None,
    metrics_port: int | None = None,
    share_port: bool = False,
    keepalive_s: float = 0.0,
    metrics_host: str | None = None,
) -> RunningServer:
    """Start serving on ``host:port`` (port 0 picks a free one). Raises RuntimeError if it cannot bind.
    Without a store, sessions live in this process (the memory store with its defaults). Without
    ``voice_input``, sessions take text only. With ``keys``, every call but health checks (and
    reflection, if ``open_reflection``) needs one of them. Metrics are served on ``metrics_host`` (by
    default ``host``) and ``metrics_port``. With ``keepalive_s``, each client connection
    is pinged that often and closed if it does not answer (see :func:`keepalive_options`)."""
    store = store if store is not None else MemoryStore(ttl_s=DEFAULT_SESSION_TTL_S)
    metrics = Metrics(llm.name, tts.name, limits.max_streams, store)

    def refused(method: str) -> None:
        if method == CONVERSE_METHOD:  # (the metric counts streams)
            metrics.stream_ended("error", grpc.StatusCode.UNAUTHENTICATED.name)

    auth = Authenticator(keys, token_secret) if keys is not None else None
    interceptors = [AuthInterceptor(auth, open_reflection=open_reflection, refused=refused)] if auth is not None else []
    # Only workers share a port (SO_REUSEPORT, which gRPC sets by default): a second lone service on
    # a port in use fails to start instead of silently taking half its connections.
    options: list[tuple[str, int]] = [("grpc.so_reuseport", 1 if share_port else 0)]
    server = grpc.aio.server(interceptors=interceptors, options=options + keepalive_options(keepalive_s))
    servicer = VoiceServicer(
        llm,
        tts,
        defaults,
        limits,
        store,
        voice_input,
        auth,
        Quotas(quotas) if quotas is not None and quotas.any else None,
        metrics,
    )
    add_voice_service(servicer, server)  # (the generated registration, with malformed requests rejected)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    listen = address(host, port)
    failure = f"cannot listen on {listen}"
    try:
        bound = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError as error:  # (grpc's "Failed to bind to address ...; set GRPC_VERBOSITY=debug ...")
        bound, failure = 0, str(error)
    if metrics_port is not None and servicer.metrics is not None:
        metrics_host = metrics_host or host
        try:
            metrics_port = servicer.metrics.serve(metrics_host, metrics_port)
        except OSError as error:
            said = error.strerror or error
            raise RuntimeError(f"cannot serve metrics on {address(metrics_host, metrics_port)}: {said}") from None
    if bound == 0:
        raise RuntimeError(port_taken(host, port) or failure)  # (the cause, when a probe finds one)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watch = asyncio.create_task(watch_store(store, health_servicer, metrics), name="session store watch")
    return RunningServer(server, bound, health_servicer, servicer, tls, metrics_port, watch)


def keepalive_options(interval_s: float) -> list[tuple[str, int]]:
    """gRPC's options for a server that pings each client connection every ``interval_s`` (0: gRPC's
    default, every 2 hours) and closes one that does not answer within :data:`KEEPALIVE_TIMEOUT_S`: a
    client gone without a word (its network lost, its laptop asleep) would otherwise hold its streams,
    their slots and their sessions until the idle timeout. The pings go on while no data does (an open
    stream between turns). Clients may ping every :data:`CLIENT_PING_MIN_S` themselves (with the
    server's own pings off too)."""
    clients = [("grpc.http2.min_ping_interval_without_data_ms", round(CLIENT_PING_MIN_S * 1000))]
    if not interval_s:
        return clients
    interval_ms = round(interval_s * 1000)
    timeout_ms = round(KEEPALIVE_TIMEOUT_S * 1000)
    # (gRPC core waits for a keepalive ping's answer for the ping timeout, a minute by default, as for
    # any ping: the keepalive timeout alone closed nothing in the test of a silent client. And the
    # option for the clients' pings is not named as its C macro is: GRPC_ARG_HTTP2_MIN_RECV_PING_...)
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        *clients,
    ]


STORE_CHECK_S = 2.0
"""How often the session store is checked (a Redis PING), and how long it has to answer."""


async def watch_store(store: SessionStore, health_servicer: health.aio.HealthServicer, metrics: Metrics) -> None:
    """While the session store does not answer, no stream can start (each would fail after the
    store's timeout): the voice service reports NOT_SERVING, so that readiness checks (Kubernetes's
    probe names it) send new streams elsewhere, until it answers again. The process's own health
    (the empty service name: liveness) stays SERVING: restarting it would not bring the store back."""
    down_since: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(STORE_CHECK_S)
        try:
            async with asyncio.timeout(STORE_CHECK_S):
                await store.check()
        except (StoreUnavailable, TimeoutError) as error:
            if down_since is None:
                down_since = loop.time()
                said = str(error) or f"no answer in {STORE_CHECK_S:g} s"
                log.warning("the session store does not answer (%s): NOT_SERVING until it does", said)
                metrics.store_up.set(0)
                await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            continue
        if down_since is not None:
            log.warning("the session store answers again, after %.0f s: SERVING", loop.time() - down_since)
            down_since = None
            metrics.store_up.set(1)
            await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)


async def serve_until_signal(running: RunningServer, grace_s: float, *, worker: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; a second SIGTERM or SIGINT meanwhile
    ends the turns still running at once, as the grace period's end would (an operator's Ctrl-C twice).
    A ``worker`` hurries on :data:`service.workers.HURRY` only, its supervisor's word for a second
    signal: a signal to the whole process group (``kill -TERM -PGID``, systemd's stop) reaches it
    twice, once from the group and once from its supervisor, which is still one signal.
    SIGHUP reads the TLS certificates again (at the next connection); without TLS there is nothing to
    read again, and SIGHUP (a closed terminal's, most often) shuts down gracefully too, where Python's
    default ended the process at once (streams cut, turns unsaved, sessions left claimed), unless it
    was ignored when the process started (``nohup``: it stays ignored). A signal ignored when the
    process started stays ignored (a worker's SIGINT: its supervisor passes the terminal's Ctrl-C on;
    SIGINT in a shell script's background job)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    hurry: asyncio.Future[str] = loop.create_future()  # (why the turns still running end at once)
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            # (One handler counts them: two signals handled in one turn of a busy loop are still two.)
            loop.add_signal_handler(sig, _signalled, stop, None if worker else hurry, signal.Signals(sig).name)
    if worker:
        loop.add_signal_handler(HURRY, _hurry, stop, hurry, "told by the supervisor (a second signal)")
    if running.tls is not None:
        loop.add_signal_handler(signal.SIGHUP, running.tls.reload_now)
    elif signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (nohup's, or a worker's: its supervisor's call)
        loop.add_signal_handler(signal.SIGHUP, _hung_up, stop)
    await stop.wait()
    log.info(
        "shutting down: health NOT_SERVING, %d stream(s) get %g s to finish (%s to end them now)",
        running.servicer.active_streams,
        grace_s,
        "signal the supervisor again" if worker else "signal again",
    )

    async def hurrying() -> None:
        running.servicer.cut_streams(await hurry)

    waiting = asyncio.create_task(hurrying())
    try:
        await running.stop(grace_s)
    finally:
        waiting.cancel()
    log.info("stopped")


def _signalled(stop: asyncio.Event, hurry: asyncio.Future[str] | None, name: str) -> None:
    """SIGTERM or SIGINT: the first stops; a second (``hurry``: not in a worker) hurries."""
    if not stop.is_set():
        stop.set()
    elif hurry is not None:
        _hurry(stop, hurry, f"{name} again, during the shutdown")


def _hurry(stop: asyncio.Event, hurry: asyncio.Future[str], why: str) -> None:
    stop.set()
    if not hurry.done():
        hurry.set_result(why)


def _hung_up(stop: asyncio.Event) -> None:
    log.info("SIGHUP, and no TLS certificates to read again: shutting down as on SIGTERM")
    stop.set()
