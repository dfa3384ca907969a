"""The ``memory`` session store: sessions in this process, expiring after an idle time, at most
``max_sessions`` of them.

Fine for one replica; sessions do not survive a restart. Use ``redis`` for several replicas.

An idle session is kept as its JSON bytes (what :meth:`StoredSession.to_json` gives, compact,
zlib-compressed), not as live objects: a few hundred bytes, decoded again when a stream resumes it. Idle
sessions sit in least-recently-used order: a session is created, resumed and saved while a stream
holds it, so its last use is its release, which puts it at the recent end. The expired ones are thus
found at the old end, and when the store is full the least recently used idle session makes room for
a new one, taken first from the sessions without history (streams that took no turn: only their
settings are lost), so that a run of streams that only start cannot push out the conversations. A
session a stream holds is never evicted nor expired; when every stored session is held,
:meth:`MemoryStore.create` raises :class:`service.errors.Overloaded`.
"""

from __future__ import annotations

import json
import secrets
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable

from service.core.store import Claim, StoredSession, hand_over
from service.errors import Overloaded

__all__ = ["DEFAULT_MAX_SESSIONS", "MemoryStore"]

DEFAULT_MAX_SESSIONS = 10_000
"""Measured (``python -m benchmarks.memory_soak``): a typical stored session (the default system
prompt, ten turns of history) takes about 4.6 KB, so 10,000 take about 45 MiB; even if every one
had a 4,000-character system prompt and a full 20,000-character history (28.5 KB each) they would
take under 300 MiB, about the size of the embedded LLM. 10,000 also covers an hour (the default
TTL) of a new session every 0.36 s: with the default 100 streams busy all the time, sessions would
be evicted before their TTL only if the streams lasted under 36 s each, every one a new session."""


class _Record:
    """A session a stream holds: its encoded bytes and the stream's claim (a held session does not
    expire). An idle session is only bytes: its expiry, then its encoded form (:func:`_idle`)."""

    __slots__ = ("data", "empty", "owner")

    def __init__(self, data: bytes, *, empty: bool) -> None:
        self.data = data
        self.empty = empty
        """No history: evicted before the sessions that have some."""
        self.owner: Claim | None = None


_EXPIRY = struct.Struct("<d")


def _idle(data: bytes, expires: float) -> bytes:
    """An idle session as one bytes object (one object per idle session keeps the heap compact)."""
    return _EXPIRY.pack(expires) + data


class MemoryStore:
    """Sessions in this process. Safe for one event loop.

    ``clock`` gives the time in seconds (monotonic); tests pass a fake one.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
        self._ttl_s = ttl_s
        self._max_sessions = max_sessions
        self._clock = clock
        # Idle sessions (expiry + encoded form), least recently used first, those without history
        # apart (evicted first); held sessions apart (never evicted or expired).
        self._idle: OrderedDict[str, bytes] = OrderedDict()
        self._idle_empty: OrderedDict[str, bytes] = OrderedDict()
        self._held: dict[str, _Record] = {}

    async def create(self, session: StoredSession) -> Claim:
        """Store a new session and claim it. When the store is full, the least recently used idle
        session without history is forgotten, or if there is none the least recently used idle
        session; raises :class:`Overloaded` when every stored session is held."""
        now = self._clock()
        self._sweep(now)
        session_id = session.session_id
        self._idle.pop(session_id, None)
        self._idle_empty.pop(session_id, None)
        previous = self._held.pop(session_id, None)
        if previous is not None and previous.owner is not None:
            previous.owner.lose()
        if len(self._idle) + len(self._idle_empty) + len(self._held) >= self._max_sessions:
            if self._idle_empty:
                self._idle_empty.popitem(last=False)
            elif self._idle:
                self._idle.popitem(last=False)
            else:
                raise Overloaded(
                    f"the server holds its maximum number of sessions ({self._max_sessions}), all in use by "
                    "open streams; retry later"
                )
        record = _Record(_encode(session), empty=not session.entries)
        self._held[session_id] = record
        return self._claim(session_id, record)

    async def resume(self, session_id: str, principal: str = "") -> tuple[StoredSession, Claim] | None:
        held = self._held.get(session_id)
        idle_now = self._idle_entry(session_id)
        found = idle_now[_EXPIRY.size :] if idle_now is not None else held.data if held is not None else None
        if found is None or _decode(found).principal != principal:
            return None  # (not there, or not theirs: nothing happens to it)
        if held is not None and held.owner is not None:
            await hand_over(held.owner)  # (it writes what it has, then lets go)
        now = self._clock()
        self._sweep(now)
        idle = self._idle.pop(session_id, None) or self._idle_empty.pop(session_id, None)
        if idle is not None:
            stored = _decode(idle[_EXPIRY.size :])
            record = _Record(idle[_EXPIRY.size :], empty=not stored.entries)
        elif (kept := self._held.get(session_id)) is not None:
            stored, record = _decode(kept.data), kept
        else:
            return None
        self._held[session_id] = record
        return stored, self._claim(session_id, record)

    async def save(self, session: StoredSession, claim: Claim) -> bool:
        record = self._held.get(session.session_id)
        if record is None or record.owner is not claim:
            claim.lose(vanished=record is None)
            return False
        record.data = _encode(session)
        record.empty = not session.entries
        return True

    async def release(self, claim: Claim) -> None:
        """Let go; the session's idle time starts now."""
        record = self._held.get(claim.session_id)
        if record is not None and record.owner is claim:
            del self._held[claim.session_id]
            record.owner = None
            idle = self._idle_empty if record.empty else self._idle
            idle[claim.session_id] = _idle(record.data, self._clock() + self._ttl_s)  # most recent end
        claim.released.set()

    async def check(self) -> None:
        pass  # (in this process: always there)

    def counts(self) -> tuple[int, int | None]:
        held = len(self._held)
        return held, held + len(self._idle) + len(self._idle_empty)

    async def aclose(self) -> None:
        self._idle.clear()
        self._idle_empty.clear()
        self._held.clear()

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _claim(session_id: str, record: _Record) -> Claim:
        if record.owner is not None:
            record.owner.lose()
        record.owner = Claim(session_id, secrets.token_hex(8))
        return record.owner

    def _idle_entry(self, session_id: str) -> bytes | None:
        idle = self._idle.get(session_id)
        return idle if idle is not None else self._idle_empty.get(session_id)

    def _sweep(self, now: float) -> None:
        """Forget idle sessions past their expiry, from the least recently used end of each order: a
        session becomes idle (and most recently used) when it is released, its expiry then set to the
        same TTL ahead, so the expired ones are all at that end."""
        for idle_sessions in (self._idle, self._idle_empty):
            while idle_sessions:
                session_id, idle = next(iter(idle_sessions.items()))
                if _EXPIRY.unpack_from(idle)[0] > now:
                    break
                del idle_sessions[session_id]


def _encode(session: StoredSession) -> bytes:
    # UTF-8 rather than \u escapes: non-Latin text takes 2-4 bytes a character instead of 6-12.
    # surrogatepass: a lone surrogate in a string (never valid UTF-8 from gRPC, but a str may hold
    # one) round-trips instead of failing the write.
    # Compressed (zlib's fastest level, about 10 µs for a typical session): 30% smaller for a short
    # session, two to three times for a long history.
    text = json.dumps(session.to_json(), ensure_ascii=False, separators=(",", ":"))
    return zlib.compress(text.encode("utf-8", "surrogatepass"), 1)


def _decode(data: bytes) -> StoredSession:
    return StoredSession.from_json(json.loads(zlib.decompress(data).decode("utf-8", "surrogatepass")))
