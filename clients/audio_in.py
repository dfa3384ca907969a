"""The CLI's microphone: the default input device through the optional ``sounddevice`` package
(``pip install '.[audio]'``, which needs PortAudio: Debian's ``libportaudio2``).

PortAudio calls back on its own thread with each block; the block is handed to the event loop, where
it waits in a bounded queue (:data:`MAX_QUEUED_BLOCKS`, one second): if the program falls behind, the
oldest audio is dropped and counted, never an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["BLOCK_MS", "MAX_QUEUED_BLOCKS", "MicError", "Microphone"]

BLOCK_MS = 20
"""Audio per block (and per ``user_audio`` message)."""
MAX_QUEUED_BLOCKS = 50


class MicError(Exception):
    """No microphone: the message says why and what to do."""


class Microphone:
    """Mono PCM16 blocks from the default input device. Use ``async with``, then :meth:`blocks`."""

    def __init__(self, sample_rate: int = 16000) -> None:
        self.sample_rate = sample_rate
        self.dropped_blocks = 0
        """Blocks dropped because the program fell behind."""
        self._blocks: collections.deque[bytes] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._stream: Any = None

    async def __aenter__(self) -> Microphone:
        self._stream = self._open()
        self._stream.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop capturing; :meth:`blocks` ends after what is queued."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.stop()
            stream.close()
        self._closed = True
        self._ready.set()

    async def blocks(self) -> AsyncIterator[bytes]:
        """Each block as it is captured, until :meth:`close`."""
        while True:
            while self._blocks:
                yield self._blocks.popleft()
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()

    @staticmethod
    def check() -> None:
        """Raise :class:`MicError` when there is no microphone to open."""
        Microphone._device()

    @staticmethod
    def _device() -> Any:
        """The sounddevice module, with an input device. Raises :class:`MicError`."""
        try:
            import sounddevice
        except ImportError as error:
            raise MicError(
                "--mic needs the sounddevice package: pip install '.[audio]' (and PortAudio: apt-get install "
                f"libportaudio2) ({error})"
            ) from error
        except OSError as error:  # the package is there, PortAudio is not
            raise MicError(f"--mic needs PortAudio: apt-get install libportaudio2 ({error})") from error
        try:
            sounddevice.query_devices(kind="input")
        except Exception as error:  # PortAudio's errors
            raise MicError(f"no microphone: {error}") from error
        return sounddevice

    def _open(self) -> Any:
        sounddevice = self._device()
        try:
            return sounddevice.RawInputStream(
                samplerate=self.sample_rate,
                channels=1,
                dtype="int16",
                blocksize=self.sample_rate * BLOCK_MS // 1000,
                callback=self._captured,
            )
        except Exception as error:  # PortAudio's errors: a rate it cannot do, a busy device
            raise MicError(f"cannot open the microphone: {error}") from error

    def _captured(self, data: Any, frames: int, time: Any, status: Any) -> None:
        """PortAudio's thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue, bytes(data))
        except RuntimeError:  # the loop has closed: the program is ending
            pass

    def _queue(self, block: bytes) -> None:
        if self._closed:
            return
        if len(self._blocks) >= MAX_QUEUED_BLOCKS:
            self._blocks.popleft()
            self.dropped_blocks += 1
        self._blocks.append(block)
        self._ready.set()
