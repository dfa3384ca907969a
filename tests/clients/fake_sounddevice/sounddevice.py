"""A stand-in for the ``sounddevice`` package (PortAudio) for the CLI's tests, where no sound device
exists: the "microphone" plays the WAV named by ``FAKE_MIC_WAV`` in real time, in the blocks the
caller asked for, from its own thread as PortAudio does, then silence; ``FAKE_MIC_CTRL_C_AFTER_S``
seconds after it started, the process gets SIGINT, as if the user pressed Ctrl-C. The "speaker"
takes audio at the rate it would play it (a write blocks for the audio's duration)."""

from __future__ import annotations

import os
import signal
import threading
import time
import wave
from typing import Any


def query_devices(kind: str | None = None) -> dict[str, Any]:
    return {"name": f"fake {kind or 'device'}"}


class RawInputStream:
    def __init__(self, samplerate: int, channels: int, dtype: str, blocksize: int, callback: Any) -> None:
        assert channels == 1 and dtype == "int16"
        with wave.open(os.environ["FAKE_MIC_WAV"], "rb") as wav:
            assert wav.getframerate() == samplerate and wav.getnchannels() == 1
            self._pcm = wav.readframes(wav.getnframes())
        self._rate, self._block, self._callback = samplerate, blocksize, callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        began = time.monotonic()
        ctrl_c_at = began + float(os.environ.get("FAKE_MIC_CTRL_C_AFTER_S", "1e9"))
        size = self._block * 2
        index = 0
        while not self._stop.is_set():
            block = self._pcm[index * size : (index + 1) * size].ljust(size, b"\x00")
            self._callback(block, self._block, None, None)
            index += 1
            now = time.monotonic()
            if now >= ctrl_c_at:
                os.kill(os.getpid(), signal.SIGINT)
                ctrl_c_at = float("inf")
            time.sleep(max(0.0, began + index * self._block / self._rate - now))


class RawOutputStream:
    latency = 0.0

    def __init__(self, samplerate: int, channels: int, dtype: str) -> None:
        self._rate = samplerate

    def start(self) -> None:
        pass

    def write(self, pcm: bytes) -> None:
        time.sleep(len(pcm) / 2 / self._rate)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass
