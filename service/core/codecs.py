"""Audio codecs for the stream: one encoder per turn, fed the turn's PCM16 as it is synthesized.

A turn's audio leaves as one stream of its encoding, begun fresh for the turn, so that the audio
bytes of a turn concatenated form a valid file of that format: PCM16 (raw), WAV (a streaming header
first), Ogg/Opus, MP3, G.711 μ-law and A-law. Every codec is PyAV's (FFmpeg's libopus, libmp3lame,
pcm_mulaw, pcm_alaw, bundled in its wheels): nothing here encodes by hand. :func:`check_codecs` says
at start-up whether the installed PyAV has them.

Streamed: what an encoder returns for a piece of PCM is what it could finish with it. Ogg pages are
flushed for every packet (the muxer's default holds a second); Opus holds back less than one 20 ms
frame, MP3 about two frames (LAME's look-ahead), until the next piece or :meth:`StreamEncoder.finish`.

The stream's timeline is the PCM's: the service counts the samples it fed, never the codec's
output, so ``start_ms``, ``played_ms`` and the history's cut are in audio time whatever a codec adds.
Ogg/Opus states its encoder delay (pre-skip) and decoders remove it; an MP3 stream has no header
for it, so MP3 decoders play LAME's priming first (about 50 ms; see the README).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol, cast

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext

from service.core.audio import AudioFormat, Encoding, wav_stream_header

__all__ = [
    "OPUS_RATES",
    "MP3_RATES",
    "CodecOptions",
    "G711Decoder",
    "StreamEncoder",
    "check_codecs",
    "output_rate",
    "stream_encoder",
]

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
"""The input rates libopus takes."""
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""The rates MP3 has."""
G711_DEFAULT_RATE_HZ = 8000
_CODECS = {
    Encoding.OGG_OPUS: "libopus",
    Encoding.MP3: "libmp3lame",
    Encoding.MULAW: "pcm_mulaw",
    Encoding.ALAW: "pcm_alaw",
}
OPUS_APPLICATIONS = ("voip", "audio", "lowdelay")


@dataclass(frozen=True)
class CodecOptions:
    """The server's codec settings (a session may choose its own bitrate)."""

    opus_bitrate_bps: int = 24_000
    """Opus carries speech well from 16 to 32 kbit/s."""
    opus_application: str = "voip"
    """libopus's tuning: ``voip`` (speech intelligibility), ``audio`` or ``lowdelay``."""
    mp3_bitrate_bps: int = 32_000

    def __post_init__(self) -> None:
        if not 6_000 <= self.opus_bitrate_bps <= 256_000:
            raise ValueError("the Opus bitrate must be 6000 to 256000 bit/s")
        if self.opus_application not in OPUS_APPLICATIONS:
            raise ValueError(f"the Opus application must be one of {', '.join(OPUS_APPLICATIONS)}")
        if not 8_000 <= self.mp3_bitrate_bps <= 320_000:
            raise ValueError("the MP3 bitrate must be 8000 to 320000 bit/s")


def check_codecs() -> None:
    """Raise RuntimeError naming what is missing when the installed PyAV cannot encode every
    encoding the service offers (a PyAV built without libopus or libmp3lame)."""
    missing = [name for name in _CODECS.values() if name not in av.codecs_available]
    if missing:
        raise RuntimeError(
            f"the installed PyAV (av {av.__version__}) has no {', '.join(missing)} encoder; install PyAV's "
            "wheel from PyPI (it bundles them), or a PyAV built against an FFmpeg that has them"
        )


def output_rate(encoding: Encoding, wanted_hz: int, native_hz: int) -> int:
    """The rate a session's audio is sent at: what it asked for (``wanted_hz``, 0 for the voice's own
    ``native_hz``; G.711 defaults to 8000), raised to the next rate the codec has."""
    if encoding in (Encoding.MULAW, Encoding.ALAW):
        return wanted_hz or G711_DEFAULT_RATE_HZ
    rate = wanted_hz or native_hz
    rates = OPUS_RATES if encoding is Encoding.OGG_OPUS else MP3_RATES if encoding is Encoding.MP3 else None
    if rates is None:
        return rate
    return next((r for r in rates if r >= rate), rates[-1])


class StreamEncoder(Protocol):
    """One turn's audio stream."""

    offload: bool
    """Costly enough (2 to 3 ms a piece) to run off the event loop."""

    def encode(self, pcm: bytes) -> bytes:
        """The stream's bytes for this PCM16 (possibly none yet: a codec may hold part of a frame)."""
        ...

    def finish(self) -> bytes:
        """The stream's last bytes (what the codec held, and a container's end)."""
        ...


def stream_encoder(audio: AudioFormat, options: CodecOptions) -> StreamEncoder:
    """A fresh encoder for one turn in the session's format."""
    if audio.encoding is Encoding.PCM16:
        return _Raw()
    if audio.encoding is Encoding.WAV:
        return _Wav(audio.sample_rate_hz)
    if audio.encoding in (Encoding.MULAW, Encoding.ALAW):
        return _Codec(_CODECS[audio.encoding], audio.sample_rate_hz, 0, {})
    if audio.encoding is Encoding.MP3:
        return _Codec("libmp3lame", audio.sample_rate_hz, audio.bitrate_bps or options.mp3_bitrate_bps, {})
    return _OggOpus(audio.sample_rate_hz, audio.bitrate_bps or options.opus_bitrate_bps, options.opus_application)


class _Raw:
    offload = False

    def encode(self, pcm: bytes) -> bytes:
        return pcm

    def finish(self) -> bytes:
        return b""


class _Wav:
    offload = False

    def __init__(self, rate: int) -> None:
        self._header: bytes | None = wav_stream_header(rate)

    def encode(self, pcm: bytes) -> bytes:
        header, self._header = self._header, None
        return pcm if header is None else header + pcm

    def finish(self) -> bytes:
        return b""


def _frame(pcm: bytes, rate: int, pts: int, planar: bool) -> av.AudioFrame:
    samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16p" if planar else "s16", layout="mono")
    frame.sample_rate = rate
    frame.pts = pts
    return frame


class _Codec:
    """A codec whose packets, one after the other, are the stream (MP3 frames, G.711 bytes)."""

    def __init__(self, codec: str, rate: int, bitrate: int, options: dict[str, str]) -> None:
        self._context = cast(AudioCodecContext, av.CodecContext.create(codec, "w"))
        self._context.sample_rate = rate
        self._context.layout = "mono"
        self._planar = codec == "libmp3lame"  # LAME takes planar samples, G.711 interleaved
        self.offload = self._planar  # MP3 costs; G.711 is a table lookup
        self._context.format = "s16p" if self._planar else "s16"
        if bitrate:
            self._context.bit_rate = bitrate
        self._context.options = options
        self._context.open()
        self._rate = rate
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        if not pcm:
            return b""
        frame = _frame(pcm, self._rate, self._pts, self._planar)
        self._pts += len(pcm) // 2
        return b"".join(bytes(packet) for packet in self._context.encode(frame))

    def finish(self) -> bytes:
        return b"".join(bytes(packet) for packet in self._context.encode(None))


class _Sink(io.RawIOBase):
    """Where the Ogg muxer writes; what it wrote is taken after each call."""

    def __init__(self) -> None:
        self._written = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._written += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._written)
        self._written.clear()
        return data


class _OggOpus:
    offload = True

    def __init__(self, rate: int, bitrate: int, application: str) -> None:
        self._sink = _Sink()
        # A page per packet (20 ms), not the muxer's default of a second.
        self._container = av.open(self._sink, "w", format="ogg", options={"page_duration": "20000"})
        self._stream = self._container.add_stream("libopus", rate=rate, options={"application": application})
        self._stream.bit_rate = bitrate
        self._stream.layout = "mono"
        self._rate = rate
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        if pcm:
            frame = _frame(pcm, self._rate, self._pts, planar=False)
            self._pts += len(pcm) // 2
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


class G711Decoder:
    """μ-law or A-law bytes (a caller's voice) to PCM16, with PyAV's decoder."""

    def __init__(self, encoding: Encoding, rate: int) -> None:
        self._context = cast(AudioCodecContext, av.CodecContext.create(_CODECS[encoding], "r"))
        self._context.sample_rate = rate
        self._context.layout = "mono"

    def decode(self, data: bytes) -> bytes:
        if not data:
            return b""
        frames = self._context.decode(av.Packet(data))
        return b"".join(frame.to_ndarray().astype("<i2", copy=False).tobytes() for frame in frames)
