"""A stream's objects are freed by their reference counts as it ends, not left to the garbage collector.

A reference cycle through a session (a task it holds, cancelled, keeping a traceback whose frames hold
the session) makes the stream's whole object graph garbage that only a collection of an older
generation frees; under load, with hundreds of streams ending, those collections held a worker's event
loop for 50 to 100 ms. Each case runs with the collector off, then collects with ``DEBUG_SAVEALL``
and looks for the service's own objects among what only the collector could free.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

import service
from parley.v1 import voice_pb2 as pb
from tests.conftest import Harness, converse_all, interrupt, speak, start, start_harness, stop_harness, user, wait_for
from tests.fakes import FakeLLM, FakeSTT, FakeTTS, loud, quiet

SERVICE_DIR = str(Path(service.__file__).parent)


def _the_services(found: object) -> str | None:
    """A description of ``found`` if it is one of the service's objects (an instance of its classes, or
    a frame or coroutine of its code), else None."""
    kind = type(found)
    if kind.__module__.startswith("service."):
        return f"{kind.__module__}.{kind.__qualname__}"
    code = getattr(found, "f_code", None) or getattr(found, "cr_code", None) or getattr(found, "ag_code", None)
    if code is not None and code.co_filename.startswith(SERVICE_DIR):
        return f"{kind.__name__} {code.co_qualname}"
    return None


def _describe(found: object) -> str:
    """A short name for an object on a cycle."""
    if (mine := _the_services(found)) is not None:
        return mine
    if isinstance(found, asyncio.Task):
        return f"Task {found.get_name()!r}"
    if isinstance(found, BaseException):
        return type(found).__name__
    code = getattr(found, "f_code", None) or getattr(found, "cr_code", None) or getattr(found, "ag_code", None)
    if code is not None:
        return f"{type(found).__name__} {code.co_qualname} ({Path(code.co_filename).name})"
    return type(found).__name__


def _a_cycle(garbage: list[object], start: object) -> str | None:
    """The shortest reference cycle through ``start`` among ``garbage``, in words, or None."""
    among = {id(o) for o in garbage}
    came_from: dict[int, object | None] = {id(start): None}
    queue = collections.deque([start])
    while queue:
        here = queue.popleft()
        for there in gc.get_referents(here):
            if there is start:
                path = [here]
                while (before := came_from[id(path[-1])]) is not None:
                    path.append(before)
                return " -> ".join(_describe(o) for o in [*reversed(path), start])
            if id(there) in among and id(there) not in came_from:
                came_from[id(there)] = here
                queue.append(there)
    return None


def _reaches(garbage: list[object], start: object, targets: set[int]) -> bool:
    """Whether one of ``targets`` (ids) can be reached from ``start`` through ``garbage``."""
    among = {id(o) for o in garbage}
    seen = {id(start)}
    queue = collections.deque([start])
    while queue:
        for there in gc.get_referents(queue.popleft()):
            if id(there) in targets:
                return True
            if id(there) in among and id(there) not in seen:
                seen.add(id(there))
                queue.append(there)
    return False


def _a_cycle_holding(garbage: list[object], mine: list[object]) -> str:
    """A reference cycle that holds some of ``mine`` (on it, or reachable from it), in words."""
    targets = {id(o) for o in mine}
    for candidate in [*mine, *garbage]:
        cycle = _a_cycle(garbage, candidate)
        if cycle is not None and (id(candidate) in targets or _reaches(garbage, candidate, targets)):
            return cycle
    return "none found"


@contextlib.contextmanager
def left_to_the_collector() -> Iterator[list[str]]:
    """With the collector off inside, a list filled on the way out with the service's objects that only
    the collector could free, and then a cycle through the first of them."""
    gc.collect()
    gc.disable()
    found: list[str] = []
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            mine = [o for o in gc.garbage if _the_services(o) is not None]
            found.extend(sorted({_describe(o) for o in mine}))
            if mine:
                found.append(f"a cycle: {_a_cycle_holding(gc.garbage, mine)}")
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()


async def _settle() -> None:
    """Let the server's last callbacks of the streams run (the call's end, its tasks' last steps)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def read_until(call: grpc.aio.StreamStreamCall, kind: str) -> pb.ConverseResponse:
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.WhichOneof("kind") == kind:
            return response
    raise AssertionError(f"the stream ended before {kind}")


async def ends_of(call: grpc.aio.StreamStreamCall) -> list[int]:
    """Half-close, then the end reasons of the turns that end before the stream does."""
    await call.done_writing()
    ends = []
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.WhichOneof("kind") == "turn_ended":
            ends.append(response.turn_ended.reason)
    return ends


async def opened(harness: Harness, first: pb.ConverseRequest | None = None) -> grpc.aio.StreamStreamCall:
    call = harness.stub.Converse()
    await call.write(first or start())
    await read_until(call, "session_started")
    return call


async def interrupted_mid_reply(harness: Harness, question: str) -> list[int]:
    """A stream that asks ``question``, interrupts 0.3 s into its first audio (the engines have had time
    to fail; the first segment is still being spoken), and half-closes: its turns' end reasons."""
    call = await opened(harness)
    await call.write(user(question))
    await read_until(call, "audio")
    await asyncio.sleep(0.3)
    await call.write(interrupt())
    return await ends_of(call)


@pytest.fixture
async def slow_harness() -> AsyncIterator[Harness]:
    """Replies that take a while: the model's words 50 ms apart, each segment's audio in six chunks
    400 ms apart (syntheses are still running when a turn is stopped)."""
    h = await start_harness(FakeLLM(token_s=0.05), FakeTTS(chunk_s=0.4, chunks=6))
    yield h
    await stop_harness(h)


async def test_streams_with_whole_turns_leave_nothing_to_the_collector(harness: Harness) -> None:
    await converse_all(harness.stub, [start(), user("Warm up?")])  # (first use: imports, caches)
    with left_to_the_collector() as found:
        for _ in range(3):
            responses = await converse_all(harness.stub, [start(), user("What is up?"), user("And then?")])
            assert responses[-1].WhichOneof("kind") == "turn_ended"
        await converse_all(harness.stub, [start(), speak("Read this.", flush=True)])
        await _settle()
    assert not found, "left to the collector:\n" + "\n".join(found)


async def test_interrupted_turns_leave_nothing_to_the_collector(slow_harness: Harness) -> None:
    harness = slow_harness
    await converse_all(harness.stub, [start(), speak("Warm up.", flush=True)])
    with left_to_the_collector() as found:
        call = await opened(harness)
        await call.write(user("Talk for a while?"))
        await read_until(call, "audio")  # (the look-ahead syntheses are running)
        await call.write(interrupt())  # (the turn's task is cancelled)
        await read_until(call, "turn_ended")
        await call.write(user("Again?"))
        await read_until(call, "audio")
        await call.write(speak("Something else.", flush=True))  # (a new turn interrupts the one in progress)
        assert await ends_of(call) == [pb.TURN_END_REASON_INTERRUPTED, pb.TURN_END_REASON_COMPLETED]
        await _settle()
    assert not found, "left to the collector:\n" + "\n".join(found)


async def test_turns_whose_engines_fail_leave_nothing_to_the_collector(slow_harness: Harness) -> None:
    harness = slow_harness
    await converse_all(harness.stub, [start(), speak("Warm up.", flush=True)])
    with left_to_the_collector() as found:
        # The model fails after what was cut into segments, which are still being spoken when the turn
        # is interrupted; then a turn whose last segment's synthesis fails ahead of the sender,
        # interrupted before the sender reaches it; then a failed turn that runs to its end.
        harness.llm.fail_after_tokens = 3
        assert await interrupted_mid_reply(harness, "Fail?") == [pb.TURN_END_REASON_INTERRUPTED]
        harness.llm.fail_after_tokens = None
        harness.tts.fail_on = "second"
        assert await interrupted_mid_reply(harness, "Fail later?") == [pb.TURN_END_REASON_INTERRUPTED]
        harness.tts.fail_on = "Sure"
        failed = await converse_all(harness.stub, [start(), user("Fail at once?")])
        assert failed[-1].turn_ended.reason == pb.TURN_END_REASON_FAILED
        await _settle()
    assert not found, "left to the collector:\n" + "\n".join(found)


async def test_streams_that_end_in_an_error_or_a_hang_up_leave_nothing_to_the_collector() -> None:
    harness = await start_harness(FakeLLM(first_token_s=5))  # (the writer has nothing to write)
    try:
        await converse_all(harness.stub, [start(), speak("Warm up.", flush=True)])
        with left_to_the_collector() as found:
            # A hang-up mid-turn: the handler is cancelled.
            call = await opened(harness)
            await call.write(user("Talk?"))
            await asyncio.sleep(0.1)
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
            await wait_for(lambda: not harness.running.servicer.active_streams)
            # A stream that ends with an error mid-turn: its session is taken over by another stream.
            session_id = (await converse_all(harness.stub, [start()]))[0].session_started.session_id
            first = await opened(harness, start(session_id=session_id))
            await first.write(user("Talk?"))
            await asyncio.sleep(0.1)
            second = await opened(harness, start(session_id=session_id))
            with pytest.raises(grpc.aio.AioRpcError) as ended:  # (read: the interrupted turn's end, then the status)
                while await first.read() is not grpc.aio.EOF:
                    pass
            assert ended.value.code() == grpc.StatusCode.ABORTED
            second.cancel()
            await wait_for(lambda: not harness.running.servicer.active_streams)
            await _settle()
    finally:
        await stop_harness(harness)
    assert not found, "left to the collector:\n" + "\n".join(found)


async def test_a_voice_stream_with_a_barge_in_and_a_failed_transcription_leaves_nothing_to_the_collector() -> None:
    # (Replies of about 2 s: still running when the user's voice comes over it, however busy the machine.)
    harness = await start_harness(FakeLLM(reply=FakeLLM.reply * 3, token_s=0.05), stt=FakeSTT())
    try:
        voice = start(input_audio=pb.InputAudio(sample_rate_hz=16000, turn_detection=pb.TurnDetection(silence_ms=300)))
        await converse_all(harness.stub, [voice, user("Warm up?")])
        with left_to_the_collector() as found:
            call = await opened(harness, voice)
            for pcm in (quiet(300) + loud(800) + quiet(600), loud(600) + quiet(600)):  # a question; a barge-in
                await say(call, pcm)
                await read_until(call, "audio")
            assert await ends_of(call) == [pb.TURN_END_REASON_INTERRUPTED, pb.TURN_END_REASON_COMPLETED]
            harness.stt.fail = True  # type: ignore[union-attr]
            call = await opened(harness, voice)
            await say(call, quiet(300) + loud(800) + quiet(600))
            assert await ends_of(call) == [pb.TURN_END_REASON_FAILED]
            await _settle()
    finally:
        await stop_harness(harness)
    assert not found, "left to the collector:\n" + "\n".join(found)


async def say(call: grpc.aio.StreamStreamCall, pcm: bytes) -> None:
    for at in range(0, len(pcm), 3200):  # (100 ms at a time, faster than real time)
        await call.write(pb.ConverseRequest(user_audio=pb.UserAudio(data=pcm[at : at + 3200])))
