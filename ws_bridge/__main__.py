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

import grpc

from ws_bridge.server import Bridge, BridgeOptions

log = logging.getLogger("ws_bridge")


def parse_args(argv: list[str] | None) -> tuple[BridgeOptions, str]:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m ws_bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host",
        default=env.get("PARLEY_BRIDGE_HOST", "0.0.0.0"),
        help="address to listen on (PARLEY_BRIDGE_HOST; default 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env.get("PARLEY_BRIDGE_PORT", "8080")),
        help="port (PARLEY_BRIDGE_PORT; default 8080)",
    )
    parser.add_argument(
        "--grpc-target",
        default=env.get("PARLEY_GRPC_TARGET", "127.0.0.1:50051"),
        help="the Parley service (PARLEY_GRPC_TARGET; default 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--allowed-origins",
        default=env.get("PARLEY_BRIDGE_ALLOWED_ORIGINS", ""),
        help="comma-separated origins allowed besides the bridge's own and localhost (PARLEY_BRIDGE_ALLOWED_ORIGINS)",
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=int(env.get("PARLEY_BRIDGE_MAX_FRAME_BYTES", str(64 * 1024))),
        help="largest client frame; larger ones close with 1009 (PARLEY_BRIDGE_MAX_FRAME_BYTES; default 65536)",
    )
    parser.add_argument(
        "--max-sockets",
        type=int,
        default=int(env.get("PARLEY_BRIDGE_MAX_SOCKETS", "200")),
        help="concurrent sockets; more get HTTP 503 (PARLEY_BRIDGE_MAX_SOCKETS; default 200)",
    )
    parser.add_argument(
        "--ping-interval-s",
        type=float,
        default=float(env.get("PARLEY_BRIDGE_PING_INTERVAL_S", "20")),
        help="keepalive ping interval, also the pong timeout (PARLEY_BRIDGE_PING_INTERVAL_S; default 20)",
    )
    parser.add_argument(
        "--log-level",
        default=env.get("PARLEY_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (PARLEY_LOG_LEVEL; default INFO)",
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
    async with grpc.aio.insecure_channel(target) as channel:
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
