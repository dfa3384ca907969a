"""The history saver on its own: latest wins, writes never overlap, failures are told."""

from __future__ import annotations

import asyncio

from service.core.history import Entry
from service.core.saver import HistorySaver
from service.core.store import Claim, StoredSession
from service.errors import StoreUnavailable


class RecordingStore:
    """A store that records what it was asked to write, slowly, and fails when told to."""

    def __init__(self, save_s: float = 0.0) -> None:
        self.save_s = save_s
        self.written: list[int] = []
        self.failing = False
        self.busy = 0
        self.most_busy = 0

    async def save(self, session: StoredSession, claim: Claim) -> bool:
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            await asyncio.sleep(self.save_s)
            if self.failing:
                raise StoreUnavailable("the store is down")
            self.written.append(session.turns_started)
            return True
        finally:
            self.busy -= 1


def snapshot(version: int) -> StoredSession:
    return StoredSession("s", "p", "v", entries=[Entry("user", str(version))], turns_started=version)


async def test_the_latest_snapshot_wins_and_writes_never_overlap() -> None:
    store = RecordingStore(save_s=0.05)
    saver = HistorySaver(store, Claim("s", "t"))  # type: ignore[arg-type]
    saver.start()
    versions = [saver.submit(snapshot(n)) for n in range(1, 6)]
    await asyncio.sleep(0.01)
    last = saver.submit(snapshot(6))
    assert await saver.saved(last)
    # The first write began at once; the ones replaced while it ran were skipped.
    assert store.written == [5, 6] and store.most_busy == 1
    assert versions == [1, 2, 3, 4, 5] and not saver.unsaved
    await saver.aclose()


async def test_a_failed_write_is_told_and_retried_with_the_next_snapshot_or_at_close() -> None:
    store = RecordingStore()
    saver = HistorySaver(store, Claim("s", "t"))  # type: ignore[arg-type]
    saver.start()
    store.failing = True
    assert not await saver.saved(saver.submit(snapshot(1)))
    assert saver.unsaved and store.written == []
    store.failing = False
    await saver.aclose()  # what is not stored is written once more
    assert store.written == [1] and not saver.unsaved


async def test_nothing_is_written_for_a_session_the_stream_lost() -> None:
    store = RecordingStore()
    claim = Claim("s", "t")
    saver = HistorySaver(store, claim)  # type: ignore[arg-type]
    store.failing = True
    saver.start()
    await saver.saved(saver.submit(snapshot(1)))
    claim.lose()
    store.failing = False
    await saver.aclose()
    assert store.written == []


async def test_closing_ends_a_write_whose_cancellation_was_lost() -> None:
    # Python 3.11's asyncio.wait_for (inside redis-py) can lose the cancellation of a write that is
    # completing: the saver then waited for the next snapshot, and the stream's end for ever.
    written = asyncio.get_running_loop().create_future()
    writing = asyncio.Event()

    class CompletingStore:
        async def save(self, session: StoredSession, claim: Claim) -> bool:
            writing.set()
            return bool(await asyncio.wait_for(written, 5))

    saver = HistorySaver(CompletingStore(), Claim("s", "t"))  # type: ignore[arg-type]
    saver.start()
    saver.submit(snapshot(1))
    await writing.wait()
    written.set_result(True)
    async with asyncio.timeout(5):
        await saver.aclose()
    assert not saver.unsaved
