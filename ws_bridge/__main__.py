"""``python -m ws_bridge``: run the WebSocket bridge and its demo page.

Every option is also an environment variable (shown in ``--help``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import grpc

from ws_bridge.server import CHANNEL_OPTIONS, Bridge, BridgeOptions

log = logging.getLogger("ws_bridge")


def _option(parser: argparse.ArgumentParser, flag: str, env: str, default: str, help: str, **kwargs: Any) -> None:
    """A flag whose default comes from an environment variable; the help names both."""
    parser.add_argument(flag, default=os.environ.get(env, default), help=f"{help} ({env}; default {default})", **kwargs)


def parse_args(argv: list[str] | None) -> tuple[BridgeOptions, str]:
    parser = argparse.ArgumentParser(prog="python -m ws_bridge", description=__doc__.split("\n\n")[0])
    _option(parser, "--host", "PARLEY_BRIDGE_HOST", "0.0.0.0", "address to listen on")
    _option(parser, "--port", "PARLEY_BRIDGE_PORT", "8080", "port", type=int)
    _option(parser, "--grpc-target", "PARLEY_GRPC_TARGET", "127.0.0.1:50051", "the Parley service")
    _option(
        parser,
        "--allowed-origins",
        "PARLEY_BRIDGE_ALLOWED_ORIGINS",
        "",
        "comma-separated origins allowed besides the bridge's own and localhost",
    )
    _option(
        parser,
        "--max-frame-bytes",
        "PARLEY_BRIDGE_MAX_FRAME_BYTES",
        "65536",
        "largest client frame; larger ones close with 1009",
        type=int,
    )
    _option(
        parser, "--max-sockets", "PARLEY_BRIDGE_MAX_SOCKETS", "200", "concurrent sockets; more get HTTP 503", type=int
    )
    _option(
        parser,
        "--ping-interval-s",
        "PARLEY_BRIDGE_PING_INTERVAL_S",
        "20",
        "keepalive ping interval, also the pong timeout",
        type=float,
    )
    _option(
        parser, "--log-level", "PARLEY_LOG_LEVEL", "INFO", "log level", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    options = BridgeOptions(
        grpc_target=args.grpc_target,
        host=args.host,
        port=args.port,
        allowed_origins=origins,
        max_frame_bytes=args.max_frame_bytes,
        max_sockets=args.max_sockets,
        ping_interval_s=args.ping_interval_s,
        ping_timeout_s=args.ping_interval_s,
    )
    return options, args.log_level


async def run(options: BridgeOptions) -> None:
    bridge = await Bridge(options).start()
    page = f"http://localhost:{bridge.port}/"
    log.info("bridge listening on %s:%d for the service at %s", options.host, bridge.port, options.grpc_target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    asyncio.create_task(_announce_when_ready(options.grpc_target, page))
    await stop.wait()
    log.info("shutting down the bridge (%d socket(s) open)", bridge.sockets)
    await bridge.aclose()


async def _announce_when_ready(target: str, page: str) -> None:
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        warned = False
        while True:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=5)
                break
            except TimeoutError:
                if not warned:
                    log.warning("the service at %s is not answering yet; the page will say so until it does", target)
                    warned = True
    log.info("ready: open %s", page)


def main(argv: list[str] | None = None) -> int:
    options, level = parse_args(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(options))
    except OSError as error:
        log.error("cannot start the bridge: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
