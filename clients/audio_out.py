"""Where the CLI's audio goes: a sound device when there is one, WAV files otherwise.

Live playback uses the optional ``sounddevice`` package (``pip install '.[audio]'``, which needs
PortAudio). Without it, or without an output device, each turn is written to a WAV file.
"""

from __future__ import annotations

import queue
import threading
import time
import wave
from pathlib import Path
from typing import Any

__all__ = ["LivePlayer", "write_wav"]


def write_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    """Write mono PCM16 (or a streamed WAV, whose header is replaced) as a WAV file."""
    if pcm[:4] == b"RIFF":
        pcm = pcm[44:]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm)


class LivePlayer:
    """Plays PCM16 mono as it arrives, on a worker thread; can stop at once and say how much
    of the current turn was heard."""

    def __init__(self, stream: Any, sample_rate: int) -> None:
        self._stream = stream
        self._rate = sample_rate
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._written_frames = 0
        self._turn_started = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="parley-audio", daemon=True)
        self._thread.start()

    @staticmethod
    def open(sample_rate: int) -> LivePlayer | None:
        """A player on the default output device, or None when there is no device or no sounddevice."""
        try:
            import sounddevice

            sounddevice.query_devices(kind="output")
            stream = sounddevice.RawOutputStream(samplerate=sample_rate, channels=1, dtype="int16")
            stream.start()
        except Exception:  # no package, no PortAudio, or no device: fall back to WAV files
            return None
        return LivePlayer(stream, sample_rate)

    def new_turn(self) -> None:
        with self._lock:
            self._written_frames = 0
            self._turn_started = time.monotonic()

    def play(self, pcm: bytes) -> None:
        self._chunks.put(pcm)

    def played_ms(self) -> int:
        """How much of the current turn's audio has come out of the speaker, roughly."""
        with self._lock:
            written_ms = self._written_frames * 1000 / self._rate
        latency_ms = float(getattr(self._stream, "latency", 0.0)) * 1000
        elapsed_ms = (time.monotonic() - self._turn_started) * 1000
        return max(0, round(min(written_ms - latency_ms, elapsed_ms)))

    def playing(self) -> bool:
        """Whether audio of the current turn is still to come out of the speaker."""
        with self._lock:
            written_ms = self._written_frames * 1000 / self._rate
        elapsed_ms = (time.monotonic() - self._turn_started) * 1000
        return not self._chunks.empty() or elapsed_ms < written_ms

    def stop_now(self) -> None:
        """Drop everything queued or buffered, so playback stops at once."""
        while True:
            try:
                self._chunks.get_nowait()
            except queue.Empty:
                break
        self._stream.abort()
        self._stream.start()

    def close(self) -> None:
        self._chunks.put(None)
        self._thread.join(timeout=2)
        self._stream.close()

    def _run(self) -> None:
        while (pcm := self._chunks.get()) is not None:
            if pcm[:4] == b"RIFF":
                pcm = pcm[44:]
            try:
                self._stream.write(pcm)
            except Exception:  # the stream was aborted under us: drop this chunk
                continue
            with self._lock:
                self._written_frames += len(pcm) // 2
