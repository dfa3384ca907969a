"""The voice service's gRPC plumbing, for what grpc.aio's server does not do by itself: ending a call
whose client reads nothing (:func:`end_call`), and rejecting malformed requests (:class:`Malformed`).

A status travels behind the messages already queued on the stream, so a client that grants no HTTP/2
flow-control window never gets it; gRPC core even refuses it (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``)
while the batch of the stream's first message, which carries the initial metadata, is still in flight.
Only a cancellation (RST_STREAM) ends such a call, and grpc.aio (1.85) gives a handler no way to cancel
its call: its ``ServicerContext`` has no ``cancel()``, and a handler that ends, or is cancelled,
without a status leaves the call open, because grpc.aio holds it until core reports it finished.

A request whose bytes do not parse as the method's message (among them a string field that is not
UTF-8) ends the call with INVALID_ARGUMENT and one warning in the log. grpc.aio lets the
deserializer's DecodeError through: ``Converse`` would answer INTERNAL and log a traceback; for a
unary method it is raised before the handler runs, and grpc.aio logs a traceback and answers UNKNOWN.
So the deserializer gives :class:`Malformed` in place of a message, and the handlers' wrappers
turn it into the status.

:func:`add_voice_service` registers the service with both, in place of the generated
``add_VoiceServiceServicer_to_server``."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from parley.v1 import voice_pb2 as pb
from service.errors import ClientGone, InvalidRequest
from service.logs import Throttled

__all__ = ["Malformed", "add_voice_service", "end_call"]

log = logging.getLogger(__name__)
_log_malformed = Throttled(log, logging.WARNING)  # (anyone may cause it, at will)

SERVICE = pb.DESCRIPTOR.services_by_name["VoiceService"].full_name


async def end_call(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    grace_s: float,
    trailing: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    """End the handler's call with ``code`` and ``details``; if the client has not received them within
    ``grace_s`` (it reads nothing), cancel the call instead. Call it from the handler's own task once
    the stream's work has stopped and no ``write`` is running, and let what it raises propagate:
    grpc.aio's ``AbortError`` once the status is out, or ``CancelledError`` for a cancelled call."""
    try:
        async with asyncio.timeout(grace_s):
            await context.abort(code, details, trailing)  # returns only by raising AbortError, once the status is out
    except (TimeoutError, grpc.aio.InternalError):  # not out in time; refused; or the client went away
        pass
    _cancel_call()
    raise asyncio.CancelledError


def _cancel_call() -> None:
    """Make gRPC cancel the current handler's call (RST_STREAM) as soon as the handler has returned.

    How: for each call, grpc.aio runs a task (``_schedule_rpc_coro``) that waits, in
    ``_handle_cancellation_from_core``, for core to report the call finished, and only then releases
    it (``grpc_call_unref``). Core cancels a call that is released before it finished: it sends
    RST_STREAM and frees the stream with the messages still queued on it. Cancelling that waiting task
    makes it drop the call's state (``RPCState``) without waiting; once the handler has returned too,
    nothing holds the state (the wrapper of :func:`_converse` makes sure the servicer's objects do not),
    and its deallocation releases the call. The handler must then end with ``CancelledError``: grpc.aio
    sends nothing for it, where any other ending sends a status, which core refuses or which waits
    behind the queued messages for ever.

    The task is found among the loop's tasks by what it awaits and by the handler task it holds. If
    grpc.aio changes so that none matches, the call is left to end when the client goes away (logged).
    grpc.aio's accept loop (``_server_main_loop``) keeps a few call states in its local variables: the
    call it accepted last, until it accepts another; for good, the first call of the method registered
    last and the first call of a method not registered (neither is ``Converse``, registered first).
    """
    handler = asyncio.current_task()
    for task in asyncio.all_tasks():
        waiting = getattr(task.get_coro(), "cr_await", None)  # what the task's coroutine awaits now
        if getattr(waiting, "__name__", None) == "_handle_cancellation_from_core":
            # Its arguments, the handler's task among them, live in its closure, one of its referents.
            if any(ref is handler for scope in gc.get_referents(waiting) for ref in gc.get_referents(scope)):
                task.cancel()
                return
        elif waiting is not None and any(ref is handler for ref in gc.get_referents(waiting)):
            return  # it awaits the handler itself: the call has already finished (the client went away)
    log.warning("cannot cancel the gRPC call of %s; it stays open until the client goes away", handler)


@dataclass(frozen=True)
class Malformed:
    """What the request deserializer gives for bytes that do not parse: what the client must fix."""

    reason: str


def _parse(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer that gives :class:`Malformed` where ``FromString`` raises."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as error:  # e.g. "Error parsing message with type '…': String field had bad UTF-8"
            detail = str(error).rpartition(": ")[2] or "it does not parse"
            return Malformed(
                f"a request is not a valid {name} ({detail}); send a message serialized from "
                "parley/v1/voice.proto, with UTF-8 text in its string fields"
            )

    return parse


class _Requests:
    """grpc.aio's request iterator, until :meth:`release`; a :class:`Malformed` request raises
    InvalidRequest, and is logged (once: the stream ends with it). A read that grpc.aio refuses with
    one of its own errors because the call is over (``_ServerStoppedError``: a client that hung up as
    the server stopped) raises :class:`ClientGone`, as a write does: not a failure of the service."""

    def __init__(self, requests: AsyncIterator[Any], peer: str) -> None:
        self._requests: AsyncIterator[Any] | None = requests
        self._peer = peer

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._requests is None:
            raise StopAsyncIteration
        try:
            request = await anext(self._requests)
        except grpc.aio.AbortError:
            raise  # (the service's own abort of the call: gRPC sends its status)
        except grpc.aio.BaseError as error:
            raise ClientGone(f"the call is over ({type(error).__name__})") from error
        if isinstance(request, Malformed):
            _log_malformed("Converse from %s: %s", self._peer, request.reason)
            raise InvalidRequest(request.reason)
        return request

    def release(self) -> None:
        self._requests = None


class _Context:
    """grpc.aio's servicer context, until :meth:`release`."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context: grpc.aio.ServicerContext | None = context

    def __getattr__(self, name: str) -> Any:
        context = self.__dict__["_context"]
        if context is None:
            raise RuntimeError(f"the call has ended: its context has no {name} any more")
        return getattr(context, name)

    def release(self) -> None:
        self._context = None


def _converse(handler: Callable[[Any, Any], Awaitable[None]]) -> Callable[[Any, Any], Awaitable[None]]:
    """``handler`` (``Converse``), given stand-ins for grpc.aio's request iterator and context that let go
    of them when it returns: whatever the servicer's objects keep afterwards (a task, a traceback in
    a reference cycle, until the garbage collector runs) then holds no part of the call, so a call
    cancelled by :func:`end_call` is released as soon as grpc.aio lets go of it."""

    async def converse(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        requests, stand_in = _Requests(request_iterator, context.peer()), _Context(context)
        del request_iterator, context  # (this frame is in the tracebacks that pass through it)
        try:
            await handler(requests, stand_in)
        finally:
            requests.release()
            stand_in.release()

    return converse


def _unary(handler: Callable[[Any, Any], Awaitable[Any]], method: str) -> Callable[[Any, Any], Awaitable[Any]]:
    """``handler``, with INVALID_ARGUMENT (and a warning) for a :class:`Malformed` request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            _log_malformed("%s from %s: %s", method, context.peer(), request.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await handler(request, context)

    return unary


def add_voice_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (a ``VoiceServiceServicer``) as ``parley.v1.VoiceService`` on ``server``."""
    handlers = {
        "Converse": grpc.stream_stream_rpc_method_handler(
            _converse(servicer.Converse),
            request_deserializer=_parse(pb.ConverseRequest),
            response_serializer=pb.ConverseResponse.SerializeToString,
        ),
        "ListVoices": grpc.unary_unary_rpc_method_handler(
            _unary(servicer.ListVoices, "ListVoices"),
            request_deserializer=_parse(pb.ListVoicesRequest),
            response_serializer=pb.ListVoicesResponse.SerializeToString,
        ),
        "CreateClientToken": grpc.unary_unary_rpc_method_handler(
            _unary(servicer.CreateClientToken, "CreateClientToken"),
            request_deserializer=_parse(pb.CreateClientTokenRequest),
            response_serializer=pb.ClientToken.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
