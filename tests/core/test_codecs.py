"""The stream encoders: each encoding decoded back by PyAV (FFmpeg) to audio of the expected length,
rate and content; bytes leave as audio is fed, not at the end; G.711 input decodes."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from service.core.audio import AudioFormat, Encoding
from service.core.codecs import CodecOptions, G711Decoder, check_codecs, output_rate, stream_encoder


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * hz * t) * 8000).astype("<i2")


def encode_in_pieces(audio: AudioFormat, pcm: np.ndarray, piece_ms: int = 100) -> tuple[list[bytes], bytes]:
    encoder = stream_encoder(audio, CodecOptions())
    step = audio.sample_rate_hz * piece_ms // 1000
    pieces = [encoder.encode(pcm[i : i + step].tobytes()) for i in range(0, len(pcm), step)]
    return pieces, encoder.finish()


def decode(data: bytes, container: str | None) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data), format=container) as stream:
        frames = [frame for frame in stream.decode(audio=0)]
        rate = stream.streams.audio[0].rate
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    if samples.dtype.kind == "f":
        samples = samples * 32768
    return samples.astype(np.float64), rate


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def test_the_installed_pyav_has_every_codec() -> None:
    check_codecs()


@pytest.mark.parametrize(
    ("encoding", "rate", "container", "decoded_rate", "lead_ms"),
    [
        (Encoding.OGG_OPUS, 24000, "ogg", 48000, 10),  # Opus decodes at 48 kHz; its pre-skip is removed
        (Encoding.OGG_OPUS, 16000, "ogg", 48000, 10),
        (Encoding.MP3, 22050, "mp3", 22050, 80),  # MP3 decoders play LAME's priming first (~50 ms)
        (Encoding.MP3, 8000, "mp3", 8000, 300),
        (Encoding.MULAW, 8000, "mulaw", 8000, 0),
        (Encoding.ALAW, 8000, "alaw", 8000, 0),
        (Encoding.WAV, 22050, "wav", 22050, 0),
    ],
)
def test_a_turn_of_pieces_decodes_to_the_audio_fed(
    encoding: Encoding, rate: int, container: str, decoded_rate: int, lead_ms: int
) -> None:
    pcm = tone(rate, 1.5)
    pieces, tail = encode_in_pieces(AudioFormat(encoding, rate, 24000 if encoding is Encoding.OGG_OPUS else 0), pcm)
    data = b"".join(pieces) + tail
    if encoding in (Encoding.MULAW, Encoding.ALAW):
        assert len(data) == len(pcm)  # one byte per sample, no header
        codec = av.CodecContext.create("pcm_mulaw" if encoding is Encoding.MULAW else "pcm_alaw", "r")
        codec.sample_rate, codec.layout = rate, "mono"  # type: ignore[attr-defined]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in codec.decode(av.Packet(data))]).astype(float)
        got_rate = rate
    else:
        samples, got_rate = decode(data, container)
    assert got_rate == decoded_rate
    seconds = len(samples) / got_rate
    assert 1.5 <= seconds <= 1.5 + (lead_ms + 80) / 1000  # the whole of it, plus a codec's frame and priming
    body = samples[int(0.2 * got_rate) : int(1.3 * got_rate)]
    assert dominant_hz(body, got_rate) == pytest.approx(440, abs=5)
    assert np.sqrt(np.mean(body**2)) == pytest.approx(8000 / np.sqrt(2), rel=0.15)


@pytest.mark.parametrize("encoding", [Encoding.OGG_OPUS, Encoding.MP3, Encoding.MULAW])
def test_bytes_leave_as_audio_is_fed_not_at_the_end(encoding: Encoding) -> None:
    rate = output_rate(encoding, 0, 22050)
    pieces, tail = encode_in_pieces(AudioFormat(encoding, rate), tone(rate, 2.0), piece_ms=200)
    assert all(pieces[1:])  # every 200 ms piece after the first carries its audio
    assert pieces[0] or encoding is Encoding.MP3  # Opus and G.711 from the first piece on
    assert sum(map(len, pieces)) > 4 * len(tail)  # little is left for the end


def test_each_turn_is_a_fresh_stream() -> None:
    audio = AudioFormat(Encoding.OGG_OPUS, 24000)
    first, second = (b"".join(p) + t for p, t in (encode_in_pieces(audio, tone(24000, 0.5)) for _ in range(2)))
    assert first[:4] == second[:4] == b"OggS"
    assert decode(second, "ogg")[0].size > 0


@pytest.mark.parametrize(
    ("encoding", "wanted", "native", "rate"),
    [
        (Encoding.OGG_OPUS, 0, 22050, 24000),
        (Encoding.OGG_OPUS, 44100, 22050, 48000),
        (Encoding.OGG_OPUS, 8000, 22050, 8000),
        (Encoding.MP3, 0, 22050, 22050),
        (Encoding.MP3, 30000, 22050, 32000),
        (Encoding.MULAW, 0, 22050, 8000),
        (Encoding.ALAW, 16000, 22050, 16000),
        (Encoding.PCM16, 0, 22050, 22050),
    ],
)
def test_the_rate_a_codec_takes(encoding: Encoding, wanted: int, native: int, rate: int) -> None:
    assert output_rate(encoding, wanted, native) == rate


@pytest.mark.parametrize("encoding", [Encoding.MULAW, Encoding.ALAW])
def test_g711_input_decodes_to_pcm16(encoding: Encoding) -> None:
    pcm = tone(8000, 0.5)
    data = b"".join(encode_in_pieces(AudioFormat(encoding, 8000), pcm)[0])
    decoder = G711Decoder(encoding, 8000)
    out = np.frombuffer(b"".join(decoder.decode(data[i : i + 160]) for i in range(0, len(data), 160)), "<i2")
    assert len(out) == len(pcm)
    assert np.max(np.abs(out.astype(int) - pcm.astype(int))) < 300  # G.711's quantization


def test_a_pyav_without_a_codec_is_named_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(av, "codecs_available", {"pcm_mulaw", "pcm_alaw", "libmp3lame"})
    with pytest.raises(RuntimeError, match="has no libopus encoder; install PyAV's wheel from PyPI"):
        check_codecs()
