"""Sockets whose clients must read what they are sent.

websockets waits in ``send`` while a client does not read, and its keepalive ping waits behind the
same writes: a client that stopped reading held its socket (and the service stream behind it) for
ever. Answers to pings go out without waiting: a client that sent pings and never read grew the
bridge's memory without bound. :class:`ReadingConnection` cuts both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection

__all__ = ["MAX_UNREAD_BYTES", "ReadingConnection"]

log = logging.getLogger(__name__)

MAX_UNREAD_BYTES = 1 << 20
"""What may wait for a client to read before its socket is cut: far above what the bridge's own
writes leave waiting (websockets' write limit, 32 KiB, plus one message: a second of 48 kHz audio is
96 KB), reached only by the answers to pings a client sends and never reads."""


class ReadingConnection(ServerConnection):
    """A socket whose client must read what it is sent. Cut (the transport aborted: a close frame
    would never be read, so the client sees 1006) when writes have waited ``stall_s`` (from the
    transport's pause: over websockets' write limit, 32 KiB) without the client reading enough to
    resume them (down to the low-water mark, 8 KiB), or when what waits for it passes
    :data:`MAX_UNREAD_BYTES`."""

    def __init__(self, *args: Any, stall_s: float, on_cut: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stall_s = stall_s
        self._on_cut = on_cut
        self._stall: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall = self.loop.call_later(self._stall_s, self._cut, f"it read nothing for {self._stall_s:g} s")

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            self._cut(f"over {MAX_UNREAD_BYTES >> 20} MiB it did not read waited for it")

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        super().connection_lost(exc)

    def _unwatch(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _cut(self, why: str) -> None:
        self._unwatch()
        if self.transport.is_closing():
            return
        log.warning("cut a socket whose client does not read: %s", why)
        self._on_cut(why)
        self.transport.abort()
