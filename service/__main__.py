"""``python -m service``: run the Parley gRPC service."""

# ruff: noqa: E402 (gRPC's I/O stack is chosen before the imports that load gRPC)
from __future__ import annotations

from service.grpc_io import choose_io_stack

choose_io_stack()  # (before anything imports gRPC, which reads its experiments as it loads)

# isort: split
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError
from pydantic_settings import CliApp

from service.auth import KeyRing
from service.config import Settings, address, setting_names, unknown_variables
from service.core.codecs import CodecOptions, check_codecs
from service.core.history import HistoryLimits
from service.core.outbox import OutboxLimits
from service.core.quotas import QuotaLimits
from service.core.settings import SessionDefaults
from service.core.store import SessionStore
from service.core.turn import TurnOptions
from service.errors import EngineError, StoreUnavailable
from service.logs import configure as configure_logs
from service.logs import refusal
from service.server import serve_until_signal, start_server
from service.servicer import StreamLimits
from service.setting_errors import describe_errors
from service.stores.memory import MemoryStore
from service.telemetry import configure_tracing, tracing_settings_problem
from service.tls import ServerCertificates, TLSError
from service.workers import HURRY, WORKER_INDEX, become_worker, tell_ready

log = logging.getLogger("service")


async def run(settings: Settings) -> None:
    """Load the engines, serve until a signal, shut down."""
    from service.engines.factory import load_engines, load_voice_input

    check_codecs()  # a PyAV without libopus or libmp3lame: said now, not at a client's first turn
    configure_tracing()
    keys = load_keys(settings)  # a bad key file: said before the models load
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            tls = ServerCertificates(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        except TLSError as error:
            raise RuntimeError(str(error)) from error

    llm, tts = await asyncio.to_thread(load_engines, settings)
    voice_input = await asyncio.to_thread(load_voice_input, settings)
    store = await open_store(settings)
    defaults = SessionDefaults(
        system_prompt=settings.system_prompt,
        temperature=settings.llm_temperature,
        max_tokens=settings.llm_max_tokens,
        max_text_chars=settings.max_text_chars,
        idle_timeout_s=settings.idle_timeout_s,
        turn=TurnOptions(
            lookahead=settings.lookahead_segments,
            codecs=CodecOptions(settings.opus_bitrate, settings.opus_application, settings.mp3_bitrate),
        ),
        outbox=OutboxLimits(max_message_ms=settings.audio_chunk_ms, caption_gather_ms=settings.caption_gather_ms),
        history=HistoryLimits(settings.history_max_turns, settings.history_max_chars),
    )
    limits = StreamLimits(settings.max_streams, settings.send_timeout_s)
    worker = WORKER_INDEX in os.environ  # (set by the supervisor for its workers)
    # (A worker's metrics are read by its supervisor, which serves them all on the port.)
    metrics_host = "127.0.0.1" if worker else settings.host
    settle_memory()  # (before the port opens: the full collection holds the loop, and no stream's objects are frozen)
    try:
        running = await start_server(
            llm,
            tts,
            host=settings.host,
            port=settings.port,
            defaults=defaults,
            limits=limits,
            store=store,
            voice_input=voice_input,
            keys=keys,
            open_reflection=settings.open_reflection,
            tls=tls,
            token_secret=settings.token_secret,
            metrics_port=settings.metrics_port,
            metrics_host=metrics_host,
            share_port=worker,
            keepalive_s=settings.keepalive_s,
            quotas=QuotaLimits(
                settings.quota_streams, settings.quota_turns_per_minute, settings.quota_chars_per_minute
            ),
        )
        stt = voice_input.stt.name if voice_input else "none"
        # A worker tells its supervisor it serves before it says so in the log: one killed right after
        # its "listening" line is then restarted, not taken for a worker that cannot start.
        tell_ready(running.metrics_port)
        log.info(
            "Parley listening on %s (llm=%s, tts=%s, stt=%s, event loop=%s)",
            address(settings.host, running.port),
            llm.name,
            tts.name,
            stt,
            settings.event_loop,
        )
        if running.metrics_port is not None:
            log.info("metrics on http://%s/metrics", address(metrics_host, running.metrics_port))
        log.info(
            "transport: %s",
            "plaintext" if tls is None else "TLS with client certificates" if tls.mutual else "TLS",
        )
        if keys is not None:
            log.info(
                "authentication: API keys (%s)%s; health checks open",
                ", ".join(keys.names) or "none yet",
                ", and client tokens" if settings.token_secret else "",
            )
        elif settings.allow_unauthenticated:
            log.warning(
                "authentication: NONE, on %s (PARLEY_ALLOW_UNAUTHENTICATED): anyone who reaches it may use it",
                settings.host,
            )
        else:
            log.info("authentication: none; listening on loopback only")
        await serve_until_signal(running, settings.shutdown_grace_s, worker=worker)
    finally:
        await llm.aclose()
        await tts.aclose()
        if voice_input is not None:
            await voice_input.stt.aclose()
            await voice_input.detector.aclose()
        await store.aclose()


YOUNG_COLLECTION_GROWTH = 10_000
"""Tracked objects by which the live ones must grow before the collector runs (CPython's default: 700)."""


def settle_memory() -> None:
    """Set the garbage collector for a server that holds many streams, before it serves.

    - What is loaded by now (modules, engines, the models' Python objects, the store) lives as long
      as the process: it is taken out of the collector's sight, so that full collections scan only
      what the streams made. Under load (100 streams, scripted engines, 2-core AMD EPYC) a full
      collection held the event loop 48 to 57 ms without this, 20 ms with it, and the first audio's
      p99 overhead went from 65 to 10 ms.
    - The youngest generation is collected once the live objects grew by
      :data:`YOUNG_COLLECTION_GROWTH`, not by CPython's 700. A turn's objects (its tasks, coroutines
      and queues) live for seconds and are freed by their reference counts as it ends; at 700, every
      burst of turns starting set off a young collection that found them alive and moved them on to
      the older generations, whose collections then scanned them: at 200 streams on two workers
      (2-core AMD EPYC), 100 s of load gave each worker about 20 middle collections of up to 21 ms,
      young ones up to 13 ms and a full one of 36 to 40 ms, and those pauses made the first audio's
      p99 overhead. With 10,000, the same load gave no middle or full collection and at most two
      young ones over 5 ms. Garbage in reference cycles still counts toward that growth, so it is
      still collected: at most 10,000 objects of it wait."""
    gc.collect()
    gc.freeze()
    _, middle, full = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_GROWTH, middle, full)


def load_keys(settings: Settings) -> KeyRing | None:
    """The configured API keys, or None when none are. Raises RuntimeError saying what is wrong."""
    if settings.api_keys_file is None and not settings.api_keys:
        return None
    try:
        return KeyRing(settings.api_keys_file, settings.api_keys)
    except ValueError as error:
        raise RuntimeError(str(error)) from error


async def open_store(settings: Settings) -> SessionStore:
    """The configured session store, connected. Raises StoreUnavailable."""
    if settings.session_store == "redis":
        from service.stores.redis_store import RedisStore

        store = await RedisStore(settings.redis_url, prefix=settings.redis_prefix, ttl_s=settings.session_ttl_s).start()
        log.info(
            "sessions in Redis (prefix %s, expiring after %g s idle)", settings.redis_prefix, settings.session_ttl_s
        )
        return store
    log.info(
        "sessions in memory (at most %d, expiring after %g s idle)",
        settings.memory_max_sessions,
        settings.session_ttl_s,
    )
    return MemoryStore(settings.session_ttl_s, max_sessions=settings.memory_max_sessions)


def event_loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the service's event loop: uvloop's (the default) or asyncio's. Raises RuntimeError
    when uvloop is asked for and not installed."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as error:
        raise RuntimeError(
            f"PARLEY_EVENT_LOOP=uvloop, but uvloop cannot be imported ({error}); install it, or set "
            "PARLEY_EVENT_LOOP=asyncio"
        ) from None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    become_worker()  # (a supervisor's worker: first of all, it goes when its supervisor goes)
    try:
        settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as error:
        print(refusal("service", f"invalid setting:\n{describe_errors(error, setting_names)}", argv), file=sys.stderr)
        return 2
    if (problem := tracing_settings_problem()) is not None:
        print(refusal("service", f"invalid setting:\n  {problem}", argv), file=sys.stderr)
        return 2
    configure_logs(settings.log_level, settings.log_format)
    if WORKER_INDEX not in os.environ:  # (a worker's environment is its supervisor's, which said so)
        for line in unknown_variables(os.environ):
            log.warning("%s", line)
    if settings.worker_count > 1:
        from service.workers import supervise

        return asyncio.run(
            supervise(
                settings.worker_count,
                sys.argv[1:] if argv is None else argv,
                settings.metrics_port,
                host=settings.host,
                port=settings.port,
                reload_on_hup=settings.tls_cert_file is not None,
                timeout_s=settings.worker_timeout_s,
                grace_s=settings.shutdown_grace_s,
            )
        )
    if settings.log_level != "DEBUG":
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per upstream request otherwise
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            runner.run(run(settings))
    except (EngineError, StoreUnavailable) as error:
        log.error("cannot start: %s", error)
        return 1
    except RuntimeError as error:
        log.error("cannot start: %s", error)
        return 1
    finally:
        if WORKER_INDEX in os.environ:  # (the loop's handler went with it: a late HURRY must not kill it)
            signal.signal(HURRY, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
