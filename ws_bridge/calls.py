"""The bridge's side of a ``Converse`` call, and of the socket it serves."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConcurrencyError, ConnectionClosed

from parley.v1 import voice_pb2 as pb

__all__ = ["ANSWER_WAIT_S", "CLOSE_CODE_FOR", "accepted_write", "answered", "close", "status_lost"]

_REASON_BYTES = 123  # the most a WebSocket close reason may hold

CLOSE_CODE_FOR: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 1000,
    grpc.StatusCode.INVALID_ARGUMENT: 1008,
    grpc.StatusCode.NOT_FOUND: 1008,
    grpc.StatusCode.UNAUTHENTICATED: 1008,
    grpc.StatusCode.PERMISSION_DENIED: 1008,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 1013,
    grpc.StatusCode.UNAVAILABLE: 1013,
    grpc.StatusCode.DEADLINE_EXCEEDED: 1001,
    grpc.StatusCode.CANCELLED: 1001,
}
"""How an ended ``Converse`` call closes its socket (the page's and a phone call's alike); other codes
close with 1011."""

ANSWER_WAIT_S = 2.0
"""How long a new call waits for the service's response headers before writing all the same (a
service from before it sent them at once answers only after the first request)."""


async def answered(call: grpc.aio.StreamStreamCall) -> None:
    """Return once the service has answered the call (accepted it, or refused it: then the call is
    over), or after :data:`ANSWER_WAIT_S`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ANSWER_WAIT_S):
            await call.initial_metadata()


async def accepted_write(call: grpc.aio.StreamStreamCall, request: pb.ConverseRequest) -> None:
    """Write ``request`` unless the call is over: a write that finds it over (the service refused the
    stream, say) would hide the service's status behind INTERNAL in grpc aio (grpc/grpc#36066); the
    reader reports that status. Call after :func:`answered`."""
    if call.done():
        return
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(request)


_LOST_STATUS_DETAILS = "Internal error from Core"


def status_lost(error: grpc.aio.AioRpcError) -> bool:
    """The call ended as a write met it ending, and grpc aio reported INTERNAL, "Internal error from
    Core", in place of the service's own status, which is lost (grpc/grpc#36066; a script writing
    while the service ended its streams got it in 190 of 200). :func:`accepted_write` cannot always
    come first: the end is known on the bridge's side a moment after the service sent it, and a phone
    call's audio goes on, 50 messages a second. Nothing of the service's says this (its errors have
    details of their own)."""
    return error.code() == grpc.StatusCode.INTERNAL and error.details() == _LOST_STATUS_DETAILS


async def close(websocket: ServerConnection, code: int, reason: str) -> None:
    """Close ``websocket`` with ``code`` and ``reason`` (cut, with "...", to what a close frame holds),
    reading and dropping what the client still sends meanwhile, unless another task reads it: a client
    that sends on would otherwise fill the socket's queue of unread frames, its answer to the close
    would wait unread behind them, and the socket would stay open until the close timed out."""
    encoded = reason.encode()
    if len(encoded) > _REASON_BYTES:
        reason = encoded[: _REASON_BYTES - 3].decode(errors="ignore") + "..."
    draining = asyncio.create_task(_drain(websocket))
    try:
        await websocket.close(code, reason)
    finally:
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)


async def _drain(websocket: ServerConnection) -> None:
    """Read and drop frames until the socket closes; while another task reads it, look again soon (it
    may stop reading before the close is over)."""
    while True:
        try:
            async for _ in websocket:
                pass
            return
        except ConnectionClosed:
            return
        except ConcurrencyError:
            await asyncio.sleep(_DRAIN_RETRY_S)


_DRAIN_RETRY_S = 0.05
