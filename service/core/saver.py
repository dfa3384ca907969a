"""The history saver: writes a session's snapshots to its store in the background, the latest wins.

The session hands it a snapshot whenever the conversation or its settings change
(:meth:`HistorySaver.submit`) and goes on at once; one task writes, never two writes at a time, and a
snapshot that is replaced before its turn to be written is skipped (the newer one holds everything it
held). :meth:`HistorySaver.saved` waits until a snapshot is written, for the turn ends that must be
stored before the client hears of them. A store that cannot be reached is logged and retried with the
next snapshot (and once more when the saver closes). A write the store refuses (the session was
taken over, or the store lost it) marks the claim lost, which ends the stream.
"""

from __future__ import annotations

import asyncio
import logging

from service.core.aio import stopped
from service.core.store import Claim, SessionStore, StoredSession
from service.errors import StoreUnavailable

__all__ = ["HistorySaver"]

log = logging.getLogger(__name__)


class HistorySaver:
    """Writes one session's snapshots. Create, :meth:`start`, then :meth:`aclose` once."""

    def __init__(self, store: SessionStore, claim: Claim) -> None:
        self._store = store
        self._claim = claim
        self._latest: StoredSession | None = None  # the newest snapshot not known to be in the store
        self._version = 0  # ... its version
        self._wanted = False  # a write of it is due (not after a failed one: that waits for the next)
        self._written = 0  # the newest version whose write finished...
        self._written_ok = True  # ... and whether it reached the store
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"history saver {self._claim.session_id[:8]}")

    def submit(self, snapshot: StoredSession) -> int:
        """Queue ``snapshot`` for writing (replacing one not yet written); returns its version."""
        self._version += 1
        self._latest, self._wanted = snapshot, True
        self._changed.set()
        return self._version

    @property
    def unsaved(self) -> bool:
        """A snapshot is not (yet) in the store."""
        return self._latest is not None

    async def saved(self, version: int) -> bool:
        """Wait until snapshot ``version`` (or a newer one) has been written: True if it reached the
        store. Safe to cancel."""
        while self._written < version and not self._stopped:
            self._changed.clear()
            await self._changed.wait()
        return self._written >= version and self._written_ok

    async def aclose(self) -> None:
        """Write what is not yet stored (if the stream still owns the session), then stop. Safe to call
        twice; safe to cancel (the write in progress is abandoned)."""
        if self._task is not None:
            await stopped(self._task)  # (a write in flight can lose a cancellation on Python 3.11)
            self._task = None
        if not self._stopped and self._latest is not None and not self._claim.lost.is_set():
            await self._write()
        self._stopped = True
        self._changed.set()

    async def _run(self) -> None:
        while not self._stopped:
            while not self._wanted:
                self._changed.clear()
                await self._changed.wait()
            self._wanted = False
            await self._write()

    async def _write(self) -> None:
        assert self._latest is not None
        version, snapshot = self._version, self._latest
        try:
            ok = await self._store.save(snapshot, self._claim)  # (refused: the claim is lost, the stream ends)
        except StoreUnavailable as error:
            log.error("session %s: the history was not saved: %s", self._claim.session_id[:8], error)
            ok = False
        if ok and self._version == version:
            self._latest = None
        self._written, self._written_ok = version, ok
        self._changed.set()
