"""Requests whose bytes are not a valid message: INVALID_ARGUMENT with what to fix, one warning in the
log per call, and no traceback.

The bytes go out as they are, through a channel's low-level methods with an identity serializer.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from tests.conftest import Harness, converse_all, start, turn_ends, user

CONVERSE = "/parley.v1.VoiceService/Converse"
LIST_VOICES = "/parley.v1.VoiceService/ListVoices"

# user_text (field 2) holding text (field 1) of two bytes that are not UTF-8 (0xC3 must be followed by a
# continuation byte), hand-encoded: a protobuf library would refuse to make it.
BAD_UTF8_USER_TEXT = bytes([0x12, 0x04, 0x0A, 0x02, 0xC3, 0x28])
NOT_PROTOBUF = b"\xff\xff\xff\xff"  # field 0 is no field, and the varint never ends


async def converse_raw(harness: Harness, messages: list[bytes]) -> grpc.aio.AioRpcError:
    """Send ``messages`` as they are (the last one is the bad one), read until the stream ends, and
    return the error it ends with."""
    converse = harness.channel.stream_stream(
        CONVERSE, request_serializer=lambda data: data, response_deserializer=pb.ConverseResponse.FromString
    )
    call = converse()
    for message in messages:
        await call.write(message)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await call.read() is not grpc.aio.EOF:
            pass
    return caught.value


def check_log(caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """One warning that says ``reason``, and no traceback, in the server's log."""
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage(), caplog.text


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([NOT_PROTOBUF], "Wire format was corrupt"),
        ([start().SerializeToString(), NOT_PROTOBUF], "Wire format was corrupt"),
        ([start().SerializeToString(), BAD_UTF8_USER_TEXT], "bad UTF-8"),
    ],
    ids=["first", "after-start", "bad-utf8"],
)
async def test_a_malformed_converse_request_is_invalid_argument(
    harness: Harness, caplog: pytest.LogCaptureFixture, messages: list[bytes], reason: str
) -> None:
    caplog.set_level(logging.INFO)
    error = await converse_raw(harness, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid parley.v1.ConverseRequest" in error.details() and reason in error.details()
    check_log(caplog, reason)
    # The server keeps serving.
    assert turn_ends(await converse_all(harness.stub, [start(), user("Still there?")]))[0].reason == (
        pb.TURN_END_REASON_COMPLETED
    )


async def test_a_malformed_list_voices_request_is_invalid_argument(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    list_voices = harness.channel.unary_unary(
        LIST_VOICES, request_serializer=lambda data: data, response_deserializer=pb.ListVoicesResponse.FromString
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_voices(NOT_PROTOBUF)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid parley.v1.ListVoicesRequest" in caught.value.details()
    check_log(caplog, "Wire format was corrupt")
    assert (await list_voices(b"")).default_voice == "fake-voice"  # (an empty message is a valid one)


async def test_the_hand_encoded_bytes_are_what_they_claim() -> None:
    # The same bytes with valid UTF-8 parse: only the text's encoding is wrong.
    good = pb.ConverseRequest.FromString(BAD_UTF8_USER_TEXT[:-2] + "é".encode())
    assert good.user_text.text == "é"
    with pytest.raises(Exception, match="bad UTF-8"):
        pb.ConverseRequest.FromString(BAD_UTF8_USER_TEXT)
