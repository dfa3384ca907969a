"""The session on its own (no sockets): barge-in after the server finished a turn, turn ids,
engine errors raised early."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.core.engine import LLMRequest
from service.core.events import AudioChunk, Event, TurnEnded, TurnEndReason
from service.core.opening import StartRequest
from service.core.session import Session, SessionDefaults
from service.errors import InvalidRequest, LLMError
from service.stores.memory import MemoryStore
from tests.conftest import wait_for
from tests.fakes import FakeLLM, FakeTTS


def queued(session: Session) -> list[Event]:
    return list(session._events._items)  # a look inside, to stand in for a client that is slow to read


async def drain(session: Session) -> list[Event]:
    events = []
    while len(session._events):
        event = await session.next_event()
        assert event is not None
        session.mark_sent(event)
        events.append(event)
    return events


async def test_interrupt_drops_audio_of_a_turn_that_finished_only_on_the_server() -> None:
    session = Session(FakeLLM(), FakeTTS(), SessionDefaults(buffered_events=10_000), MemoryStore(60))
    await session.start(StartRequest())
    await session.user_text("Hi?")
    await wait_for(lambda: any(isinstance(e, TurnEnded) for e in queued(session)))
    # The client has read the first few messages only, then barges in.
    sent: list[Event] = []
    while sum(isinstance(e, AudioChunk) for e in sent) < 3:
        event = await session.next_event()
        assert event is not None
        session.mark_sent(event)
        sent.append(event)
    audio_sent_ms = sum(e.duration_ms for e in sent if isinstance(e, AudioChunk))
    assert audio_sent_ms > 0
    await session.interrupt(None)
    rest = await drain(session)
    assert not any(isinstance(e, AudioChunk) for e in rest)
    (ended,) = [e for e in rest if isinstance(e, TurnEnded)]
    assert ended.reason is TurnEndReason.INTERRUPTED
    assert ended.spoken_text != "" and len(ended.spoken_text) < len(session._llm.reply)  # type: ignore[attr-defined]
    last = session._conversation.entries[-1]
    assert last.content == ended.spoken_text and last.interrupted


async def test_interrupt_with_played_ms_after_the_end_was_sent_trims_history() -> None:
    llm = FakeLLM()
    session = Session(llm, FakeTTS(), SessionDefaults(buffered_events=10_000), MemoryStore(60))
    await session.start(StartRequest())
    await session.user_text("Hi?")
    await wait_for(lambda: any(isinstance(e, TurnEnded) for e in queued(session)))
    events = await drain(session)
    assert [e for e in events if isinstance(e, TurnEnded)][0].reason is TurnEndReason.COMPLETED
    await session.interrupt(1000)  # the client played one second of it
    assert await drain(session) == []  # nothing more is sent for a turn that was reported ended
    # 1 s of the first segment's 1.5 s: 3 of its 5 words.
    assert session._conversation.entries[-1].content == "Sure, here is"
    assert session._conversation.entries[-1].interrupted


async def test_turn_ids_must_be_unique() -> None:
    session = Session(FakeLLM(), FakeTTS(), SessionDefaults(buffered_events=10_000), MemoryStore(60))
    await session.start(StartRequest())
    await session.user_text("One", turn_id="turn-2")
    await session.user_text("Two")  # the server's own numbering skips the id the client took
    with pytest.raises(InvalidRequest, match="'turn-2' was already used"):
        await session.user_text("Three", turn_id="turn-2")
    with pytest.raises(InvalidRequest, match="at most 128"):
        await session.speak_text("x", False, turn_id="t" * 129)
    await session.aclose()


async def test_llm_that_fails_when_opened_fails_the_turn_only() -> None:
    class BrokenLLM(FakeLLM):
        def stream(self, request: LLMRequest) -> AsyncIterator[str]:
            raise LLMError("cannot open the model stream")

    session = Session(BrokenLLM(), FakeTTS(), SessionDefaults(buffered_events=10_000), MemoryStore(60))
    await session.start(StartRequest())
    await session.user_text("Hi?")
    await wait_for(lambda: any(isinstance(e, TurnEnded) for e in queued(session)))
    (ended,) = [e for e in await drain(session) if isinstance(e, TurnEnded)]
    assert ended.reason is TurnEndReason.FAILED and "cannot open the model stream" in ended.error
    await session.aclose()


async def test_interrupt_then_a_new_message_keeps_the_played_cut() -> None:
    # What the page does: interrupt with the milliseconds played, then send the next message at once.
    llm = FakeLLM(reply="Right, this one is a long answer. " + "It keeps going. " * 20, token_s=0.01)
    session = Session(llm, FakeTTS(chunk_s=0.02), SessionDefaults(buffered_events=10_000), MemoryStore(60))
    await session.start(StartRequest())
    await session.user_text("Talk.")
    sent: list[Event] = []
    while sum(isinstance(e, AudioChunk) for e in sent) < 6:
        event = await session.next_event()
        assert event is not None
        session.mark_sent(event)
        sent.append(event)
    await session.interrupt(700)
    await session.user_text("Stop there.")
    rest = await drain(session)
    ended = [e for e in rest if isinstance(e, TurnEnded)][0]
    assert ended.reason is TurnEndReason.INTERRUPTED and ended.spoken_text == "Right, this"
    assert session._conversation.entries[1].content == "Right, this"
    # Nothing of the interrupted turn leaves after the interrupt.
    assert not any(getattr(e, "turn_id", "") == ended.turn_id and not isinstance(e, TurnEnded) for e in rest)
    await session.aclose()
