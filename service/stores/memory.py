"""The ``memory`` session store: sessions in this process, expiring after an idle time.

Fine for one replica; sessions do not survive a restart. Use ``redis`` for several replicas.
"""

from __future__ import annotations

import copy
import secrets
import time
from dataclasses import dataclass

from service.core.store import Claim, StoredSession

__all__ = ["MemoryStore"]


@dataclass
class _Record:
    session: StoredSession
    expires: float
    owner: Claim | None = None


class MemoryStore:
    """Sessions in a dict. Safe for one event loop."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._records: dict[str, _Record] = {}

    async def create(self, session: StoredSession) -> Claim:
        self._sweep()
        record = _Record(copy.deepcopy(session), time.monotonic() + self._ttl_s)
        self._records[session.session_id] = record
        return self._claim(record)

    async def resume(self, session_id: str) -> tuple[StoredSession, Claim] | None:
        self._sweep()
        record = self._records.get(session_id)
        if record is None:
            return None
        record.expires = time.monotonic() + self._ttl_s
        return copy.deepcopy(record.session), self._claim(record)

    async def save(self, session: StoredSession, claim: Claim) -> bool:
        record = self._records.get(session.session_id)
        if record is None or record.owner is not claim:
            return False
        record.session = copy.deepcopy(session)
        record.expires = time.monotonic() + self._ttl_s
        return True

    async def release(self, claim: Claim) -> None:
        """Let go; the session's idle time starts now."""
        record = self._records.get(claim.session_id)
        if record is not None and record.owner is claim:
            record.owner = None
            record.expires = time.monotonic() + self._ttl_s

    async def aclose(self) -> None:
        self._records.clear()

    def _claim(self, record: _Record) -> Claim:
        if record.owner is not None:
            record.owner.lose()
        record.owner = Claim(record.session.session_id, secrets.token_hex(8))
        return record.owner

    def _sweep(self) -> None:
        """Forget sessions idle past their expiry; a session a stream holds is not idle."""
        now = time.monotonic()
        for session_id in [k for k, r in self._records.items() if r.expires <= now and r.owner is None]:
            del self._records[session_id]
