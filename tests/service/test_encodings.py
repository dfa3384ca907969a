"""Every output encoding through the real gRPC server (fake engines): what session_started states,
a turn's audio bytes forming one file of the format, the timeline in audio time, bad settings; and
voice input in μ-law and A-law."""

from __future__ import annotations

import io

import av
import grpc
import numpy as np
import pytest

from parley.v1 import voice_pb2 as pb
from service.core.audio import AudioFormat, Encoding
from service.core.codecs import CodecOptions, stream_encoder
from tests.conftest import Harness, start, start_harness, stop_harness, user
from tests.fakes import FakeSTT, loud, quiet

CONTAINERS = {
    pb.AUDIO_ENCODING_OGG_OPUS: "ogg",
    pb.AUDIO_ENCODING_MP3: "mp3",
    pb.AUDIO_ENCODING_MULAW: "mulaw",
    pb.AUDIO_ENCODING_ALAW: "alaw",
}


async def one_turn(h: Harness, audio: pb.AudioFormat) -> list[pb.ConverseResponse]:
    call = h.stub.Converse()
    await call.write(start(audio=audio))
    await call.write(user("Hi?"))
    await call.done_writing()
    return [r async for r in call]


def decoded_seconds(data: bytes, encoding: int, rate: int) -> float:
    container = CONTAINERS[encoding]
    if container in ("mulaw", "alaw"):
        codec = av.CodecContext.create("pcm_mulaw" if container == "mulaw" else "pcm_alaw", "r")
        codec.sample_rate, codec.layout = rate, "mono"  # type: ignore[attr-defined]
        frames = list(codec.decode(av.Packet(data)))
        return sum(f.samples for f in frames) / rate
    with av.open(io.BytesIO(data), format=container) as stream:
        frames = list(stream.decode(audio=0))
        return sum(f.samples for f in frames) / stream.streams.audio[0].rate


@pytest.mark.parametrize(
    ("encoding", "asked_rate", "rate", "bitrate"),
    [
        (pb.AUDIO_ENCODING_OGG_OPUS, 0, 16000, 24000),  # the fake voice is 16 kHz, which Opus takes
        (pb.AUDIO_ENCODING_OGG_OPUS, 22050, 24000, 24000),
        (pb.AUDIO_ENCODING_MP3, 0, 16000, 32000),
        (pb.AUDIO_ENCODING_MULAW, 0, 8000, 0),
        (pb.AUDIO_ENCODING_ALAW, 0, 8000, 0),
    ],
)
async def test_a_turn_in_each_encoding_is_one_file_of_it(
    harness: Harness, encoding: int, asked_rate: int, rate: int, bitrate: int
) -> None:
    responses = await one_turn(harness, pb.AudioFormat(encoding=encoding, sample_rate_hz=asked_rate))
    started = responses[0].session_started.audio
    assert (started.encoding, started.sample_rate_hz, started.bitrate_bps) == (encoding, rate, bitrate)
    audio = [r.audio for r in responses if r.WhichOneof("kind") == "audio"]
    ended = responses[-1].turn_ended
    spoken_s = sum(harness.tts.duration_ms(t) for t in harness.tts.texts) / 1000
    # The timeline is the audio's, whatever the codec adds.
    assert ended.timings.audio_duration_ms == pytest.approx(spoken_s * 1000, abs=2)
    assert sum(a.duration_ms for a in audio) == pytest.approx(spoken_s * 1000, abs=2)
    starts = [r.segment.start_ms for r in responses if r.WhichOneof("kind") == "segment"]
    assert starts[0] == 0 and starts[1] == pytest.approx(harness.tts.duration_ms(harness.tts.texts[0]), abs=1)
    seconds = decoded_seconds(b"".join(a.data for a in audio), encoding, rate)
    assert spoken_s <= seconds <= spoken_s + 0.15


async def test_a_chosen_bitrate_is_used_and_a_bad_one_refused(harness: Harness) -> None:
    responses = await one_turn(harness, pb.AudioFormat(encoding=pb.AUDIO_ENCODING_MP3, bitrate_bps=64000))
    assert responses[0].session_started.audio.bitrate_bps == 64000
    audio = b"".join(r.audio.data for r in responses if r.WhichOneof("kind") == "audio")
    spoken_s = sum(harness.tts.duration_ms(t) for t in harness.tts.texts) / 1000
    assert len(audio) * 8 / spoken_s == pytest.approx(64000, rel=0.2)
    call = harness.stub.Converse()
    await call.write(start(audio=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_OGG_OPUS, bitrate_bps=1000)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bitrate_bps 1000 is out of range for OGG_OPUS; use 6000 to 256000" in (raised.value.details() or "")


@pytest.mark.parametrize("encoding", [Encoding.MULAW, Encoding.ALAW])
async def test_voice_input_in_g711(encoding: Encoding) -> None:
    h = await start_harness(stt=FakeSTT())
    try:
        call = h.stub.Converse()
        proto = pb.AUDIO_ENCODING_MULAW if encoding is Encoding.MULAW else pb.AUDIO_ENCODING_ALAW
        await call.write(start(input_audio=pb.InputAudio(encoding=proto, sample_rate_hz=8000)))
        # The caller's voice: the fake detector's "speech" (a loud tone) at 8 kHz, in G.711.
        encoder = stream_encoder(AudioFormat(encoding, 8000), CodecOptions())
        data = encoder.encode(quiet(300, 8000) + loud(800, 8000) + quiet(900, 8000))
        for i in range(0, len(data), 160):  # 20 ms of G.711 at 8 kHz
            await call.write(pb.ConverseRequest(user_audio=pb.UserAudio(data=data[i : i + 160])))
        await call.done_writing()
        responses = [r async for r in call]
        kinds = [r.WhichOneof("kind") for r in responses]
        assert "speech_started" in kinds and "transcript" in kinds and kinds[-1] == "turn_ended"
        heard = np.frombuffer(h.stt.heard[0], "<i2")  # type: ignore[union-attr]
        assert 0.9 * 16000 <= len(heard) <= 1.4 * 16000  # decoded and resampled to 16 kHz
        assert np.abs(heard).max() > 4000
    finally:
        await stop_harness(h)


async def test_g711_input_is_bounded_at_one_second_of_its_bytes() -> None:
    h = await start_harness(stt=FakeSTT())
    try:
        call = h.stub.Converse()
        await call.write(start(input_audio=pb.InputAudio(encoding=pb.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)))
        await call.write(pb.ConverseRequest(user_audio=pb.UserAudio(data=b"\xff" * 8000)))  # one second: fine
        await call.write(pb.ConverseRequest(user_audio=pb.UserAudio(data=b"\xff" * 8001)))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "8001 bytes, over one second" in (raised.value.details() or "")
    finally:
        await stop_harness(h)
