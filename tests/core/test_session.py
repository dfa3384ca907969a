"""The session on its own (no sockets): commands in, outbox messages out, history in the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from service.core.command import Command, CommandQueue, HalfClose, Interrupt, Shutdown, SpeakText, Start, UserText
from service.core.engine import LLMRequest
from service.core.events import AudioChunk, AudioPiece, Message, TurnEnd, TurnEnded, TurnEndReason
from service.core.history import Entry
from service.core.outbox import Outbox, OutboxLimits
from service.core.session import REMEMBERED_TURN_IDS, Ending, Session
from service.core.settings import SessionDefaults, StartRequest
from service.errors import InvalidRequest, LLMError
from service.stores.memory import MemoryStore
from tests.conftest import wait_for
from tests.fakes import FakeLLM, FakeTTS


class Stream:
    """A session running its command loop, as the servicer runs it, with a client that reads when told."""

    def __init__(self, llm: FakeLLM, tts: FakeTTS | None = None) -> None:
        self.llm = llm
        self.store = MemoryStore(60)
        self.outbox = Outbox(OutboxLimits(max_buffered_ms=10_000_000, max_buffered_items=10_000))
        self.commands = CommandQueue()
        self.session = Session(llm, tts or FakeTTS(), SessionDefaults(), self.store, self.outbox)
        self.loop = asyncio.create_task(self.session.run(self.commands))

    async def send(self, *commands: Command) -> None:
        for command in commands:
            await self.commands.put(command)  # type: ignore[arg-type]

    async def read(self) -> Message | None:
        return await self.outbox.next()

    async def read_audio(self, count: int) -> list[Message]:
        """Read until ``count`` audio messages have come."""
        read: list[Message] = []
        while sum(isinstance(m, AudioChunk) for m in read) < count:
            message = await self.read()
            assert message is not None
            read.append(message)
        return read

    async def read_to_the_end(self) -> list[Message]:
        """Half-close, then read everything until the stream is over."""
        await self.send(HalfClose())
        read = []
        while (message := await self.read()) is not None:
            read.append(message)
        assert await self.loop is Ending.HALF_CLOSED
        return read

    async def history(self) -> list[Entry]:
        resumed = await self.store.resume(self.session.session_id)
        assert resumed is not None
        return resumed[0].entries

    async def wait_for_end_queued(self) -> None:
        await wait_for(lambda: any(isinstance(item, TurnEnd) for item in self.outbox.waiting()))


async def started(llm: FakeLLM, tts: FakeTTS | None = None) -> Stream:
    stream = Stream(llm, tts)
    await stream.send(Start(StartRequest()))
    assert (await stream.read()).__class__.__name__ == "SessionStarted"
    return stream


async def test_interrupt_drops_audio_of_a_turn_that_finished_only_on_the_server() -> None:
    llm = FakeLLM()
    stream = await started(llm)
    await stream.send(UserText("Hi?"))
    await stream.wait_for_end_queued()
    # The client has read the first few messages only, then barges in.
    sent = await stream.read_audio(3)
    assert sum(m.duration_ms for m in sent if isinstance(m, AudioChunk)) > 0
    await stream.send(Interrupt(None))
    await wait_for(lambda: not any(isinstance(item, AudioPiece) for item in stream.outbox.waiting()))
    rest = await stream.read_to_the_end()
    assert not any(isinstance(m, AudioChunk) for m in rest)
    (ended,) = [m for m in rest if isinstance(m, TurnEnded)]
    assert ended.reason is TurnEndReason.INTERRUPTED
    assert ended.spoken_text != "" and len(ended.spoken_text) < len(llm.reply)
    last = (await stream.history())[-1]
    assert last.content == ended.spoken_text and last.interrupted


async def test_interrupt_with_played_ms_after_the_end_was_sent_trims_history() -> None:
    stream = await started(FakeLLM())
    await stream.send(UserText("Hi?"))
    while not isinstance(message := await stream.read(), TurnEnded):
        pass
    assert message.reason is TurnEndReason.COMPLETED
    await stream.send(Interrupt(1000))  # the client played one second of it
    assert await stream.read_to_the_end() == []  # nothing more is sent for a turn that was reported ended
    # 1 s of the first segment's 1.5 s: 3 of its 5 words.
    last = (await stream.history())[-1]
    assert last.content == "Sure, here is" and last.interrupted


@pytest.mark.parametrize(
    ("commands", "error"),
    [
        (
            [UserText("One", turn_id="turn-2"), UserText("Two"), UserText("Three", turn_id="turn-2")],
            "'turn-2' was already used",
        ),
        ([SpeakText("x", turn_id="t" * 129)], "at most 128"),
    ],
)
async def test_turn_ids_must_be_unique_and_short(commands: list[Command], error: str) -> None:
    stream = await started(FakeLLM())
    await stream.send(*commands)
    with pytest.raises(InvalidRequest, match=error):
        await stream.loop
    assert stream.outbox.closed


async def test_the_servers_own_turn_ids_skip_the_ones_a_client_took() -> None:
    stream = await started(FakeLLM())
    await stream.send(UserText("One", turn_id="turn-1"), UserText("Two"), UserText("Three"))
    ends = [m.turn_id for m in await stream.read_to_the_end() if isinstance(m, TurnEnded)]
    assert ends == ["turn-1", "turn-2", "turn-3"]


async def test_llm_that_fails_when_opened_fails_the_turn_only() -> None:
    class BrokenLLM(FakeLLM):
        def stream(self, request: LLMRequest) -> AsyncGenerator[str, None]:
            raise LLMError("cannot open the model stream")

    stream = await started(BrokenLLM())
    await stream.send(UserText("Hi?"))
    (ended,) = [m for m in await stream.read_to_the_end() if isinstance(m, TurnEnded)]
    assert ended.reason is TurnEndReason.FAILED and "cannot open the model stream" in ended.error


async def test_interrupt_then_a_new_message_keeps_the_played_cut() -> None:
    # What the page does: interrupt with the milliseconds played, then send the next message at once.
    llm = FakeLLM(reply="Right, this one is a long answer. " + "It keeps going. " * 20, token_s=0.01)
    stream = await started(llm, FakeTTS(chunk_s=0.02))
    await stream.send(UserText("Talk."))
    await stream.read_audio(6)
    await stream.send(Interrupt(700), UserText("Stop there."))
    await stream.wait_for_end_queued()  # (what the client reads before the interrupt is handled may be of it)
    rest = await stream.read_to_the_end()
    ended = [m for m in rest if isinstance(m, TurnEnded)][0]
    assert ended.reason is TurnEndReason.INTERRUPTED and ended.spoken_text == "Right, this"
    assert (await stream.history())[1].content == "Right, this"
    # Nothing of the interrupted turn leaves after the interrupt.
    assert not any(getattr(m, "turn_id", "") == ended.turn_id and not isinstance(m, TurnEnded) for m in rest)


async def test_the_turn_ids_remembered_are_bounded() -> None:
    # A client that sends turn after turn cannot grow the stream's memory for ever: ids are remembered
    # for the last REMEMBERED_TURN_IDS turns.
    stream = await started(FakeLLM(token_s=0.5))
    ids = [f"a{n}" for n in range(REMEMBERED_TURN_IDS + 1)]
    await stream.send(*(UserText("Hi", turn_id=turn_id) for turn_id in ids))
    await stream.send(UserText("Again", turn_id=ids[1]))  # still remembered: refused
    with pytest.raises(InvalidRequest, match="'a1' was already used"):
        await stream.loop

    stream = await started(FakeLLM(token_s=0.5))
    await stream.send(*(UserText("Hi", turn_id=turn_id) for turn_id in ids))
    await stream.send(UserText("Again", turn_id=ids[0]))  # forgotten: accepted
    ends = [m.turn_id for m in await stream.read_to_the_end() if isinstance(m, TurnEnded)]
    assert ends[-1] == "a0" and len(ends) == len(ids) + 1


async def test_an_interrupt_after_the_whole_reply_was_heard_changes_nothing() -> None:
    stream = await started(FakeLLM())
    await stream.send(UserText("Hi?"))
    while not isinstance(message := await stream.read(), TurnEnded):
        pass
    await stream.send(Interrupt(10**9))  # the client played all of it, and more
    assert await stream.read_to_the_end() == []
    last = (await stream.history())[-1]
    assert last.content == message.spoken_text and not last.interrupted


async def test_a_stream_cut_short_keeps_the_last_turn_only_as_far_as_its_audio_was_sent() -> None:
    # The turn completed on the server, but the connection dropped before its tail audio left.
    llm = FakeLLM(reply="One two three four five. Six seven eight nine ten. Eleven twelve thirteen.")
    stream = await started(llm)
    await stream.send(UserText("Count."))
    await stream.wait_for_end_queued()
    await stream.read_audio(2)
    stream.loop.cancel()  # the transport's end: a hang-up
    with pytest.raises(asyncio.CancelledError):
        await stream.loop
    last = (await stream.history())[-1]
    assert last.interrupted and last.content and len(last.content) < len(llm.reply)


async def read_all(stream: Stream) -> list[Message]:
    read = []
    while (message := await stream.read()) is not None:
        read.append(message)
    return read


async def test_a_half_close_that_comes_after_the_shutdown_still_gets_the_normal_end() -> None:
    # A client half-closes as the server begins shutting down: which reaches the session first is a
    # race of the transport's. The client sent all it would and lost nothing: its end is the normal one
    # (a clean-clone CI run failed once on the order).
    stream = await started(FakeLLM(reply="One sentence to finish. And another one. ", token_s=0.01))
    await stream.send(UserText("Go on."), Shutdown(), HalfClose())
    (ended,) = [m for m in await read_all(stream) if isinstance(m, TurnEnded)]
    assert ended.reason is TurnEndReason.COMPLETED
    assert await stream.loop is Ending.HALF_CLOSED


async def test_a_half_close_after_the_shutdown_left_a_message_unanswered_still_says_where_to_resume() -> None:
    stream = await started(FakeLLM(reply="One sentence to finish. And another one. ", token_s=0.01))
    await stream.send(UserText("Go on."), Shutdown(), UserText("And then?"), HalfClose())
    (ended,) = [m for m in await read_all(stream) if isinstance(m, TurnEnded)]
    assert ended.reason is TurnEndReason.COMPLETED
    assert await stream.loop is Ending.SHUTDOWN and stream.session.unanswered == 1
