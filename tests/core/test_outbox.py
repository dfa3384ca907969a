"""The outbox on its own: what leaves, merged how, numbered how, held how long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import pytest

from service.core.audio import AudioFormat, Encoding
from service.core.events import (
    AudioChunk,
    AudioPiece,
    SegmentStarted,
    SessionStarted,
    TextDelta,
    TurnEnd,
    TurnEnded,
    TurnEndReason,
    TurnMoments,
)
from service.core.outbox import MAX_CAPTION_CHARS, Outbox, OutboxLimits


def piece(segment: int, ms: float, turn: str = "t1") -> AudioPiece:
    return AudioPiece(turn, segment, b"\x00\x00" * int(ms * 16), ms)


def end(turn: str = "t1", started: float = 0.0) -> TurnEnd:
    return TurnEnd(turn, TurnEndReason.COMPLETED, "Hi.", TurnMoments(started))


async def drain(outbox: Outbox) -> list[object]:
    outbox.close()
    return [message async for message in _messages(outbox)]


async def _messages(outbox: Outbox):  # type: ignore[no-untyped-def]
    while (message := await outbox.next()) is not None:
        yield message


async def test_audio_waiting_together_leaves_merged_per_segment_and_numbered_once() -> None:
    outbox = Outbox(OutboxLimits(max_message_ms=100))
    outlet = outbox.open_turn("t1")
    for item in [piece(0, 40), piece(0, 40), piece(0, 40), SegmentStarted("t1", 1, "B", "B", 120), piece(1, 30)]:
        await outlet.put(item)  # type: ignore[arg-type]
    outbox.put_control(end(), outlet)
    messages = await drain(outbox)
    audio = [m for m in messages if isinstance(m, AudioChunk)]
    # 40+40 fit in one 100 ms message, the third would not; a segment's audio never merges with the next.
    assert [(a.segment_index, a.sequence, a.duration_ms) for a in audio] == [(0, 0, 80), (0, 1, 40), (1, 2, 30)]
    assert len(audio[0].data) == 2 * len(piece(0, 40).data)
    assert isinstance(messages[-1], TurnEnded) and messages[-1].timings.audio_duration_ms == 150


async def test_captions_waiting_together_leave_as_one_message() -> None:
    outbox = Outbox(OutboxLimits())
    outlet = outbox.open_turn("t1")
    for text in ["Hel", "lo ", "there."]:
        await outlet.put(TextDelta("t1", text))
    await outlet.put(piece(0, 10))
    await outlet.put(TextDelta("t1", " More"))  # (joins the text still waiting, ahead of the audio)
    messages = await drain(outbox)
    assert [type(m).__name__ for m in messages] == ["TextDelta", "AudioChunk"]
    assert messages[0].text == "Hello there. More"  # type: ignore[attr-defined]


async def test_captions_merge_up_to_a_bound() -> None:
    # Found in QA: deltas waiting together merged without a bound, into one message over what a gRPC
    # client takes (4 MiB by default): its stream died.
    outbox = Outbox(OutboxLimits())
    outlet = outbox.open_turn("t1")
    for _ in range(10):
        await outlet.put(TextDelta("t1", "é" * 6000))
    for _ in range(3000):
        await outlet.put(TextDelta("t1", "ab "))
    messages = [m.text for m in await drain(outbox) if isinstance(m, TextDelta)]
    assert "".join(messages) == "é" * 60000 + "ab " * 3000
    assert all(len(text) <= MAX_CAPTION_CHARS for text in messages)
    assert 10 < len(messages) < 30  # (small deltas joined, up to about a kilobyte each)


async def test_a_turns_first_caption_leaves_at_once_and_later_text_gathers() -> None:
    outbox = Outbox(OutboxLimits(caption_gather_ms=300))
    outlet = outbox.open_turn("t1")
    await outlet.put(TextDelta("t1", "Sure, "))
    began = time.monotonic()
    assert (await asyncio.wait_for(outbox.next(), 1)).text == "Sure, "  # type: ignore[union-attr]
    assert time.monotonic() - began < 0.1
    await outlet.put(TextDelta("t1", "the "))
    later = asyncio.create_task(outbox.next())
    for text in ["capital ", "is ", "Paris."]:
        await asyncio.sleep(0.05)
        await outlet.put(TextDelta("t1", text))
    message = await asyncio.wait_for(later, 1)
    assert message.text == "the capital is Paris."  # type: ignore[union-attr]
    assert 0.25 < time.monotonic() - began < 0.6  # gathered until due, not longer
    # Another turn's first caption leaves at once too.
    other = outbox.open_turn("t2")
    await other.put(TextDelta("t2", "Hi"))
    began = time.monotonic()
    assert (await asyncio.wait_for(outbox.next(), 1)).text == "Hi"  # type: ignore[union-attr]
    assert time.monotonic() - began < 0.1


async def test_a_turns_audio_goes_ahead_of_its_gathering_text() -> None:
    outbox = Outbox(OutboxLimits(caption_gather_ms=10_000))
    outlet = outbox.open_turn("t1")
    await outlet.put(TextDelta("t1", "Sure, "))
    await outbox.next()
    await outlet.put(SegmentStarted("t1", 0, "Sure,", "Sure,", 0))
    await outbox.next()
    await outlet.put(TextDelta("t1", "here "))  # gathers (for up to 10 s)
    await outlet.put(piece(0, 40))
    await outlet.put(piece(0, 40))
    await outlet.put(TextDelta("t1", "it is. And "))
    began = time.monotonic()
    audio = await asyncio.wait_for(outbox.next(), 1)
    assert time.monotonic() - began < 0.5
    assert isinstance(audio, AudioChunk) and audio.duration_ms == 80  # (the pieces behind the text merge)
    # A segment start waits for the text before it (clients find a segment's text in the captions).
    await outlet.put(SegmentStarted("t1", 1, "here it is.", "here it is.", 80))
    caption = await asyncio.wait_for(outbox.next(), 1)
    assert isinstance(caption, TextDelta) and caption.text == "here it is. And "
    assert isinstance(await asyncio.wait_for(outbox.next(), 1), SegmentStarted)
    # So does the turn's end.
    await outlet.put(TextDelta("t1", "more."))
    outbox.put_control(end(), outlet)
    caption = await asyncio.wait_for(outbox.next(), 1)
    assert isinstance(caption, TextDelta) and caption.text == "more."
    assert isinstance(await asyncio.wait_for(outbox.next(), 1), TurnEnded)
    assert time.monotonic() - began < 0.5


async def test_gathering_text_keeps_its_place_before_anything_but_its_turns_audio() -> None:
    outbox = Outbox(OutboxLimits(caption_gather_ms=10_000))
    first = outbox.open_turn("t1")
    await first.put(TextDelta("t1", "A"))
    await outbox.next()
    await first.put(TextDelta("t1", "B"))
    second = outbox.open_turn("t2")
    await second.put(piece(0, 40, "t2"))  # another turn's audio: not ahead of t1's text
    await first.put(TextDelta("t1", "b"))
    messages = [await asyncio.wait_for(outbox.next(), 1) for _ in range(2)]
    assert isinstance(messages[0], TextDelta) and messages[0].text == "Bb"
    assert isinstance(messages[1], AudioChunk) and messages[1].turn_id == "t2"


async def test_captions_leave_one_by_one_without_gathering() -> None:
    outbox = Outbox(OutboxLimits(caption_gather_ms=0))
    outlet = outbox.open_turn("t1")
    texts = []
    for text in ["One ", "two ", "three."]:
        await outlet.put(TextDelta("t1", text))
        texts.append((await asyncio.wait_for(outbox.next(), 0.5)).text)  # type: ignore[union-attr]
    assert texts == ["One ", "two ", "three."]


async def test_text_due_while_audio_fills_behind_it_leaves_and_the_audio_fills_on() -> None:
    outbox = Outbox(OutboxLimits(caption_gather_ms=100, max_message_ms=1000))
    outlet = outbox.open_turn("t1")
    await outlet.put(TextDelta("t1", "A"))
    await outbox.next()
    await outlet.put(piece(0, 40))
    await outbox.next()  # the first audio: the client now holds 40 ms
    outlet.sent_audio(3000, time.monotonic())  # ... and then 3 s more: messages wait to fill
    await outlet.put(TextDelta("t1", "B"))
    await outlet.put(piece(0, 40))
    began = time.monotonic()
    caption = await asyncio.wait_for(outbox.next(), 2)
    assert isinstance(caption, TextDelta) and caption.text == "B"
    assert time.monotonic() - began < 0.5  # when due, not when the audio message is full
    await outlet.put(piece(0, 40))
    outbox.close()
    audio = await asyncio.wait_for(outbox.next(), 2)
    assert isinstance(audio, AudioChunk) and audio.duration_ms == 80


async def test_a_full_outbox_holds_back_puts_by_seconds_of_audio() -> None:
    outbox = Outbox(OutboxLimits(max_message_ms=200, max_buffered_ms=1000, max_buffered_items=1000))
    outlet = outbox.open_turn("t1")
    for _ in range(5):
        await outlet.put(piece(0, 200))  # one second of audio waits: the outbox is full
    blocked = asyncio.create_task(outlet.put(piece(0, 200)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    message = await outbox.next()  # the client reads one message: room for another piece
    assert isinstance(message, AudioChunk)
    await asyncio.wait_for(blocked, 1)


async def test_a_full_outbox_holds_back_puts_by_count_of_items() -> None:
    outbox = Outbox(OutboxLimits(max_buffered_items=3))
    outlet = outbox.open_turn("t1")
    for text in "abc":  # (text too long to join the text waiting: each is an item)
        await outlet.put(TextDelta("t1", text * 1000))
    blocked = asyncio.create_task(outlet.put(TextDelta("t1", "d")))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    outbox.put_control(end(), outlet)  # a turn's end never waits for room
    assert len(outbox.waiting()) == 4
    await outbox.next()
    await asyncio.sleep(0.05)
    assert not blocked.done()  # (three items still wait)
    await outbox.next()
    await asyncio.wait_for(blocked, 1)


async def test_a_dropped_turn_leaves_nothing_more_but_its_end() -> None:
    outbox = Outbox(OutboxLimits())
    outlet = outbox.open_turn("t1")
    await outlet.put(piece(0, 50))
    outbox.put_control(end(), outlet)
    assert outbox.drop(outlet) == end()  # the waiting end is handed back, to be replaced
    await outlet.put(piece(0, 50))  # discarded, never waits
    cut = TurnEnd("t1", TurnEndReason.INTERRUPTED, "", TurnMoments(0.0))
    outbox.put_control(cut, outlet)
    messages = await drain(outbox)
    assert [type(m) for m in messages] == [TurnEnded]


async def test_a_put_waiting_for_room_gives_up_when_its_turn_is_dropped() -> None:
    outbox = Outbox(OutboxLimits(max_buffered_items=1))
    outlet = outbox.open_turn("t1")
    await outlet.put(TextDelta("t1", "a"))
    blocked = asyncio.create_task(outlet.put(TextDelta("t1", "b")))
    await asyncio.sleep(0.01)
    outbox.drop(outlet)
    await asyncio.wait_for(blocked, 1)
    assert outbox.waiting() == []


async def test_turn_ended_timings_are_fixed_when_it_leaves() -> None:
    outbox = Outbox(OutboxLimits())
    outlet = outbox.open_turn("t1")
    loop = asyncio.get_running_loop()
    started = loop.time() - 1.0  # (the outbox and the loop share time.monotonic)
    moments = TurnMoments(started, first_llm_token=started + 0.1, first_segment=started + 0.2)
    await outlet.put(piece(0, 100))
    outbox.put_control(TurnEnd("t1", TurnEndReason.COMPLETED, "x", moments), outlet)
    first = await outbox.next()
    assert isinstance(first, AudioChunk)
    ended = await outbox.next()
    assert isinstance(ended, TurnEnded)
    timings = ended.timings
    assert (timings.first_llm_token_ms, timings.first_segment_ms) == (100, 200)
    assert 1000 <= timings.first_audio_ms <= timings.total_ms < 5000
    assert timings.audio_duration_ms == 100
    with pytest.raises(AttributeError):
        timings.total_ms = 0  # type: ignore[misc]


async def test_session_start_and_turns_keep_their_order() -> None:
    outbox = Outbox(OutboxLimits())
    outbox.put_control(SessionStarted("s", AudioFormat(Encoding.PCM16, 16000), "v", "llm", "tts"))
    one, two = outbox.open_turn("t1"), outbox.open_turn("t2")
    await one.put(TextDelta("t1", "a"))
    outbox.put_control(end("t1"), one)
    await two.put(TextDelta("t2", "b"))
    messages = await drain(outbox)
    assert [type(m).__name__ for m in messages] == ["SessionStarted", "TextDelta", "TurnEnded", "TextDelta"]
    assert [m.turn_id for m in messages[1:]] == ["t1", "t1", "t2"]  # type: ignore[attr-defined]


async def test_a_message_waiting_to_fill_is_put_back_when_the_reader_is_cancelled() -> None:
    outbox = Outbox(OutboxLimits(max_message_ms=200, fill_lead_ms=0))
    outlet = outbox.open_turn("t1")
    for _ in range(10):  # two seconds of audio: the client is far ahead once they have left
        await outlet.put(piece(0, 200))
    for _ in range(10):
        await outbox.next()
    await outlet.put(piece(0, 20))
    reading = asyncio.create_task(outbox.next())  # waits for more, to fill the message
    await asyncio.sleep(0.05)
    assert not reading.done()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert outbox.waiting() == [piece(0, 20)]
    await outlet.put(piece(0, 20))
    outbox.close()
    message = await outbox.next()
    assert isinstance(message, AudioChunk) and message.duration_ms == 40 and message.sequence == 10


@pytest.mark.parametrize(
    ("sent_ms", "wait_ms"),
    [
        (800, 500),  # half the lead is more than the fill lead: it waits until the client holds 300 ms
        (400, 200),  # half the lead is less: until the client holds half of what it holds
        (160, 60),  # never below the floor: until the client holds 100 ms
        (90, 0),  # at or below the floor, a piece leaves at once
    ],
)
async def test_a_message_waits_to_fill_while_the_client_keeps_its_lead(sent_ms: int, wait_ms: int) -> None:
    # ``sent_ms`` sent at once: the client holds that much. A new piece waits for company until the
    # client would hold only the fill lead (300 ms), or only half of what it held while that is
    # less, but never less than 100 ms.
    # (Checked against the deadline the outbox works out from when the first audio left, and that the
    # message leaves no sooner: not against the time a sleep took, which a busy machine stretches; a
    # clean-clone CI run measured 661 ms for 500.)
    outbox = Outbox(OutboxLimits(max_message_ms=1000, fill_lead_ms=300, min_fill_lead_ms=100))
    outlet = outbox.open_turn("t1")
    await outlet.put(piece(0, sent_ms))
    await outbox.next()
    first_left = outlet.first_audio_at
    assert first_left is not None
    await outlet.put(piece(0, 20))
    until = outlet.peek_fill_until()
    if wait_ms == 0:
        assert until is None
    else:
        assert until is not None and abs((until - first_left) * 1000 - wait_ms) <= 30, (until - first_left) * 1000
    message = await asyncio.wait_for(outbox.next(), 10)
    assert isinstance(message, AudioChunk) and message.duration_ms == 20
    if until is not None:
        assert time.monotonic() >= until - 0.002  # (not before it: uvloop's timers count whole milliseconds)


async def soon(next_message: Awaitable[Any]) -> Any:
    """What ``next_message`` gives within a few rounds of the event loop, without a timer having to
    fire (a wall-clock bound, 50 ms, failed on a busy machine): a message that waits for a deadline
    would need one."""
    task = asyncio.ensure_future(next_message)
    for _ in range(20):
        if task.done():
            break
        await asyncio.sleep(0)
    assert task.done(), "it waited"
    return task.result()


async def test_a_message_has_one_deadline_however_often_it_is_asked() -> None:
    # The turn gathering a message and the outbox filling it both ask until when it may wait: the
    # answer is worked out once (the client holding 400 ms: until it holds 200), not again from the
    # lead already halved (which would let the client fall to 100).
    outbox = Outbox(OutboxLimits(max_message_ms=1000, fill_lead_ms=300, min_fill_lead_ms=50))
    outlet = outbox.open_turn("t1")
    await outlet.put(piece(0, 400))
    await outbox.next()
    first = outlet.fill_until()
    assert first is not None
    await asyncio.sleep(first - time.monotonic())
    assert outlet.fill_until() == first
    await outlet.put(piece(0, 20))
    message = await soon(outbox.next())  # its deadline has passed: it leaves at once
    assert isinstance(message, AudioChunk) and message.duration_ms == 20
    assert outlet.fill_until() != first  # the next message's own


async def test_a_waiting_message_takes_what_comes_meanwhile() -> None:
    outbox = Outbox(OutboxLimits(max_message_ms=200, fill_lead_ms=300))
    outlet = outbox.open_turn("t1")
    await outlet.put(piece(0, 400))
    await outbox.next()
    await outlet.put(piece(0, 20))
    reading = asyncio.create_task(outbox.next())
    await asyncio.sleep(0.03)
    assert not reading.done()
    await outlet.put(piece(0, 20))
    await outlet.put(piece(0, 160))  # the message is full: it leaves without waiting for the deadline
    message = await soon(reading)
    assert isinstance(message, AudioChunk) and message.duration_ms == 200


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_buffered_ms"):
        OutboxLimits(max_message_ms=500, max_buffered_ms=100)


async def test_a_held_turn_leaves_nothing_until_released_and_then_all_of_it_in_order() -> None:
    outbox = Outbox(OutboxLimits(max_message_ms=100))
    held = outbox.open_turn("t1", held=True)
    await held.put(TextDelta("t1", "Hi."))
    await held.put(piece(0, 40))
    outbox.put_control(SessionStarted("s", AudioFormat(Encoding.PCM16, 16000), "v", "l", "t"))
    assert [type(i) for i in outbox.waiting()] == [SessionStarted]
    outbox.release(held)
    await held.put(piece(0, 40))  # after the release: straight in
    messages = await drain(outbox)
    assert [type(m) for m in messages] == [SessionStarted, TextDelta, AudioChunk]
    assert isinstance(messages[2], AudioChunk) and messages[2].duration_ms == 80
    assert held.first_audio_at is not None and held.audio_ms_sent == 80


async def test_a_held_turn_counts_toward_the_bounds_and_a_drop_frees_them() -> None:
    outbox = Outbox(OutboxLimits(max_message_ms=100, max_buffered_ms=200, max_buffered_items=64))
    held = outbox.open_turn("t1", held=True)
    for _ in range(5):
        await held.put(piece(0, 40))
    blocked = asyncio.create_task(held.put(piece(0, 40)))  # 200 ms held: full
    await asyncio.sleep(0.01)
    assert not blocked.done()
    outbox.drop(held)  # discarded: the put returns, nothing of it leaves, the room is back
    await asyncio.wait_for(blocked, 1)
    other = outbox.open_turn("t2")
    await asyncio.wait_for(other.put(piece(0, 40, "t2")), 1)
    messages = await drain(outbox)
    assert [m.turn_id for m in messages if isinstance(m, AudioChunk)] == ["t2"]
