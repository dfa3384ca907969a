"""Sessions that outlive a stream (memory store): resume, NOT_FOUND, expiry, takeover, exact history."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from service.core.engine import INTERRUPTED_NOTE, chat_content
from service.core.history import HistoryLimits
from service.core.outbox import OutboxLimits
from service.core.settings import SessionDefaults
from service.stores.memory import MemoryStore
from tests.conftest import (
    Harness,
    converse_all,
    interrupt,
    speak,
    start,
    start_harness,
    stop_harness,
    user,
    wait_for,
)
from tests.fakes import FakeLLM, FakeTTS, SlowStore


async def one_turn(call: grpc.aio.StreamStreamCall, text: str) -> pb.TurnEnded:
    await call.write(user(text))
    while (response := await call.read()).WhichOneof("kind") != "turn_ended":
        assert response is not grpc.aio.EOF
    return response.turn_ended


async def open_stream(harness: Harness, **start_fields: object) -> tuple[grpc.aio.StreamStreamCall, str]:
    call = harness.stub.Converse()
    await call.write(start(**start_fields))
    response = await call.read()
    return call, response.session_started.session_id


async def test_resume_continues_the_conversation(harness: Harness) -> None:
    first, session_id = await open_stream(harness, system_prompt="Be brief.", voice="fake-voice-2")
    assert len(session_id) >= 22  # 128+ random bits, URL-safe
    await one_turn(first, "My name is Ada.")
    await first.done_writing()
    await first.code()

    second, resumed_id = await open_stream(harness, session_id=session_id)
    assert resumed_id == session_id
    await one_turn(second, "What is my name?")
    messages = harness.llm.requests[-1].messages
    assert [m.content for m in messages] == ["Be brief.", "My name is Ada.", harness.llm.reply, "What is my name?"]
    second.cancel()


async def test_resume_keeps_the_voice_unless_asked_otherwise(harness: Harness) -> None:
    first, session_id = await open_stream(harness, voice="fake-voice-2")
    first.cancel()
    again, _ = await open_stream(harness, session_id=session_id)
    call = harness.stub.Converse()
    await call.write(start(session_id=session_id))
    started = (await call.read()).session_started
    assert started.voice == "fake-voice-2"
    call.cancel()
    again.cancel()


async def test_unknown_session_is_not_found(harness: Harness) -> None:
    call = harness.stub.Converse()
    await call.write(start(session_id="no-such-session"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no session 'no-such-session'" in caught.value.details()


async def test_sessions_expire_when_idle() -> None:
    h = await start_harness(store=MemoryStore(ttl_s=0.3))
    try:
        call, session_id = await open_stream(h)
        call.cancel()
        await wait_for(lambda: h.running.servicer.active_streams == 0)
        await asyncio.sleep(0.4)
        again = h.stub.Converse()
        await again.write(start(session_id=session_id))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await again.read()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stop_harness(h)


async def test_second_stream_takes_over_and_the_first_ends_clearly() -> None:
    h = await start_harness(FakeLLM(reply="A slow reply. " * 20, token_s=0.02), FakeTTS())
    try:
        first, session_id = await open_stream(h)
        await first.write(user("Talk."))
        await first.read()
        second, _ = await open_stream(h, session_id=session_id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await first.read() is not grpc.aio.EOF:
                pass
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert f"session {session_id} was resumed by another stream" in caught.value.details()
        await wait_for(lambda: h.llm.open_streams == 0)  # the first stream's turn was stopped
        h.llm.reply = "Short."
        ended = await one_turn(second, "Now here.")
        assert ended.reason == pb.TURN_END_REASON_COMPLETED
        second.cancel()
    finally:
        await stop_harness(h)


async def test_interrupted_reply_is_stored_cut_and_marked() -> None:
    h = await start_harness(
        FakeLLM(reply="Right, this answer is long. " + "It keeps going. " * 30, token_s=0.01),
        FakeTTS(chunk_s=0.05, chunks=5),
    )
    try:
        call, session_id = await open_stream(h)
        await call.write(user("Tell me everything."))
        audio = 0
        while audio < 12:
            audio += (await call.read()).WhichOneof("kind") == "audio"
        await call.write(interrupt(played_ms=800))
        while (response := await call.read()).WhichOneof("kind") != "turn_ended":
            pass
        assert response.turn_ended.spoken_text == "Right, this"
        call.cancel()
        # A new stream on the same session: the LLM sees the cut reply, marked as cut.
        h.llm.reply = "Sorry."
        again, _ = await open_stream(h, session_id=session_id)
        await one_turn(again, "Go on.")
        assert chat_content(h.llm.requests[-1].messages[-2]) == f"Right, this {INTERRUPTED_NOTE}"
        again.cancel()
    finally:
        await stop_harness(h)


async def test_history_is_capped_but_the_system_prompt_stays() -> None:
    defaults = SessionDefaults(outbox=OutboxLimits(max_message_ms=100), history=HistoryLimits(max_turns=2))
    h = await start_harness(FakeLLM(reply="Ok."), defaults=defaults)
    try:
        call, _ = await open_stream(h, system_prompt="Stay.")
        for n in range(4):
            await one_turn(call, f"q{n}")
        contents = [m.content for m in h.llm.requests[-1].messages]
        assert contents == ["Stay.", "q1", "Ok.", "q2", "Ok.", "q3"]
        call.cancel()
    finally:
        await stop_harness(h)


async def test_server_turn_ids_go_on_after_a_resume(harness: Harness) -> None:
    first, session_id = await open_stream(harness)
    assert (await one_turn(first, "One.")).turn_id == "turn-1"
    assert (await one_turn(first, "Two.")).turn_id == "turn-2"
    first.cancel()
    second, _ = await open_stream(harness, session_id=session_id)
    assert (await one_turn(second, "Three.")).turn_id == "turn-3"
    second.cancel()


async def read_audio_ms(call: grpc.aio.StreamStreamCall, ms: float) -> None:
    got = 0.0
    while got < ms:
        response = await call.read()
        if response.WhichOneof("kind") == "audio":
            got += len(response.audio.data) / 32  # PCM16 at 16 kHz


def story_harness(store: MemoryStore, **kwargs: object) -> Awaitable[Harness]:
    return start_harness(
        FakeLLM(reply="Once upon a time. " + "It keeps going. " * 30, token_s=0.01),
        FakeTTS(chunk_s=0.2, chunks=5),  # the first sentence's audio takes a second to leave
        store=store,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_a_dropped_stream_keeps_the_turn_it_cut_short() -> None:
    # A phone that loses its connection mid-reply: the question stays in the history, and the reply
    # as far as its audio was sent, marked as cut.
    h = await story_harness(MemoryStore(ttl_s=3600))
    try:
        call, session_id = await open_stream(h)
        await call.write(user("Tell me a story."))
        await read_audio_ms(call, 600)  # about half of the first sentence
        call.cancel()
        await wait_for(lambda: h.running.servicer.active_streams == 0 and h.llm.open_streams == 0)
        h.llm.reply = "Where was I?"
        again, _ = await open_stream(h, session_id=session_id)
        await one_turn(again, "Go on.")
        messages = [chat_content(m) for m in h.llm.requests[-1].messages]
        assert messages[1] == "Tell me a story."
        assert messages[2].startswith("Once") and messages[2].endswith(INTERRUPTED_NOTE)
        assert "keeps going" not in messages[2]  # only what was sent counts as heard
        assert messages[3] == "Go on."
        again.cancel()
    finally:
        await stop_harness(h)


async def test_a_new_voice_on_resume_is_kept_even_without_a_turn(harness: Harness) -> None:
    first, session_id = await open_stream(harness, voice="fake-voice-2")
    first.cancel()
    second, _ = await open_stream(harness, session_id=session_id, voice="fake-voice", system_prompt="Be terse.")
    second.cancel()  # no turn on this stream
    await wait_for(lambda: harness.running.servicer.active_streams == 0)
    third, _ = await open_stream(harness, session_id=session_id)
    await one_turn(third, "Hello.")
    assert harness.llm.requests[-1].messages[0].content == "Be terse."
    third.cancel()
    call = harness.stub.Converse()
    await call.write(start(session_id=session_id))
    assert (await call.read()).session_started.voice == "fake-voice"
    call.cancel()


# -- history is written whatever way the stream ends (the store's writes take a while here) ------------


@pytest.mark.parametrize("barge_in", ["interrupt", "user_text"])
async def test_a_hang_up_while_a_barge_in_is_being_saved_keeps_it(barge_in: str) -> None:
    store = SlowStore(save_s=0.3)
    h = await story_harness(store)
    try:
        call, session_id = await open_stream(h)
        await call.write(user("Tell me a story."))
        await read_audio_ms(call, 600)
        await call.write(interrupt() if barge_in == "interrupt" else user("Something else."))
        await wait_for(lambda: store.saves_started == 1)  # the cut turn is being written...
        call.cancel()  # ... when the user hangs up
        await wait_for(lambda: h.running.servicer.active_streams == 0)
        (question, reply) = store.entries(session_id)[:2]
        assert question == ("user", "Tell me a story.", False)
        assert reply[0] == "assistant" and reply[1].startswith("Once") and reply[2]
        assert not store.owned(session_id)
    finally:
        await stop_harness(h)


async def test_a_hang_up_after_the_reply_while_it_is_being_saved_keeps_it() -> None:
    store = SlowStore(save_s=0.3)
    h = await start_harness(FakeLLM(reply="All done."), FakeTTS(), store=store)
    try:
        call, session_id = await open_stream(h)
        await call.write(user("Hello."))
        await call.done_writing()
        while (await call.read()).WhichOneof("kind") != "turn_ended":
            pass
        call.cancel()  # the whole reply arrived; the client does not wait for the stream's end
        await wait_for(lambda: h.running.servicer.active_streams == 0)
        assert store.entries(session_id) == [("user", "Hello.", False), ("assistant", "All done.", False)]
    finally:
        await stop_harness(h)


async def test_a_hang_up_while_the_stream_closes_still_lets_the_session_go() -> None:
    store = SlowStore(save_s=1.0)
    h = await start_harness(  # (an idle limit the open speak turn's message cannot miss on a busy machine)
        store=store, defaults=SessionDefaults(idle_timeout_s=1.0, outbox=OutboxLimits(max_message_ms=100))
    )
    try:
        call, session_id = await open_stream(h)
        await call.write(speak("Hello there."))  # an open speak turn, then silence: the idle limit ends it
        await wait_for(lambda: store.saves_started == 1)
        call.cancel()  # while the stream's end is being written
        await wait_for(lambda: h.running.servicer.active_streams == 0 and store.releases == 1)
        assert not store.owned(session_id)  # free to expire, and to resume
    finally:
        await stop_harness(h)


async def test_shutdown_waits_for_cut_streams_to_save_their_history() -> None:
    store = SlowStore(save_s=0.3)
    h = await story_harness(store)
    try:
        call, session_id = await open_stream(h)
        await call.write(user("Tell me a story."))
        await read_audio_ms(call, 600)
        await h.running.stop(grace_s=0.2)  # the reply is longer than the grace period
        assert h.running.servicer.active_streams == 0 and store.releases == 1
        assert store.entries(session_id)[0] == ("user", "Tell me a story.", False)
        assert store.entries(session_id)[1][2]  # the cut reply, marked interrupted
    finally:
        await stop_harness(h)


async def test_a_turn_is_stored_before_its_end_is_sent() -> None:
    # A client that saw turn_ended and reconnects to another replica (this one having died) finds it.
    store = SlowStore(save_s=0.3)
    h = await start_harness(FakeLLM(reply="All done."), FakeTTS(), store=store)
    try:
        call, session_id = await open_stream(h)
        await one_turn(call, "Hello.")
        assert store.entries(session_id) == [("user", "Hello.", False), ("assistant", "All done.", False)]
        call.cancel()
    finally:
        await stop_harness(h)


async def test_a_barge_in_does_not_wait_for_the_store() -> None:
    store = SlowStore(save_s=2.0)
    h = await story_harness(store)
    try:
        call, _ = await open_stream(h)
        await call.write(user("Tell me a story."))
        await read_audio_ms(call, 200)
        await call.write(user("Stop, something else."))
        while (response := await call.read()).WhichOneof("kind") != "turn_ended":
            pass
        assert response.turn_ended.reason == pb.TURN_END_REASON_INTERRUPTED
        assert store.saves_done == 0  # the cut turn is still being written: its end did not wait
        call.cancel()
    finally:
        await stop_harness(h)


async def test_a_turn_the_store_could_not_save_says_so_and_is_saved_with_the_next() -> None:
    store = SlowStore(save_s=0.0)
    h = await start_harness(FakeLLM(reply="All done."), FakeTTS(), store=store)
    try:
        call, session_id = await open_stream(h)
        store.failing = True
        first = await one_turn(call, "One.")
        assert first.reason == pb.TURN_END_REASON_COMPLETED and first.history_unsaved
        store.failing = False
        second = await one_turn(call, "Two.")
        assert not second.history_unsaved
        assert [e[1] for e in store.entries(session_id)] == ["One.", "All done.", "Two.", "All done."]
        call.cancel()
    finally:
        await stop_harness(h)


async def test_a_full_memory_store_refuses_new_sessions_until_one_is_let_go() -> None:
    h = await start_harness(store=MemoryStore(ttl_s=60, max_sessions=1))
    try:
        holder, _ = await open_stream(h)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await converse_all(h.stub, [start()])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum number of sessions" in (refused.value.details() or "")
        await holder.done_writing()
        while await holder.read() is not grpc.aio.EOF:
            pass
        # Let go: the idle session makes room (the least recently used idle one is forgotten).
        responses = await converse_all(h.stub, [start()])
        assert responses[0].session_started.session_id
    finally:
        await stop_harness(h)


@pytest.mark.parametrize("trial", range(8))
async def test_a_stream_cancelled_and_resumed_at_once_keeps_the_turn_it_cut(trial: int) -> None:
    # A phone that drops and reconnects at once: the new stream waits (briefly) for the old one to
    # write the reply it was cutting short, so the conversation goes on with it.
    llm = FakeLLM(reply="Right, here is a long answer. " + "It keeps going. " * 30, token_s=0.002)
    h = await start_harness(llm, FakeTTS(chunk_s=0.01))
    try:
        first, session_id = await open_stream(h)
        await first.write(user("The first question."))
        while (await first.read()).WhichOneof("kind") != "audio":
            pass
        first.cancel()
        second, _ = await open_stream(h, session_id=session_id)
        await one_turn(second, "The second question.")
        messages = [(m.role, chat_content(m)) for m in h.llm.requests[-1].messages]
        assert messages[1] == ("user", "The first question.")
        assert messages[2][0] == "assistant" and "[interrupted" in messages[2][1]
        assert messages[3] == ("user", "The second question.")
        second.cancel()
    finally:
        await stop_harness(h)


async def test_a_stream_that_takes_a_session_over_finds_the_reply_the_first_was_giving() -> None:
    llm = FakeLLM(reply="Right, here is a long answer. " + "It keeps going. " * 30, token_s=0.01)
    h = await start_harness(llm, FakeTTS(chunk_s=0.01))
    try:
        first, session_id = await open_stream(h)
        await first.write(user("The first question."))
        while (await first.read()).WhichOneof("kind") != "audio":
            pass
        second, _ = await open_stream(h, session_id=session_id)
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            while await first.read() is not grpc.aio.EOF:
                pass
        assert taken.value.code() == grpc.StatusCode.ABORTED
        await one_turn(second, "The second question.")
        messages = [(m.role, m.content) for m in h.llm.requests[-1].messages]
        assert messages[1] == ("user", "The first question.") and messages[2][0] == "assistant"
        second.cancel()
    finally:
        await stop_harness(h)
