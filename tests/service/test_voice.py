"""Voice input through the real gRPC server, with a fake speech detector (loud is speech) and a fake
STT engine of configurable latency: utterances, barge-in, coughs, MANUAL commit and clear, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from tests.conftest import Harness, speak, start, start_harness, stop_harness, user, wait_for
from tests.fakes import FakeLLM, FakeSTT, loud, quiet

RATE = 16000


@pytest.fixture
async def voiced() -> AsyncIterator[Harness]:
    h = await start_harness(stt=FakeSTT())
    yield h
    await stop_harness(h)


def voice_start(**detection: object) -> pb.ConverseRequest:
    return start(
        input_audio=pb.InputAudio(
            sample_rate_hz=RATE,
            turn_detection=pb.TurnDetection(**detection),  # type: ignore[arg-type]
        )
    )


def audio(pcm: bytes, chunk_ms: int = 100) -> list[pb.ConverseRequest]:
    size = RATE * 2 * chunk_ms // 1000
    return [pb.ConverseRequest(user_audio=pb.UserAudio(data=pcm[i : i + size])) for i in range(0, len(pcm), size)]


async def read_until(
    call: grpc.aio.StreamStreamCall, kind: str, seen: list[pb.ConverseResponse]
) -> pb.ConverseResponse:
    while True:
        response = await asyncio.wait_for(call.read(), 10)
        assert response is not grpc.aio.EOF, f"stream ended before {kind}"
        seen.append(response)
        if response.WhichOneof("kind") == kind:
            return response


def kinds(responses: list[pb.ConverseResponse]) -> list[str]:
    return [r.WhichOneof("kind") for r in responses]


async def test_an_utterance_is_transcribed_and_answered(voiced: Harness) -> None:
    call = voiced.stub.Converse()
    await call.write(voice_start(silence_ms=300, min_speech_ms=100, prefix_padding_ms=200))
    seen: list[pb.ConverseResponse] = []
    await read_until(call, "session_started", seen)
    await say(call, quiet(500) + loud(800) + quiet(600))
    ended = await read_until(call, "turn_ended", seen)
    order = [k for k in kinds(seen) if k in ("speech_started", "speech_stopped", "transcript", "turn_ended")]
    assert order == ["speech_started", "speech_stopped", "transcript", "turn_ended"]
    started = next(r.speech_started for r in seen if r.WhichOneof("kind") == "speech_started")
    stopped = next(r.speech_stopped for r in seen if r.WhichOneof("kind") == "speech_stopped")
    assert 250 <= started.audio_start_ms <= 350  # speech at 500 ms, 200 ms of padding kept before it
    assert 1250 <= stopped.audio_end_ms <= 1350
    transcript = next(r.transcript for r in seen if r.WhichOneof("kind") == "transcript")
    assert transcript.is_final and transcript.text == "What is the weather like?"
    assert transcript.turn_id == ended.turn_ended.turn_id
    assert ended.turn_ended.reason == pb.TURN_END_REASON_COMPLETED
    assert voiced.llm.requests[-1].messages[-1].content == "What is the weather like?"
    timings = ended.turn_ended.timings
    assert timings.transcription_ms >= 40 and timings.speech_end_audio_ms == stopped.audio_end_ms
    # Sent faster than real time here, so the silence after the speech arrived with it: the wait is
    # the transcription and the reply's first audio.
    assert timings.speech_end_to_first_audio_ms >= timings.transcription_ms
    # The utterance the STT got: the padding, the speech, a little after; at the detector's rate.
    heard = voiced.stt.heard[0]  # type: ignore[union-attr]
    assert 0.9 * RATE * 2 <= len(heard) <= 1.3 * RATE * 2
    call.cancel()


async def test_speech_during_a_reply_interrupts_it_at_once(voiced: Harness) -> None:
    voiced.llm.token_s = 0.05  # a reply that takes a while (about 3 s: running when the user speaks)
    voiced.llm.reply *= 4
    call = voiced.stub.Converse()
    await call.write(voice_start(silence_ms=300, min_speech_ms=100))
    seen: list[pb.ConverseResponse] = []
    await read_until(call, "session_started", seen)
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text="Tell me a story.")))
    await read_until(call, "audio", seen)
    await say(call, loud(300))
    ended = await read_until(call, "turn_ended", seen)
    after_speech = kinds(seen)[kinds(seen).index("speech_started") :]
    assert "audio" not in after_speech  # nothing more of the reply once the user spoke
    assert ended.turn_ended.reason == pb.TURN_END_REASON_INTERRUPTED
    call.cancel()


@pytest.mark.parametrize("named", [False, True], ids=["unnamed pieces", "every piece named"])
async def test_the_rest_of_a_speak_turn_the_user_spoke_over_is_dropped_not_spoken(voiced: Harness, named: bool) -> None:
    # The client streams a text to read; the user speaks over it while more pieces are on their way
    # (the client cannot know in time). They opened a new speak turn that talked over the user and cut
    # off the answer to them; named as the first, they ended the stream (a turn id used), and so did
    # the flush (no speak turn open): a QA pass.
    def piece(text: str, flush: bool = False) -> pb.ConverseRequest:
        return pb.ConverseRequest(speak_text=pb.SpeakText(text=text, flush=flush, turn_id="story" if named else ""))

    call = voiced.stub.Converse()
    await call.write(voice_start(silence_ms=300, min_speech_ms=100))
    seen: list[pb.ConverseResponse] = []
    await read_until(call, "session_started", seen)
    await call.write(piece("Once upon a time there was a castle. It stood on a hill, "))
    await read_until(call, "audio", seen)
    await say(call, loud(300))
    stopped = await read_until(call, "turn_ended", seen)
    assert stopped.turn_ended.reason == pb.TURN_END_REASON_INTERRUPTED
    await call.write(piece("In the castle lived a king. "))
    await call.write(piece("", flush=True))
    await say(call, quiet(600))  # (the user stops speaking: their words are answered)
    answered = await read_until(call, "turn_ended", seen)
    assert answered.turn_ended.reason == pb.TURN_END_REASON_COMPLETED
    assert "transcript" in kinds(seen) and not any("king" in text for text in voiced.tts.texts)  # type: ignore[union-attr]
    await call.write(speak("Read this next.", flush=True))  # (a new speak turn, once the old one was flushed)
    ended = await read_until(call, "turn_ended", seen)
    assert (ended.turn_ended.reason, ended.turn_ended.spoken_text) == (pb.TURN_END_REASON_COMPLETED, "Read this next.")
    call.cancel()


async def test_a_cough_neither_interrupts_nor_starts_a_turn(voiced: Harness) -> None:
    voiced.llm.token_s = 0.02
    call = voiced.stub.Converse()
    await call.write(voice_start(silence_ms=300, min_speech_ms=250))
    seen: list[pb.ConverseResponse] = []
    await read_until(call, "session_started", seen)
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text="Tell me a story.")))
    await read_until(call, "audio", seen)
    await say(call, loud(120) + quiet(800))  # a cough: 120 ms
    ended = await read_until(call, "turn_ended", seen)
    assert ended.turn_ended.reason == pb.TURN_END_REASON_COMPLETED
    assert "speech_started" not in kinds(seen) and voiced.stt.heard == []  # type: ignore[union-attr]
    call.cancel()


@pytest.mark.parametrize("heard", ["Thank you.", "", "  ", "Thanks for watching!"])
async def test_what_whisper_hears_in_noise_never_starts_a_turn(heard: str) -> None:
    h = await start_harness(stt=FakeSTT(text=heard, no_speech_probability=0.4))
    try:
        call = h.stub.Converse()
        await call.write(voice_start(silence_ms=200, min_speech_ms=100))
        seen: list[pb.ConverseResponse] = []
        await read_until(call, "session_started", seen)
        await say(call, loud(300) + quiet(500))
        await read_until(call, "speech_stopped", seen)
        await asyncio.sleep(0.3)  # the transcription is done by now
        await call.write(pb.ConverseRequest(user_text=pb.UserText(text="ping")))
        ended = await read_until(call, "turn_ended", seen)
        assert "transcript" not in kinds(seen) and ended.turn_ended.turn_id == "turn-1"
        assert [r.messages[-1].content for r in h.llm.requests] == ["ping"]
        call.cancel()
    finally:
        await stop_harness(h)


async def test_manual_mode_waits_for_commit_and_clear_discards(voiced: Harness) -> None:
    voiced.stt.texts = ["First question.", "Second question."]  # type: ignore[union-attr]
    call = voiced.stub.Converse()
    await call.write(voice_start(mode=pb.TURN_DETECTION_MODE_MANUAL, min_speech_ms=100))
    seen: list[pb.ConverseResponse] = []
    await read_until(call, "session_started", seen)
    await say(call, loud(400) + quiet(1500))  # silence does not end a MANUAL utterance
    await read_until(call, "speech_started", seen)
    await asyncio.sleep(0.2)
    assert "speech_stopped" not in kinds(seen)
    await call.write(pb.ConverseRequest(clear_audio=pb.ClearAudio()))
    await say(call, loud(300))
    await call.write(pb.ConverseRequest(commit_audio=pb.CommitAudio(turn_id="mine")))
    ended = await read_until(call, "turn_ended", seen)
    assert ended.turn_ended.turn_id == "mine"
    transcript = next(r.transcript for r in seen if r.WhichOneof("kind") == "transcript")
    assert transcript.turn_id == "mine" and transcript.text == "First question."
    assert len(voiced.stt.heard) == 1 and len(voiced.stt.heard[0]) <= 0.35 * RATE * 2  # type: ignore[union-attr]
    call.cancel()


async def test_a_clear_during_speech_ends_it_with_speech_stopped_and_nothing_is_transcribed(voiced: Harness) -> None:
    # Found in QA: the client saw speech_started, cleared, and never saw the speech stop.
    call, seen = await open_manual(voiced, "After the clear.")
    await say(call, loud(400))
    await read_until(call, "speech_started", seen)
    await call.write(pb.ConverseRequest(clear_audio=pb.ClearAudio()))
    stopped = await read_until(call, "speech_stopped", seen)
    assert stopped.speech_stopped.audio_end_ms == 400
    await call.write(pb.ConverseRequest(clear_audio=pb.ClearAudio()))  # (nothing was heard since: nothing to say)
    await say(call, quiet(200) + loud(300))
    await call.write(pb.ConverseRequest(commit_audio=pb.CommitAudio(turn_id="after")))
    await read_until(call, "turn_ended", seen)
    voice = [k for k in kinds(seen) if k in ("speech_started", "speech_stopped")]
    assert voice == ["speech_started", "speech_stopped"] * 2  # each start has its one stop
    assert len(voiced.stt.heard) == 1  # type: ignore[union-attr]
    call.cancel()


async def test_a_commit_without_speech_is_transcribed_with_no_lone_speech_stopped(voiced: Harness) -> None:
    # Found in QA: a commit of audio in which no speech was found sent speech_stopped with no start.
    call, seen = await open_manual(voiced, "Something soft.")
    await say(call, quiet(600))
    await call.write(pb.ConverseRequest(commit_audio=pb.CommitAudio(turn_id="soft")))
    ended = await read_until(call, "turn_ended", seen)
    assert ended.turn_ended.turn_id == "soft"  # the client said it was an utterance: it is answered
    assert "speech_started" not in kinds(seen) and "speech_stopped" not in kinds(seen)
    call.cancel()


async def open_manual(h: Harness, *texts: str) -> tuple[grpc.aio.StreamStreamCall, list[pb.ConverseResponse]]:
    """A MANUAL voice stream whose utterances the fake STT hears as ``texts``, once its session began;
    what it read so far."""
    h.stt.texts = list(texts)  # type: ignore[union-attr]
    call = h.stub.Converse()
    await call.write(voice_start(mode=pb.TURN_DETECTION_MODE_MANUAL, min_speech_ms=100))
    seen: list[pb.ConverseResponse] = []
    await read_until(call, "session_started", seen)
    return call, seen


async def test_a_failed_transcription_ends_its_turn_failed_and_the_session_goes_on() -> None:
    h = await start_harness(stt=FakeSTT(fail=True, latency_s=0.05))
    try:
        call = h.stub.Converse()
        await call.write(voice_start(silence_ms=200, min_speech_ms=100))
        seen: list[pb.ConverseResponse] = []
        await read_until(call, "session_started", seen)
        await say(call, loud(300) + quiet(400))
        ended = await read_until(call, "turn_ended", seen)
        assert ended.turn_ended.reason == pb.TURN_END_REASON_FAILED and "STT" in ended.turn_ended.error
        # (Found in a QA pass: it was 0 ms, and the turn-length histogram took a 0 s turn.)
        timings = ended.turn_ended.timings
        assert timings.transcription_ms >= 40 and timings.total_ms >= timings.transcription_ms, timings
        await call.write(pb.ConverseRequest(user_text=pb.UserText(text="Still there?")))
        ended = await read_until(call, "turn_ended", seen)
        assert ended.turn_ended.reason == pb.TURN_END_REASON_COMPLETED
        call.cancel()
    finally:
        await stop_harness(h)


@pytest.mark.parametrize(
    ("requests", "words"),
    [
        ([start(), pb.ConverseRequest(user_audio=pb.UserAudio(data=b"\x00\x00"))], "start.input_audio"),
        ([start(), pb.ConverseRequest(commit_audio=pb.CommitAudio())], "start.input_audio"),
        ([voice_start(), pb.ConverseRequest(user_audio=pb.UserAudio(data=b"\x00" * (RATE * 2 + 2)))], "one second"),
        ([start(input_audio=pb.InputAudio(sample_rate_hz=4000))], "sample_rate_hz"),
        ([voice_start(silence_ms=10)], "silence_ms"),
        ([voice_start(threshold=2.0)], "threshold"),
        ([start(input_audio=pb.InputAudio(sample_rate_hz=RATE, encoding=pb.AUDIO_ENCODING_WAV))], "PCM16"),
        # (Taken, then every utterance failed, counted as the engine's error: a QA pass.)
        ([start(input_audio=pb.InputAudio(sample_rate_hz=RATE, language="en-US"))], "language: the fake STT"),
    ],
    ids=[
        "audio without input_audio",
        "commit without",
        "chunk over a second",
        "rate",
        "silence",
        "threshold",
        "wav",
        "a language the engine does not know",
    ],
)
async def test_bad_voice_input_is_invalid_argument(
    voiced: Harness, requests: list[pb.ConverseRequest], words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in voiced.stub.Converse(iter(requests)):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (caught.value.details() or "")


async def test_a_server_without_stt_refuses_voice_input() -> None:
    h = await start_harness(FakeLLM())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in h.stub.Converse(iter([voice_start()])):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no voice input" in (
            caught.value.details() or ""
        )
    finally:
        await stop_harness(h)


@pytest.mark.parametrize("mode", ["commit", "speech in progress"])
async def test_what_was_said_before_a_half_close_is_answered(voiced: Harness, mode: str) -> None:
    """A client that commits (or just stops sending while speaking) and half-closes at once, as
    grpcurl does when its input ends, still gets the transcript and the reply."""
    detection = {"mode": pb.TURN_DETECTION_MODE_MANUAL} if mode == "commit" else {"silence_ms": 2000}
    requests = [voice_start(min_speech_ms=100, **detection), *audio(quiet(200) + loud(600))]
    if mode == "commit":
        requests.append(pb.ConverseRequest(commit_audio=pb.CommitAudio()))
    responses = [r async for r in voiced.stub.Converse(iter(requests))]
    order = [k for k in kinds(responses) if k in ("speech_stopped", "transcript", "turn_ended")]
    assert order == ["speech_stopped", "transcript", "turn_ended"]
    ended = responses[-1].turn_ended
    assert ended.reason == pb.TURN_END_REASON_COMPLETED and voiced.llm.requests


async def test_a_detector_that_dies_fails_a_turn_once_and_the_stream_goes_on() -> None:
    """Found by attacking it: the ears' task ended on a detector error, then the session waited for
    ever to queue the next chunk."""
    from service.errors import VADError
    from tests.fakes import FakeDetector, FakeFrames

    class BrokenFrames(FakeFrames):
        async def feed(self, pcm: bytes) -> list[float]:
            raise VADError("fake VAD failure: the model broke")

    class BrokenDetector(FakeDetector):
        def stream(self) -> FakeFrames:
            return BrokenFrames(self)

    h = await start_harness(stt=FakeSTT(), detector=BrokenDetector())
    try:
        call = h.stub.Converse()
        await call.write(voice_start())
        seen: list[pb.ConverseResponse] = []
        await read_until(call, "session_started", seen)
        for request in audio(loud(3000), chunk_ms=50):  # 60 chunks: far more than the ears queue
            await asyncio.wait_for(call.write(request), 5)
        ended = await read_until(call, "turn_ended", seen)
        assert ended.turn_ended.reason == pb.TURN_END_REASON_FAILED and "VAD" in ended.turn_ended.error
        await call.write(pb.ConverseRequest(user_text=pb.UserText(text="Still there?")))
        ended = await read_until(call, "turn_ended", seen)
        assert ended.turn_ended.reason == pb.TURN_END_REASON_COMPLETED
        assert kinds(seen).count("turn_ended") == 2  # the failure is said once, not per chunk
        call.cancel()
    finally:
        await stop_harness(h)


async def say(call: grpc.aio.StreamStreamCall, pcm: bytes, chunk_ms: int = 100) -> None:
    """Send ``pcm`` as ``user_audio`` in chunks of ``chunk_ms`` (faster than real time)."""
    for request in audio(pcm, chunk_ms):
        await call.write(request)


async def open_voice(h: Harness, **detection: object) -> tuple[grpc.aio.StreamStreamCall, Reader]:
    """A voice stream with ``detection``, read in the background, once its session has started."""
    call = h.stub.Converse()
    await call.write(voice_start(**detection))
    reader = Reader(call)
    await reader.until("session_started")
    return call, reader


class Reader:
    """Reads a stream in the background, keeping every response."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.seen: list[pb.ConverseResponse] = []
        self._task = asyncio.create_task(self._read(call))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        while (response := await call.read()) is not grpc.aio.EOF:
            self.seen.append(response)

    def kinds(self) -> list[str]:
        return kinds(self.seen)

    async def until(self, kind: str, count: int = 1) -> None:
        await wait_for(lambda: self.kinds().count(kind) >= count, 10)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_reply_prepared_during_a_pause_leaves_only_when_the_silence_confirms_the_end(
    voiced: Harness,
) -> None:
    call, reader = await open_voice(voiced, silence_ms=800, tentative_silence_ms=150, min_speech_ms=100)
    await say(call, loud(600) + quiet(300))
    await wait_for(lambda: voiced.llm.completed == 1)  # the whole reply was made while the user paused
    await asyncio.sleep(0.1)
    assert reader.kinds() == ["session_started", "speech_started"]  # none of it left
    await say(call, quiet(600))
    await reader.until("turn_ended")
    order = [k for k in reader.kinds() if k != "text_delta"]
    assert order[:5] == ["session_started", "speech_started", "speech_stopped", "transcript", "segment"]
    ended = next(r.turn_ended for r in reader.seen if r.WhichOneof("kind") == "turn_ended")
    assert ended.turn_id == "turn-1" and ended.reason == pb.TURN_END_REASON_COMPLETED
    assert ended.spoken_text == voiced.llm.reply
    assert ended.timings.speech_end_to_first_audio_ms > 0
    assert len(voiced.stt.heard) == 1 and len(voiced.llm.requests) == 1  # type: ignore[union-attr]
    await reader.stop()
    call.cancel()


async def test_speech_after_a_pause_discards_the_prepared_reply_without_a_trace(voiced: Harness) -> None:
    voiced.stt.texts = ["What is", "What is the weather like in Paris?"]  # type: ignore[union-attr]
    voiced.llm.token_s = 0.02
    call, reader = await open_voice(voiced, silence_ms=800, tentative_silence_ms=150, min_speech_ms=100)
    await say(call, loud(500) + quiet(300))
    await wait_for(lambda: len(voiced.llm.requests) == 1)  # a reply to "What is" is being prepared
    await say(call, loud(500) + quiet(1000))  # ... but the user goes on
    await reader.until("turn_ended")
    assert voiced.llm.cancelled >= 1 or voiced.llm.completed == 1
    transcripts = [r.transcript for r in reader.seen if r.WhichOneof("kind") == "transcript"]
    assert [t.text for t in transcripts] == ["What is the weather like in Paris?"]
    assert transcripts[0].turn_id == "turn-1"  # the discarded turn's id is free again
    ended = next(r.turn_ended for r in reader.seen if r.WhichOneof("kind") == "turn_ended")
    assert ended.turn_id == "turn-1" and ended.reason == pb.TURN_END_REASON_COMPLETED
    assert reader.kinds().count("speech_started") == 1 and reader.kinds().count("speech_stopped") == 1
    assert len({r.audio.turn_id for r in reader.seen if r.WhichOneof("kind") == "audio"}) == 1
    # The history has the one exchange.
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text="And tomorrow?")))
    await reader.until("turn_ended", 2)
    contents = [m.content for m in voiced.llm.requests[-1].messages if m.role == "user"]
    assert contents == ["What is the weather like in Paris?", "And tomorrow?"]
    await reader.stop()
    call.cancel()


async def test_text_sent_during_a_pause_discards_the_prepared_reply(voiced: Harness) -> None:
    voiced.llm.token_s = 0.02
    call, reader = await open_voice(voiced, silence_ms=2000, tentative_silence_ms=150, min_speech_ms=100)
    await say(call, loud(500) + quiet(300))
    await wait_for(lambda: len(voiced.llm.requests) == 1)
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text="Never mind, tell me a joke.")))
    await reader.until("turn_ended")
    ends = [r.turn_ended for r in reader.seen if r.WhichOneof("kind") == "turn_ended"]
    assert [(e.turn_id, e.reason) for e in ends] == [("turn-1", pb.TURN_END_REASON_COMPLETED)]
    assert "transcript" not in reader.kinds()
    assert voiced.llm.requests[-1].messages[-1].content == "Never mind, tell me a joke."
    await reader.stop()
    call.cancel()


async def test_a_half_close_during_a_pause_answers_the_utterance_once(voiced: Harness) -> None:
    call, reader = await open_voice(voiced, silence_ms=2000, tentative_silence_ms=150, min_speech_ms=100)
    await say(call, loud(500) + quiet(300))
    await wait_for(lambda: len(voiced.llm.requests) == 1)
    await call.done_writing()
    await asyncio.wait_for(reader._task, 10)
    ends = [r.turn_ended for r in reader.seen if r.WhichOneof("kind") == "turn_ended"]
    assert [(e.turn_id, e.reason) for e in ends] == [("turn-1", pb.TURN_END_REASON_COMPLETED)]
    assert reader.kinds().count("transcript") == 1


async def test_a_stream_left_silent_during_a_pause_still_closes_as_idle() -> None:
    """A tentative turn only more audio can confirm must not hold the idle timer (found in review:
    the stream stayed open for ever)."""
    from service.core.outbox import OutboxLimits
    from service.core.settings import SessionDefaults

    h = await start_harness(
        stt=FakeSTT(), defaults=SessionDefaults(outbox=OutboxLimits(max_message_ms=100), idle_timeout_s=1.0)
    )
    try:
        call, reader = await open_voice(h, silence_ms=2000, tentative_silence_ms=150, min_speech_ms=100)
        await say(call, loud(600) + quiet(300))
        await wait_for(lambda: h.llm.completed == 1)  # the reply is ready, held; then nothing more comes
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(reader._task, 5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reader.kinds() == ["session_started", "speech_started"]
    finally:
        await stop_harness(h)


async def test_a_client_turn_id_like_the_hidden_tentative_ones_is_accepted(voiced: Harness) -> None:
    """The client never saw the tentative turn's id: "turn-1" is free for it (found in review: the
    stream ended INVALID_ARGUMENT, the id "already used")."""
    voiced.llm.token_s = 0.02
    call, reader = await open_voice(voiced, silence_ms=2000, tentative_silence_ms=150, min_speech_ms=100)
    await say(call, loud(500) + quiet(300))
    await wait_for(lambda: len(voiced.llm.requests) == 1)
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text="Tell me a joke", turn_id="turn-1")))
    await reader.until("turn_ended")
    ends = [r.turn_ended for r in reader.seen if r.WhichOneof("kind") == "turn_ended"]
    assert [(e.turn_id, e.reason) for e in ends] == [("turn-1", pb.TURN_END_REASON_COMPLETED)]
    await reader.stop()
    call.cancel()


@pytest.mark.parametrize("tentative_ms", [0, 150])
async def test_end_of_speech_to_first_audio_counts_from_when_the_speech_ended(tentative_ms: int) -> None:
    """The moment the end of speech arrived is taken when the utterance ends, not when its (slow)
    transcription is posted (found in review: a later chunk's arrival was used, under-reporting)."""
    h = await start_harness(stt=FakeSTT(latency_s=1.0))
    try:
        call, reader = await open_voice(h, silence_ms=300, tentative_silence_ms=tentative_ms, min_speech_ms=100)
        await say(call, loud(600) + quiet(400))
        await reader.until("speech_stopped")
        await say(call, quiet(6000), chunk_ms=10)  # the microphone goes on while Whisper works
        await reader.until("turn_ended")
        ended = next(r.turn_ended for r in reader.seen if r.WhichOneof("kind") == "turn_ended")
        assert ended.timings.transcription_ms >= 1000
        assert ended.timings.speech_end_to_first_audio_ms >= ended.timings.transcription_ms
        await reader.stop()
        call.cancel()
    finally:
        await stop_harness(h)


async def test_an_interrupt_naming_a_reply_a_transcript_replaced_leaves_the_new_turn_alone() -> None:
    # Found in QA on the page: the user typed while speaking; the typed reply was playing when the
    # transcript opened the spoken question's turn, and the page's interrupt of the typed reply (with
    # what it played) stopped the new turn instead, which ended before it said a word.
    llm = FakeLLM(reply="One. Two. Three. Four. Five. Six. Seven. Eight. " * 2, token_s=0.05)  # (0.8 s: still running)
    h = await start_harness(llm, stt=FakeSTT(texts=["Spoken question?"]))
    try:
        call = h.stub.Converse()
        await call.write(voice_start(mode=pb.TURN_DETECTION_MODE_MANUAL, min_speech_ms=100))
        seen: list[pb.ConverseResponse] = []
        await read_until(call, "session_started", seen)
        await call.write(user("Typed question?", turn_id="typed"))
        await read_until(call, "audio", seen)  # the typed reply plays
        await say(call, loud(400))
        await call.write(pb.ConverseRequest(commit_audio=pb.CommitAudio(turn_id="spoken")))
        await read_until(call, "transcript", seen)  # the spoken question's turn has begun
        await call.write(pb.ConverseRequest(interrupt=pb.Interrupt(played_ms=0, turn_id="typed")))
        while (ended := (await read_until(call, "turn_ended", seen)).turn_ended).turn_id != "spoken":
            assert ended.turn_id == "typed" and ended.reason == pb.TURN_END_REASON_INTERRUPTED
        assert ended.reason == pb.TURN_END_REASON_COMPLETED, ended
        # The typed reply's history is cut at what the client played (nothing), not at what was sent.
        await call.write(user("And now?"))
        await read_until(call, "turn_ended", seen)
        typed_reply = llm.requests[-1].messages[2]
        assert typed_reply.role == "assistant" and typed_reply.content == "" and typed_reply.interrupted
        # An interrupt naming a turn that is neither in progress nor the last one stops nothing.
        await call.write(user("Once more?", turn_id="last"))
        await read_until(call, "audio", seen)
        await call.write(pb.ConverseRequest(interrupt=pb.Interrupt(turn_id="typed")))
        ended = (await read_until(call, "turn_ended", seen)).turn_ended
        assert (ended.turn_id, ended.reason) == ("last", pb.TURN_END_REASON_COMPLETED)
        call.cancel()
    finally:
        await stop_harness(h)


async def test_a_commit_cannot_reuse_the_turn_id_of_one_before_it() -> None:
    # Found in QA: two commits naming "x" made two turns "x" (a client could not tell them apart),
    # because a commit's id was taken only when its transcript came.
    h = await start_harness(stt=FakeSTT(latency_s=0.5))
    try:
        call = h.stub.Converse()
        await call.write(voice_start(mode=pb.TURN_DETECTION_MODE_MANUAL, min_speech_ms=100))
        seen: list[pb.ConverseResponse] = []
        await read_until(call, "session_started", seen)
        for _ in range(2):
            await say(call, loud(300))
            await call.write(pb.ConverseRequest(commit_audio=pb.CommitAudio(turn_id="x")))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "commit_audio.turn_id 'x' was already used" in (refused.value.details() or "")
    finally:
        await stop_harness(h)


@pytest.mark.parametrize("unanswered", [False, True])
async def test_a_half_close_during_a_shutdown_hears_out_what_was_said(unanswered: bool) -> None:
    """The user speaks, types a question while still speaking, and the server begins shutting down
    while its reply plays; then the client half-closes. With nothing left unanswered by the shutdown,
    it goes as without one: the speech is transcribed and answered (its turn stops the typed reply),
    and the stream ends with OK; with a message already left unanswered, the speech is counted with
    it, the typed reply finishes, and the stream says where to resume."""
    h = await start_harness(FakeLLM(reply=FakeLLM.reply * 2, token_s=0.05), stt=FakeSTT(texts=["Spoken?"]))
    try:
        call = h.stub.Converse()
        await call.write(voice_start(silence_ms=3000, min_speech_ms=100))
        seen: list[pb.ConverseResponse] = []
        await read_until(call, "session_started", seen)
        await say(call, loud(600))  # speech in progress: its end is not heard yet
        await read_until(call, "speech_started", seen)
        await call.write(user("Typed?"))
        await read_until(call, "audio", seen)  # the typed question's reply plays (about 1.5 s)
        h.running.servicer.shut_down()
        await asyncio.sleep(0.05)  # (the stream's shutdown watch has told its session)
        if unanswered:
            await call.write(user("And this?"))
        await call.done_writing()
        ended = None
        try:
            while (response := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
                seen.append(response)
        except grpc.aio.AioRpcError as error:
            ended = error
        ends = [(r.turn_ended.reason, r.turn_ended.error) for r in seen if r.WhichOneof("kind") == "turn_ended"]
        if unanswered:
            assert ends == [(pb.TURN_END_REASON_COMPLETED, "")]
            assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE
            assert "2 message(s) sent after the shutdown began were not answered" in (ended.details() or "")
        else:
            assert ended is None, ended
            assert ends == [(pb.TURN_END_REASON_INTERRUPTED, ""), (pb.TURN_END_REASON_COMPLETED, "")]
            assert [m.content for m in h.llm.requests[-1].messages if m.role == "user"] == ["Typed?", "Spoken?"]
    finally:
        await stop_harness(h)
