"""The turn pipeline on its own (no sockets): ordering, look-ahead, streaming, resampling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

import pytest

from service.core.audio import AudioFormat, Encoding
from service.core.engine import Audio
from service.core.events import AudioChunk, AudioPiece, Item, Message, SegmentStarted, TextDelta, TurnStats
from service.core.outbox import Outbox, OutboxLimits
from service.core.turn import NoteFilter, SegmentAudio, Turn, TurnOptions
from service.errors import LLMError, TTSError
from tests.conftest import wait_for
from tests.fakes import FakeTTS, tone

REPLY = (
    "Okay, here we go now. "
    "The first full sentence is right here for you. "
    "The second full sentence follows it closely behind. "
    "And the third full sentence closes the whole reply."
)


async def words(text: str, delay_s: float = 0.0) -> AsyncGenerator[str, None]:
    for word in text.split(" "):
        await asyncio.sleep(delay_s)
        yield word + " "


async def run_turn(
    tts: FakeTTS,
    *,
    text: str = REPLY,
    lookahead: int = 2,
    rate: int = 16000,
    encoding: Encoding = Encoding.PCM16,
    fill_lead_ms: int = 500,
    message_ms: int = 100,
    language: str = "en_US",
    puts: list[Item] | None = None,
    source: AsyncGenerator[str, None] | None = None,
    order: list[str] | None = None,
    max_items: int = 64,
    read_pause_s: float = 0.0,
) -> tuple[Turn, list[tuple[float, Message]]]:
    """Run a turn into an outbox that a client reads as fast as messages come; what it read, when
    (and, in ``puts``, what the turn put into the outbox; in ``order``, the kind of each message as
    the client read it). The client may pause ``read_pause_s`` after each message."""
    outbox = Outbox(OutboxLimits(max_message_ms=message_ms, fill_lead_ms=fill_lead_ms, max_buffered_items=max_items))
    outlet = outbox.open_turn("t1")
    messages: list[tuple[float, Message]] = []

    async def emit(item: TextDelta | SegmentStarted | AudioPiece) -> None:
        if puts is not None:
            puts.append(item)
        await outlet.put(item)

    async def client() -> None:
        while (message := await outbox.next()) is not None:
            messages.append((time.monotonic(), message))
            if order is not None:
                order.append(type(message).__name__)
            if read_pause_s:
                await asyncio.sleep(read_pause_s)

    reading = asyncio.create_task(client())
    turn = Turn(
        "t1",
        words(text) if source is None else source,
        tts=tts,
        voice="fake-voice",
        language=language,
        audio_format=AudioFormat(encoding, rate),
        emit=emit,
        options=TurnOptions(lookahead=lookahead),
        piece_ms=message_ms,
        stats=TurnStats(),
        from_llm=True,
        fill_until=outlet.fill_until,
        pause_until=outlet.peek_fill_until,
    )
    try:
        await turn.run()
    finally:
        outbox.close()
        await reading
    return turn, messages


def audio_of(events: list[tuple[float, Message]]) -> list[AudioChunk]:
    return [e for _, e in events if isinstance(e, AudioChunk)]


async def test_audio_leaves_in_order_when_later_segments_finish_first() -> None:
    # The first segment is slow to synthesize, later ones are instant: they finish first.
    tts = FakeTTS(latency_s=lambda text: 0.3 if text.startswith("Okay") else 0.0)
    turn, events = await run_turn(tts)
    segments = [e for _, e in events if isinstance(e, SegmentStarted)]
    assert [s.index for s in segments] == [0, 1, 2, 3, 4]  # "Okay," is said on its own
    chunks = audio_of(events)
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert [c.segment_index for c in chunks] == sorted(c.segment_index for c in chunks)
    # Each segment's audio comes after its own SegmentStarted and before the next one.
    order = [(type(e).__name__, getattr(e, "index", getattr(e, "segment_index", None))) for _, e in events]
    order = [o for o in order if o[0] != "TextDelta"]
    current = -1
    for kind, index in order:
        if kind == "SegmentStarted":
            current = index
        else:
            assert index == current
    # start_ms is the timeline position: the sum of the earlier segments' audio.
    for segment in segments[1:]:
        before = sum(c.duration_ms for c in chunks if c.segment_index < segment.index)
        assert segment.start_ms == pytest.approx(before, abs=1)
    assert turn.text.strip() == REPLY


async def test_lookahead_synthesizes_ahead_but_is_bounded() -> None:
    peak = 0

    class CountingTTS(FakeTTS):
        async def _synthesize(self, text: str) -> AsyncGenerator[Audio, None]:
            nonlocal peak
            async for audio in super()._synthesize(text):
                peak = max(peak, self.open_streams)
                yield audio

    tts = CountingTTS(latency_s=0.05, chunk_s=0.05)
    await run_turn(tts, lookahead=1)
    assert peak == 2  # the segment being sent, plus one ahead

    tts = CountingTTS(latency_s=0.05, chunk_s=0.05)
    peak = 0
    await run_turn(tts, lookahead=0)
    assert peak == 1


async def test_chunks_leave_as_the_engine_yields_them() -> None:
    tts = FakeTTS(chunks=4, chunk_s=0.15)
    _, events = await run_turn(tts, text="Hello there, my good friend.")
    times = [t for t, e in events if isinstance(e, AudioChunk)]
    # Four engine chunks 150 ms apart: audio must not wait for the whole segment.
    assert times[-1] - times[0] >= 0.4


async def test_messages_fill_up_once_the_client_is_well_ahead() -> None:
    # Synthesis about four times faster than real time, in pieces of 8 to 15 ms: the first pieces leave
    # one by one (nothing waits for the first audio), then, with the client 300+100 ms ahead, messages
    # wait until they are full.
    tts = FakeTTS(ms_per_char=40, chunks=100, chunk_s=0.002)
    _, events = await run_turn(
        tts, text="Okay, here we go now. The first full sentence is right here.", fill_lead_ms=300
    )
    chunks = audio_of(events)
    sizes = [c.duration_ms for c in chunks]
    assert sizes[0] < 25
    assert max(sizes) <= 100
    second = [c.duration_ms for c in chunks if c.segment_index == 1]
    assert len(second) < 100 / 2  # far fewer messages than the engine's pieces...
    assert min(second[:-1]) > 80  # ... each as full as the pieces allow


async def test_a_message_is_gathered_before_it_reaches_the_outbox() -> None:
    # As above: once the client is well ahead, the turn hands the outbox a message's worth at a time,
    # not each of the engine's pieces (each would cost the event loop a task switch or two).
    tts = FakeTTS(ms_per_char=40, chunks=100, chunk_s=0.002)
    puts: list[Item] = []
    _, events = await run_turn(
        tts,
        text="Okay, here we go now. The first full sentence is right here.",
        fill_lead_ms=300,
        lookahead=0,  # (no segment's audio waits ready in full: each piece comes as the engine makes it)
        puts=puts,
    )
    last = [p.duration_ms for p in puts if isinstance(p, AudioPiece) and p.segment_index == 2]
    assert len(last) < 100 / 2  # far fewer than the engine's 100 pieces...
    assert sorted(last)[len(last) // 2] > 80  # ... most as full as the pieces allow (the client is ahead)
    # Nothing lost or reordered on the way.
    pieces = b"".join(p.data for p in puts if isinstance(p, AudioPiece))
    assert b"".join(c.data for c in audio_of(events)) == pieces
    assert len(pieces) // 2 == round(sum(tts.duration_ms(t) for t in tts.texts) * 16)


class BufferedTTS(FakeTTS):
    """Makes audio at four times real time in 10 ms chunks on its own clock and, as a network stream
    does, hands each read everything made since the read before. Counts the reads of each text."""

    reads: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.reads = {}

    async def _synthesize(self, text: str) -> AsyncGenerator[Audio, None]:
        rate = self.sample_rate_hz
        chunk = rate // 100
        total = int(self.duration_ms(text) * rate / 1000)
        began = time.monotonic()
        start = 0
        while start < total:
            made = min(total, int((time.monotonic() - began) * 4 * rate) // chunk * chunk)
            if made <= start:
                await asyncio.sleep(max(0.0, began + (start + chunk) / rate / 4 - time.monotonic()))
                continue
            self.reads[text] = self.reads.get(text, 0) + 1
            yield Audio(tone(start, made - start, rate), rate)
            start = made


async def test_messages_grow_with_the_clients_lead_from_the_first_one() -> None:
    # An engine making audio four times faster than real time in 10 ms chunks on its own clock (2.16 s
    # in two segments): the first chunks leave one by one until the client holds 100 ms; then each
    # message may wait for up to half of what the client holds, so they grow, to 1 s: about 20
    # messages, where one per chunk until the client held the 500 ms fill lead made about 90.
    tts = BufferedTTS()
    _, events = await run_turn(tts, text="Here we go now with every one of us.", message_ms=1000)
    sizes = [c.duration_ms for c in audio_of(events)]
    assert sizes[0] <= 200
    assert len(sizes) <= 35
    assert max(sizes) >= 400
    assert sum(sizes) == pytest.approx(sum(tts.duration_ms(t) for t in tts.texts), abs=1)


async def test_a_turns_first_message_is_short_whatever_the_engine_hands_over() -> None:
    # An engine whose first chunk is a whole sentence (as Piper's is): the first message still holds
    # at most 200 ms, so that it is encoded and carried at once; the rest follows in full messages.
    tts = FakeTTS(chunks=1)
    _, events = await run_turn(tts, text="Here we go now with every one of us.", message_ms=1000)
    sizes = [c.duration_ms for c in audio_of(events)]
    assert sizes[0] == pytest.approx(200)
    assert max(sizes) > 200
    assert sum(sizes) == pytest.approx(sum(tts.duration_ms(t) for t in tts.texts), abs=1)


async def test_the_engine_is_read_in_rounds_once_the_client_is_well_ahead() -> None:
    # Once the client holds more than the fill lead, a read of the engine waits half a message's time
    # after each message's worth, so that the next read takes what was made meanwhile: a handful of
    # reads for a segment, instead of one (and a task switch) per 10 ms chunk.
    tts = BufferedTTS()
    puts: list[Item] = []
    _, events = await run_turn(tts, fill_lead_ms=300, puts=puts)
    last = tts.texts[-1]
    chunks = tts.duration_ms(last) / 10
    assert tts.reads[last] < chunks / 5
    # Nothing lost or reordered, and the messages full.
    pieces = b"".join(p.data for p in puts if isinstance(p, AudioPiece))
    assert b"".join(c.data for c in audio_of(events)) == pieces
    assert len(pieces) // 2 == round(sum(tts.duration_ms(t) for t in tts.texts) * 16)
    sizes = [c.duration_ms for c in audio_of(events) if c.segment_index == 4]
    assert min(sizes[:-1]) == pytest.approx(100)


async def test_a_read_pause_ends_before_the_client_would_hold_less_than_the_fill_lead() -> None:
    def turn(fill_until: Callable[[], float | None]) -> Turn:
        return Turn(
            "t1",
            words("Hello."),
            tts=FakeTTS(),
            voice="fake-voice",
            language="en_US",
            audio_format=AudioFormat(Encoding.PCM16, 16000),
            emit=lambda item: asyncio.sleep(0),
            options=TurnOptions(),
            piece_ms=2000,  # a second's pause, unless the fill lead comes first
            stats=TurnStats(),
            from_llm=True,
            fill_until=fill_until,
        )

    began = time.monotonic()
    await turn(lambda: time.monotonic() + 0.02)._read_pause(2000)
    assert time.monotonic() - began < 0.5
    began = time.monotonic()
    await turn(lambda: None)._read_pause(2000)  # the client holds no more than the fill lead: no pause
    assert time.monotonic() - began < 0.1
    began = time.monotonic()
    await turn(lambda: time.monotonic() + 10)._read_pause(2000)
    assert time.monotonic() - began >= 0.99
    began = time.monotonic()
    await turn(lambda: time.monotonic() + 10)._read_pause(400)  # half of what was read
    assert 0.19 <= time.monotonic() - began < 0.5


async def test_segment_audio_wakes_its_reader_for_what_it_waits_for() -> None:
    audio = SegmentAudio()
    loop = asyncio.get_running_loop()
    # Nothing there: the reader waits for a first piece, then takes what there is.
    reading = asyncio.create_task(audio.take(100, None))
    await asyncio.sleep(0.01)
    assert not reading.done()
    audio.append(b"a" * 20)
    assert await reading == b"a" * 20
    # Filling: it waits for a full message, taking the limit exactly (a piece is cut to fill it).
    audio.append(b"b" * 20)
    reading = asyncio.create_task(audio.take(100, loop.time() + 5))
    for _ in range(3):
        audio.append(b"c" * 20)
        await asyncio.sleep(0.01)
        assert not reading.done()
    audio.append(b"d" * 30)
    audio.append(b"e" * 20)  # (beyond the limit: stays for the next message)
    assert await reading == b"b" * 20 + b"c" * 60 + b"d" * 20
    # The deadline ends the wait with what there is.
    began = time.monotonic()
    assert await audio.take(100, loop.time() + 0.05) == b"d" * 10 + b"e" * 20
    assert 0.04 <= time.monotonic() - began < 1
    # The end ends it too; then the segment is over.
    audio.append(b"f" * 10)
    reading = asyncio.create_task(audio.take(100, loop.time() + 5))
    await asyncio.sleep(0.01)
    audio.end()
    assert await reading == b"f" * 10
    assert await audio.take(100, None) is None


async def test_segment_audio_gives_what_came_before_an_error_then_the_error() -> None:
    audio = SegmentAudio()
    audio.append(b"a" * 250)  # (a piece is cut to fill a message)
    audio.append(b"b" * 10)
    audio.end(TTSError("voice broke"))
    assert await audio.take(100, None) == b"a" * 100
    assert await audio.take(100, None) == b"a" * 100
    assert await audio.take(100, None) == b"a" * 50 + b"b" * 10
    with pytest.raises(TTSError, match="voice broke"):
        await audio.take(100, None)
    # Cancelling a reader loses nothing.
    audio = SegmentAudio()
    reading = asyncio.create_task(audio.take(100, None))
    await asyncio.sleep(0.01)
    reading.cancel()
    audio.append(b"x" * 4)
    assert await audio.take(100, None) == b"x" * 4


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
async def test_audio_is_resampled_to_the_requested_rate(rate: int) -> None:
    tts = FakeTTS(sample_rate_hz=16000)
    _, events = await run_turn(tts, text="Hello there, my good friend.", rate=rate)
    samples = sum(len(c.data) // 2 for c in audio_of(events))
    expected = sum(tts.duration_ms(t) for t in tts.texts) * rate / 1000
    assert samples == pytest.approx(expected, rel=0.01)
    assert all(c.duration_ms <= 100.5 for c in audio_of(events))


async def test_wav_header_starts_the_turn_only() -> None:
    _, events = await run_turn(FakeTTS(), encoding=Encoding.WAV, rate=24000)
    chunks = audio_of(events)
    assert chunks[0].data[:4] == b"RIFF" and chunks[0].data[8:16] == b"WAVEfmt "
    assert int.from_bytes(chunks[0].data[24:28], "little") == 24000
    assert not any(c.data[:4] == b"RIFF" for c in chunks[1:])


async def test_tts_failure_raises_after_earlier_audio() -> None:
    tts = FakeTTS(fail_on="second")
    with pytest.raises(TTSError, match="voice broke"):
        await run_turn(tts)


async def test_captions_are_not_normalized_but_speech_is() -> None:
    tts = FakeTTS()
    _, events = await run_turn(tts, text="Here is **bold** text, with a [link](https://x.y) in it.")
    captions = "".join(e.text for _, e in events if isinstance(e, TextDelta))
    assert "**bold**" in captions and "(https://x.y)" in captions
    assert all("*" not in t and "https" not in t for t in tts.texts)


async def test_cancel_stops_source_and_synthesis() -> None:
    tts = FakeTTS(latency_s=5.0)
    task = asyncio.create_task(run_turn(tts))
    await wait_for(lambda: tts.open_streams > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tts.open_streams == 0
    assert tts.cancelled >= 1


async def test_the_llm_request_leaves_in_the_turns_first_step() -> None:
    # On the way to the first audio: the text source is opened by the turn's own task as it starts,
    # not by a task it creates (which would run one round of the event loop later).
    opened_at: list[str] = []
    marks: list[str] = []

    async def source() -> AsyncGenerator[str, None]:
        opened_at.append("opened" if not marks else "late")
        yield "Hello there. "

    task = asyncio.create_task(run_turn(FakeTTS(), source=source()))
    asyncio.get_running_loop().call_soon(marks.append, "a round passed")
    await task
    assert opened_at == ["opened"]


async def test_a_segments_synthesis_starts_before_its_caption_is_read() -> None:
    # On the way to the first audio: the caption of the delta that completes a segment wakes the
    # stream's writer; the segment's synthesis task must have its first step (which sends the TTS
    # request) before the writer's, not wait behind the caption's sending.
    order: list[str] = []

    class RecordingTTS(FakeTTS):
        def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
            order.append(f"tts request: {text}")
            return super().synthesize(text, voice, urgent=urgent)

    async def source() -> AsyncGenerator[str, None]:
        await asyncio.sleep(0.01)  # (the client waits for messages)
        yield "Sure, "  # (a first segment the segmenter cuts at once)
        await asyncio.sleep(0.05)
        yield "that is fine."

    await run_turn(RecordingTTS(), source=source(), order=order)
    assert order[:2] == ["tts request: Sure,", "TextDelta"]
    assert order.index("TextDelta") < order.index("SegmentStarted")  # (a segment's text comes first)


async def test_the_first_audio_goes_to_the_outbox_as_the_engine_yields_it() -> None:
    # On the way to the first audio: the first spoken segment is synthesized by the turn's sender
    # itself, so its audio reaches the outbox in the step the engine yields it, not one task switch
    # later (a look-ahead segment's task hands its audio to the sender).
    order: list[str] = []

    class MarkingTTS(FakeTTS):
        async def _synthesize(self, text: str) -> AsyncGenerator[Audio, None]:
            async for audio in super()._synthesize(text):
                if not order:
                    asyncio.get_running_loop().call_soon(order.append, "a round passed")
                yield audio

    async def emit_marks() -> AsyncGenerator[str, None]:
        yield "Sure, "
        await asyncio.sleep(0.05)
        yield "that is fine. And more."

    class Puts(list[Item]):
        def append(self, item: Item) -> None:
            if isinstance(item, AudioPiece) and "first audio put" not in order:
                order.append("first audio put")
            super().append(item)

    _, events = await run_turn(MarkingTTS(latency_s=0.01), source=emit_marks(), puts=Puts())
    assert order[:2] == ["first audio put", "a round passed"]
    assert [c.segment_index for c in audio_of(events)] == sorted(c.segment_index for c in audio_of(events))


@pytest.mark.parametrize("lookahead", [0, 2])
async def test_a_segment_starts_after_its_caption_even_while_the_outbox_is_full(lookahead: int) -> None:
    # A segment is handed to the sender before its delta's caption is put (so that its synthesis
    # starts first); while the outbox is full, the caption's put waits, and the segment's start must
    # still come after it: clients find a segment's text in the captions before the segment.
    text = "Sure, here we go. " + " ".join(f"Sentence number {n} is here, and it goes on." for n in range(12))

    async def deltas() -> AsyncGenerator[str, None]:
        for at in range(0, len(text), 23):
            yield text[at : at + 23]
            await asyncio.sleep(0)

    _, events = await run_turn(FakeTTS(chunks=5), source=deltas(), max_items=2, read_pause_s=0.002, lookahead=lookahead)
    captioned = ""
    for _, message in events:
        if isinstance(message, TextDelta):
            captioned += message.text
        elif isinstance(message, SegmentStarted):
            assert message.text in captioned, (message.text, captioned[-80:])
    assert captioned == text
    assert sum(isinstance(m, SegmentStarted) for _, m in events) >= 12


async def test_a_segment_starts_only_once_its_caption_was_put() -> None:
    # The segment is handed to the sender before the caption of its delta is put; a put that waits
    # (the outbox full) must not let the segment's start overtake its caption.
    emitted: list[str] = []

    async def emit(item: TextDelta | SegmentStarted | AudioPiece) -> None:
        if isinstance(item, TextDelta) and not emitted:
            await asyncio.sleep(0.05)  # (waiting for room)
        emitted.append(type(item).__name__)

    async def source() -> AsyncGenerator[str, None]:
        yield "Sure, "
        yield "that is fine."

    turn = Turn(
        "t1",
        source(),
        tts=FakeTTS(),
        voice="fake-voice",
        language="en_US",
        audio_format=AudioFormat(Encoding.PCM16, 16000),
        emit=emit,
        options=TurnOptions(),
        piece_ms=100,
        stats=TurnStats(),
        from_llm=True,
    )
    await turn.run()
    assert emitted.index("TextDelta") < emitted.index("SegmentStarted")


async def test_a_tts_failure_stops_the_text_source_at_once() -> None:
    closed = asyncio.Event()
    yielded = 0

    async def slow_llm() -> AsyncGenerator[str, None]:
        nonlocal yielded
        try:
            yield "The second sentence breaks the voice. "
            for _ in range(1000):
                await asyncio.sleep(0.05)
                yielded += 1
                yield "more "
        finally:
            closed.set()

    with pytest.raises(TTSError, match="voice broke"):  # the engine's error itself, not a group of them
        await run_turn(FakeTTS(fail_on="second"), source=slow_llm())
    assert closed.is_set()
    assert yielded < 100  # stopped long before the LLM's text ran out


async def test_an_llm_failure_lets_what_was_cut_be_said_then_raises_its_own_error() -> None:
    # Found by CI: the sender was cancelled with the reading, so a segment whose audio was still being
    # made when the LLM stalled was cut short ("what was spoken before the stall stays").
    tts = FakeTTS(latency_s=0.3)
    puts: list[Item] = []

    async def failing_llm() -> AsyncGenerator[str, None]:
        yield "A first sentence to say. And a second one. "
        await wait_for(lambda: tts.open_streams > 0)
        raise LLMError("the model went away")

    with pytest.raises(LLMError, match="went away"):  # the engine's error itself, not a group of them
        await run_turn(tts, source=failing_llm(), puts=puts)
    said = {p.segment_index for p in puts if isinstance(p, AudioPiece)}
    assert said == {0, 1}
    assert tts.open_streams == 0


async def test_filling_never_holds_back_audio_through_an_engine_stall() -> None:
    # Six 180 ms pieces at once, then the engine stalls for a second: every piece already made must
    # leave before the stall ends (a message waits to fill only while the client has audio to spare,
    # and not for a piece that could not fit anyway).
    rate = 16000
    piece = b"\xe8\x03" * (rate * 180 // 1000)  # audible (1000), so no leading silence is dropped

    class StallingTTS(FakeTTS):
        def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
            async def audio() -> AsyncGenerator[Audio, None]:
                for _ in range(6):
                    yield Audio(piece, rate)
                await asyncio.sleep(1.0)
                yield Audio(piece, rate)

            return audio()

    _, events = await run_turn(StallingTTS(), text="One long sentence.")
    chunks = [(at, e) for at, e in events if isinstance(e, AudioChunk)]
    before_the_stall_ended = sum(e.duration_ms for at, e in chunks if at - chunks[0][0] < 0.5)
    assert before_the_stall_ended == 6 * 180


async def test_text_the_voice_cannot_read_is_captioned_but_not_synthesized() -> None:
    tts = FakeTTS()
    text = "How do I boil an egg?で購入するまで待ってください。"
    _, events = await run_turn(tts, text=text)
    segments = [e for _, e in events if isinstance(e, SegmentStarted)]
    assert [s.text for s in segments] == ["How do I boil an egg?", "で購入するまで待ってください。"]
    assert [s.spoken_text for s in segments] == ["How do I boil an egg?", ""]
    assert tts.texts == ["How do I boil an egg?"]
    assert "".join(e.text for _, e in events if isinstance(e, TextDelta)).strip() == text


async def test_silence_before_the_first_speech_is_dropped_and_later_silence_kept() -> None:
    rate = 16000
    silence, speech = b"\x00\x00" * (rate * 60 // 1000), b"\xe8\x03" * (rate * 100 // 1000)

    class QuietStartTTS(FakeTTS):
        def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
            async def audio() -> AsyncGenerator[Audio, None]:
                yield Audio(silence[: len(silence) // 2], rate)  # silence over two chunks
                yield Audio(silence[len(silence) // 2 :] + speech, rate)

            return audio()

    _, events = await run_turn(QuietStartTTS(), text="The first sentence is here. The second one follows it now.")
    pcm = b"".join(e.data for e in audio_of(events))
    lead_in = rate * 10 // 1000  # 10 ms of the silence stays before the speech
    first = (lead_in + len(speech) // 2) * 2
    assert pcm[: lead_in * 2] == b"\x00\x00" * lead_in
    assert pcm[lead_in * 2 : first] == speech
    assert pcm[first:] == silence + speech  # the second segment is untouched


async def test_a_head_is_read_as_going_on() -> None:
    tts = FakeTTS()
    _, events = await run_turn(tts, text="The sky is blue because the sun lights the air. That is all.")
    assert tts.texts == ["The sky is blue,", "because the sun lights the air.", "That is all."]
    captions = [e.text for _, e in events if isinstance(e, SegmentStarted)]
    assert captions[0] == "The sky is blue"


async def test_look_ahead_waits_for_the_first_segments_audio() -> None:
    """The listener waits for the first segment: later ones are not synthesized beside it."""
    started: list[tuple[str, float]] = []
    first_audio_at: list[float] = []

    class RecordingTTS(FakeTTS):
        def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
            async def audio() -> AsyncGenerator[Audio, None]:
                started.append((text, time.monotonic()))
                await asyncio.sleep(0.2 if urgent else 0.01)
                if urgent:
                    first_audio_at.append(time.monotonic())
                yield Audio(b"\xe8\x03" * 1600, 16000)

            return audio()

    tts = RecordingTTS()
    text = "The first part is here. The second part comes next, right after it. And the third one ends it."
    await run_turn(tts, text=text)
    assert [text for text, _ in started][0] == "The first part is here."
    assert len(started) == 3, started
    assert all(at >= first_audio_at[0] for _, at in started[1:])


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The cat [interrupted: the user heard only this much] sat.", "The cat  sat."),
        ("Yes. [Interrupted before the user heard anything]", "Yes. "),
        ("A list [1] and [in] brackets [interrupt] stay.", "A list [1] and [in] brackets [interrupt] stay."),
        ("Not closed on its line [interrupted: oh\nno] x", "Not closed on its line [interrupted: oh\nno] x"),
        ("It ends mid-note [interrupted: the", "It ends mid-note [interrupted: the"),
        ("Too long [interrupted" + "x" * 200 + "]", "Too long [interrupted" + "x" * 200 + "]"),
    ],
)
def test_the_historys_notes_are_never_spoken_or_captioned(text: str, expected: str, step: int) -> None:
    notes = NoteFilter()
    out = "".join(notes.feed(text[i : i + step]) for i in range(0, len(text), step)) + notes.flush()
    assert out == expected
