"""The bridge's side of a ``Converse`` call."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from parley.v1 import voice_pb2 as pb

__all__ = ["accepted_write"]


async def accepted_write(call: grpc.aio.StreamStreamCall, request: pb.ConverseRequest) -> None:
    """Write ``request`` unless the call is over: a write that finds it over (the service refused the
    stream, say) would hide the service's status behind INTERNAL in grpc aio (grpc/grpc#36066); the
    reader reports that status. Call after ``initial_metadata()``, which comes with the service's
    acceptance or its refusal."""
    if call.done():
        return
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(request)
