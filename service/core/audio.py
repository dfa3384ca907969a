"""Output audio: resampling to the client's rate, chunking, and the WAV stream header.

Engines produce mono PCM16 at their native rate; clients ask for PCM16 or WAV at a rate of their
choice. :class:`SegmentEncoder` turns one segment's engine audio into client-ready pieces of bounded
duration, resampling with soxr (streaming, so chunks leave as soon as they arrive).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
import soxr

__all__ = [
    "MAX_SAMPLE_RATE_HZ",
    "MIN_SAMPLE_RATE_HZ",
    "AudioFormat",
    "Encoding",
    "LeadingSilence",
    "SegmentEncoder",
    "wav_stream_header",
]

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
_STREAMING_SIZE = 0xFFFFFFFF


class Encoding(enum.Enum):
    """How audio bytes are packaged."""

    PCM16 = "pcm16"
    WAV = "wav"
    OGG_OPUS = "ogg_opus"
    MP3 = "mp3"
    MULAW = "mulaw"
    ALAW = "alaw"


@dataclass(frozen=True)
class AudioFormat:
    """The audio a session sends: mono, made from 16-bit samples at ``sample_rate_hz`` (the timeline's
    rate, whatever the encoding)."""

    encoding: Encoding
    sample_rate_hz: int
    bitrate_bps: int = 0
    """OGG_OPUS and MP3: the codec's bitrate (0: the server's default)."""

    def duration_ms(self, samples: int) -> float:
        """The duration of ``samples`` samples, in milliseconds."""
        return samples * 1000.0 / self.sample_rate_hz


def wav_stream_header(sample_rate_hz: int) -> bytes:
    """A 44-byte RIFF/WAVE header for mono PCM16 of unknown length (sizes set to 0xFFFFFFFF)."""
    byte_rate = sample_rate_hz * 2
    return (
        b"RIFF"
        + struct.pack("<I", _STREAMING_SIZE)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate_hz, byte_rate, 2, 16)
        + b"data"
        + struct.pack("<I", _STREAMING_SIZE)
    )


class LeadingSilence:
    """Drops the silence a TTS engine puts before the speech (Piper: 30 to 70 ms), keeping
    ``lead_in_ms`` of it, so the first sample a listener gets is close to the first audible one.
    Feed the engine's PCM16 in order; what comes back is what to keep."""

    THRESHOLD = 328
    """Audible: a sample above 1% of full scale (-40 dBFS)."""

    def __init__(self, sample_rate_hz: int, lead_in_ms: int = 10) -> None:
        self._lead_in = sample_rate_hz * lead_in_ms // 1000
        self._held = np.zeros(0, dtype="<i2")  # the last lead_in samples of the silence so far
        self._odd_byte = b""
        self.done = False
        """Speech was found: from now on everything is kept."""

    def feed(self, pcm: bytes) -> bytes:
        if self.done:
            return pcm
        pcm = self._odd_byte + pcm
        whole = len(pcm) - len(pcm) % 2
        self._odd_byte = pcm[whole:]
        samples = np.frombuffer(pcm[:whole], dtype="<i2")
        loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > self.THRESHOLD)
        if loud.size == 0:
            self._held = np.concatenate((self._held, samples))[-self._lead_in :] if self._lead_in else self._held
            return b""
        self.done = True
        first = int(loud[0])
        start = max(0, first - self._lead_in)
        missing = self._lead_in - first  # lead-in samples to take from the silence held back
        before = self._held[max(0, len(self._held) - missing) :] if missing > 0 else self._held[:0]
        kept = before.tobytes() + samples[start:].tobytes() + self._odd_byte
        self._odd_byte = b""
        return kept


class SegmentEncoder:
    """Resamples one segment's audio to ``out_rate`` and cuts it into pieces of at most
    ``chunk_ms``. Feed engine audio with :meth:`feed`, then call :meth:`finish` once."""

    def __init__(self, in_rate: int, out_rate: int, chunk_ms: int) -> None:
        self._resampler = (
            None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")
        )
        self._in_rate = in_rate
        self._chunk_samples = max(1, out_rate * chunk_ms // 1000)
        self._odd_byte = b""

    @property
    def in_rate(self) -> int:
        """The sample rate this encoder expects."""
        return self._in_rate

    def feed(self, pcm: bytes) -> list[bytes]:
        """Take engine PCM16; return output pieces (PCM16 bytes) ready to send (possibly none)."""
        if self._odd_byte:
            pcm = self._odd_byte + pcm
        whole = len(pcm) - len(pcm) % 2
        self._odd_byte = pcm[whole:]
        if self._resampler is None:  # the common case stays in bytes: no copies, no numpy
            return self._split(pcm[:whole] if whole != len(pcm) else pcm)
        samples = self._resampler.resample_chunk(np.frombuffer(pcm[:whole], dtype="<i2"), last=False)
        return self._split(samples.astype("<i2").tobytes())

    def finish(self) -> list[bytes]:
        """Release what the resampler still holds. Call once, after the last :meth:`feed`."""
        if self._resampler is None:
            return []
        tail = self._resampler.resample_chunk(np.zeros(0, dtype="<i2"), last=True)
        return self._split(tail.astype("<i2").tobytes())

    def _split(self, pcm: bytes) -> list[bytes]:
        size = self._chunk_samples * 2
        if len(pcm) <= size:
            return [pcm] if pcm else []
        return [pcm[i : i + size] for i in range(0, len(pcm), size)]
