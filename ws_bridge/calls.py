"""The bridge's side of a ``Converse`` call, and of the socket it serves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc
from grpc._cython import cygrpc
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConcurrencyError, ConnectionClosed

from parley.v1 import voice_pb2 as pb

__all__ = ["ANSWER_WAIT_S", "CLOSE_CODE_FOR", "accepted_write", "answered", "close", "half_close"]

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


async def answered(call: grpc.aio.StreamStreamCall) -> bool:
    """Return once the service has answered the call (accepted it, or refused it: then the call is
    over), or after :data:`ANSWER_WAIT_S`; True when it accepted it (a service, not a connection that
    failed, says how the call ends from now on)."""
    try:
        async with asyncio.timeout(ANSWER_WAIT_S):
            await call.initial_metadata()
    except TimeoutError:
        return False
    return not call.done()


async def accepted_write(call: grpc.aio.StreamStreamCall, request: pb.ConverseRequest) -> bool:
    """Write ``request`` unless the call is over; False when it is (then nothing more should be
    written: the call's read reports how it ended). Call after :func:`answered`.

    A write that meets the call as it ends leaves the service's status to the read, as the service
    sent it. grpc aio's own ``write`` puts INTERNAL, "Internal error from Core", in its place for good
    when Core refuses the write of a call that is over (grpc/grpc#36066; a script writing back to back
    while the service ended its streams with UNAVAILABLE got that in 190 of 200 calls, and none through
    this): so a bridge would hang up a phone call whose replica went away, and a page whose microphone
    was on would take back a session another tab had taken over (it resumes after an INTERNAL end).
    The check of ``call.done()`` first cannot catch it: the end is known here a moment after the
    service sent it, and a phone's audio goes on, 50 messages a second."""
    if call.done():
        return False
    send = _core_send(call)
    if send is None:  # (not grpc aio's own call object: its write, and the status it may lose)
        try:
            await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False
        return True
    try:
        await call.wait_for_connection()  # (the call's headers went out: what grpc aio's write waits for)
        await send(request.SerializeToString())
    except (cygrpc.InternalError, grpc.aio.AioRpcError):
        return False  # Core refused it, or the call ended meanwhile: the read says how
    except asyncio.CancelledError:
        call.cancel()  # (as grpc aio's write does: a write cut off leaves the call unusable)
        raise
    return True


async def half_close(call: grpc.aio.StreamStreamCall) -> None:
    """Tell the service nothing more comes on ``call`` (a call already over is left as it ended)."""
    if not call.done():
        with contextlib.suppress(cygrpc.BaseError, asyncio.InvalidStateError):  # (it ended meanwhile)
            await call.done_writing()


def _core_send(call: grpc.aio.StreamStreamCall) -> Callable[[bytes], Awaitable[None]] | None:
    """The send of ``call``'s Core call, under grpc aio's write (which, when it fails, replaces the
    call's status); None if ``call`` has none (a stand-in, or a grpc release that moved it)."""
    core = getattr(call, "_cython_call", None)
    send = getattr(core, "send_serialized_message", None)
    return send if callable(send) else None


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
