"""Translation between the protobuf contract and the core: requests to commands, messages to protos."""

from __future__ import annotations

import pytest

from parley.v1 import voice_pb2 as pb
from service.convert import command_from_proto, message_to_proto
from service.core.audio import AudioFormat, Encoding
from service.core.command import BadMessage, Interrupt, SpeakText, Start, UserText
from service.core.engine import LLMUsage
from service.core.events import (
    AudioChunk,
    SegmentStarted,
    SessionStarted,
    TextDelta,
    TurnEnded,
    TurnEndReason,
    TurnTimings,
)
from service.core.settings import StartRequest


@pytest.mark.parametrize(
    ("request_", "command"),
    [
        (
            pb.ConverseRequest(
                start=pb.Start(
                    session_id="s",
                    system_prompt="p",
                    voice="v",
                    audio=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_WAV, sample_rate_hz=8000),
                    llm=pb.LlmOptions(temperature=0.5, max_tokens=9),
                )
            ),
            Start(StartRequest("s", "p", "v", Encoding.WAV, 8000, 0.5, 9)),
        ),
        (pb.ConverseRequest(start=pb.Start()), Start(StartRequest())),
        (pb.ConverseRequest(start=pb.Start(captions=pb.CAPTION_MODE_DELTAS)), Start(StartRequest())),
        (
            pb.ConverseRequest(start=pb.Start(captions=pb.CAPTION_MODE_SEGMENTS)),
            Start(StartRequest(text_deltas=False)),
        ),
        (pb.ConverseRequest(user_text=pb.UserText(text="Hi", turn_id="a")), UserText("Hi", "a")),
        (pb.ConverseRequest(speak_text=pb.SpeakText(text="Hi", flush=True)), SpeakText("Hi", True, "")),
        (pb.ConverseRequest(interrupt=pb.Interrupt()), Interrupt(None)),
        (pb.ConverseRequest(interrupt=pb.Interrupt(played_ms=0)), Interrupt(0)),
    ],
)
def test_requests_become_commands(request_: pb.ConverseRequest, command: object) -> None:
    assert command_from_proto(request_) == command


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ConverseRequest(), "sets none of start, user_text, speak_text, interrupt"),
        (pb.ConverseRequest(interrupt=pb.Interrupt(played_ms=-5)), "played_ms is -5"),
        (pb.ConverseRequest(start=pb.Start(audio=pb.AudioFormat(encoding=77))), "unknown audio encoding 77"),
        (pb.ConverseRequest(start=pb.Start(captions=9)), "unknown start.captions 9"),
    ],
)
def test_requests_that_cannot_be_commands_become_bad_messages(request_: pb.ConverseRequest, message: str) -> None:
    command = command_from_proto(request_)
    assert isinstance(command, BadMessage) and message in str(command.error)


def test_a_float_is_the_decimal_the_client_wrote() -> None:
    # turn_detection.threshold 0.99 (the top of its documented range) arrived as 0.9900000095, a
    # float32, and was refused as over 0.99 (an attack pass).
    start = pb.Start(
        llm=pb.LlmOptions(temperature=0.7),
        input_audio=pb.InputAudio(sample_rate_hz=16000, turn_detection=pb.TurnDetection(threshold=0.99)),
    )
    command = command_from_proto(pb.ConverseRequest(start=start))
    assert isinstance(command, Start)
    assert command.request.temperature == 0.7
    assert command.request.input_audio is not None and command.request.input_audio.threshold == 0.99


def test_messages_become_protos() -> None:
    started = message_to_proto(SessionStarted("s", AudioFormat(Encoding.WAV, 24000), "v", "l", "t"))
    assert started.session_started.audio.encoding == pb.AUDIO_ENCODING_WAV
    assert started.session_started.audio.sample_rate_hz == 24000
    assert message_to_proto(TextDelta("t1", "Hi")).text_delta.text == "Hi"
    segment = message_to_proto(SegmentStarted("t1", 2, "Dr. X", "Doctor X", 1500)).segment
    assert (segment.index, segment.text, segment.spoken_text, segment.start_ms) == (2, "Dr. X", "Doctor X", 1500)
    audio = message_to_proto(AudioChunk("t1", 1, 7, b"\x01\x02", 0.0625)).audio
    assert (audio.turn_id, audio.segment_index, audio.sequence, audio.data) == ("t1", 1, 7, b"\x01\x02")
    assert audio.duration_ms == 0.0625


def test_messages_filled_in_place_are_sent_even_when_every_field_is_empty() -> None:
    # (Filled field by field, not built from a sub-message: the kind must be set all the same.)
    assert message_to_proto(TextDelta("", "")).WhichOneof("kind") == "text_delta"
    assert message_to_proto(AudioChunk("", 0, 0, b"", 0.0)).WhichOneof("kind") == "audio"
    assert message_to_proto(SegmentStarted("", 0, "", "", 0)).WhichOneof("kind") == "segment"
    wire = message_to_proto(AudioChunk("t1", 1, 7, b"\x01\x02", 20.0)).SerializeToString()
    expected = pb.ConverseResponse(
        audio=pb.AudioChunk(turn_id="t1", segment_index=1, sequence=7, data=b"\x01\x02", duration_ms=20.0)
    )
    assert wire == expected.SerializeToString()
    ended = message_to_proto(
        TurnEnded(
            "t1",
            TurnEndReason.INTERRUPTED,
            "Hel",
            TurnTimings(1, 2, 3, 4, 5),
            LLMUsage(10, 20),
            error="",
            history_unsaved=True,
        )
    ).turn_ended
    assert ended.reason == pb.TURN_END_REASON_INTERRUPTED and ended.spoken_text == "Hel"
    assert (ended.timings.first_llm_token_ms, ended.timings.total_ms, ended.timings.audio_duration_ms) == (1, 4, 5)
    assert (ended.usage.prompt_tokens, ended.usage.completion_tokens) == (10, 20)
    assert ended.history_unsaved
    no_usage = message_to_proto(TurnEnded("t1", TurnEndReason.COMPLETED, "", TurnTimings(0, 0, 0, 0, 0)))
    assert not no_usage.turn_ended.HasField("usage")
