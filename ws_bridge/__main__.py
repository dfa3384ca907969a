"""``python -m ws_bridge``: run the WebSocket bridge and its demo page.

Every option is also an environment variable (shown in ``--help``; see :mod:`ws_bridge.config`); flags win.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

import grpc
from pydantic import ValidationError
from pydantic_settings import CliApp

from service.logs import refusal
from ws_bridge.config import BridgeSettings, describe_errors, unknown_variables
from ws_bridge.logs import configure as configure_logs
from ws_bridge.server import Bridge, BridgeOptions
from ws_bridge.twilio import TwilioOptions

log = logging.getLogger("ws_bridge")


def bridge_options(settings: BridgeSettings) -> BridgeOptions:
    """What the bridge itself needs from the settings."""
    return BridgeOptions(
        grpc_target=settings.grpc_target,
        host=settings.host,
        port=settings.port,
        allowed_origins=settings.origins,
        max_frame_bytes=settings.max_frame_bytes,
        max_sockets=settings.max_sockets,
        ping_interval_s=settings.ping_interval_s,
        ping_timeout_s=settings.ping_interval_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        twilio=TwilioOptions(
            settings.twilio_auth_token, settings.twilio_public_url, settings.twilio_greeting, settings.twilio_unchecked
        ),
        grpc_tls=settings.grpc_tls,
        api_key=settings.api_key,
        metrics_port=settings.metrics_port,
        grpc_ca=Path(settings.grpc_ca_file).read_bytes() if settings.grpc_ca_file else None,
        tls_cert_file=Path(settings.tls_cert_file) if settings.tls_cert_file else None,
        tls_key_file=Path(settings.tls_key_file) if settings.tls_key_file else None,
    )


async def run(options: BridgeOptions) -> None:
    bridge = await Bridge(options).start()
    page = f"{'https' if options.tls_cert_file else 'http'}://localhost:{bridge.port}/"
    log.info("bridge listening on %s:%d for the service at %s", options.host, bridge.port, options.grpc_target)
    if options.metrics_port is not None:
        log.info("bridge metrics on http://%s:%d/metrics", options.host, bridge.metrics_port)
    if not options.twilio.auth_token:  # (with one, Twilio's signature checks every call)
        if options.twilio.unchecked:
            log.warning(
                "phone calls on /twilio are not checked (PARLEY_TWILIO_UNCHECKED, no PARLEY_TWILIO_AUTH_TOKEN): anyone "
                "who reaches the bridge may call%s; for development only",
                ", with its API key" if options.api_key else "",
            )
        else:
            log.info("phone calls on /twilio are refused until PARLEY_TWILIO_AUTH_TOKEN is set")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (nohup's: it stays ignored)
        # (A closed terminal's: the sockets are closed going away, as on SIGTERM, not cut.)
        loop.add_signal_handler(signal.SIGHUP, _hung_up, stop)
    asyncio.create_task(_announce_when_ready(bridge, options, page))
    await stop.wait()
    log.info("shutting down the bridge (%d socket(s) open)", bridge.sockets)
    stop.clear()  # (a second signal: the phone calls still going on end at once)
    await bridge.aclose(options.shutdown_grace_s, hurry=stop)


def _hung_up(stop: asyncio.Event) -> None:
    log.info("SIGHUP: shutting down as on SIGTERM")
    stop.set()


async def _announce_when_ready(bridge: Bridge, options: BridgeOptions, page: str) -> None:
    warned = False
    while True:
        try:
            async with asyncio.timeout(5):
                await bridge.channel.channel_ready()
            break
        except TimeoutError:
            if not warned:
                log.warning(
                    "the service at %s is not answering yet; the page will say so until it does", options.grpc_target
                )
                warned = True
    log.info("ready: open %s", page)
    if not _is_loopback(options.host) and await _takes_anyone(bridge):
        log.warning(
            "the service takes calls without credentials, and this bridge listens on %s: anyone who reaches the "
            "bridge may use the service; give the service API keys (the page then needs a #token=)",
            options.host,
        )


async def _takes_anyone(bridge: Bridge) -> bool:
    from parley.v1 import voice_pb2 as pb
    from parley.v1 import voice_pb2_grpc

    try:
        await voice_pb2_grpc.VoiceServiceStub(bridge.channel).ListVoices(pb.ListVoicesRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        settings = CliApp.run(BridgeSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as error:
        print(refusal("ws_bridge", f"invalid setting:\n{describe_errors(error)}", argv), file=sys.stderr)
        return 2
    configure_logs(settings.log_level, settings.log_format)
    for line in unknown_variables(os.environ):
        log.warning("%s", line)
    # websockets logs handshake headers at DEBUG, and a client token rides in one: never below INFO.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))
    try:
        asyncio.run(run(bridge_options(settings)))
    except (OSError, ssl.SSLError, ValueError) as error:
        log.error("cannot start the bridge: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
