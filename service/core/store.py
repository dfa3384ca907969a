"""Where sessions live between streams: the interface the session uses, and the stored values.

A store keeps each session's settings and history under its id, expires it after an idle time, and
knows which stream owns it: :meth:`SessionStore.claim` makes the caller the owner and tells the
previous owner (on any replica) that it lost the session; :meth:`SessionStore.save` writes only while
the caller still owns it, so two streams never interleave turns in one history.
Implementations live in ``service.stores``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.core.aio import first_of
from service.core.history import Entry

__all__ = ["DEFAULT_SESSION_TTL_S", "HANDOVER_TIMEOUT_S", "Claim", "SessionStore", "StoredSession", "hand_over"]

DEFAULT_SESSION_TTL_S = 3600.0
"""How long a session is kept with no stream, unless configured otherwise."""


@dataclass
class StoredSession:
    """What a session keeps between streams."""

    session_id: str
    system_prompt: str
    voice: str
    temperature: float | None = None
    max_tokens: int | None = None
    entries: list[Entry] = field(default_factory=list)
    turns_started: int = 0
    """Turns begun so far, so that server-assigned turn ids go on where the last stream left off."""
    principal: str = ""
    """Who created it (``key:<name>``; empty when the server checks no credentials): only they may
    resume it."""

    def to_json(self) -> dict[str, Any]:
        """What ``dataclasses.asdict`` gives, built directly: written at every turn's end, and asdict's
        deep copy of each entry cost more than the JSON encoding."""
        return {
            "session_id": self.session_id,
            "system_prompt": self.system_prompt,
            "voice": self.voice,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "entries": [{"role": e.role, "content": e.content, "interrupted": e.interrupted} for e in self.entries],
            "turns_started": self.turns_started,
            "principal": self.principal,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> StoredSession:
        entries = [Entry(e["role"], e["content"], bool(e.get("interrupted", False))) for e in data.get("entries", [])]
        return StoredSession(
            session_id=data["session_id"],
            system_prompt=data["system_prompt"],
            voice=data["voice"],
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            entries=entries,
            turns_started=int(data.get("turns_started", 0)),
            principal=str(data.get("principal", "")),
        )


HANDOVER_TIMEOUT_S = 3.0
"""How long a stream resuming a session waits for the stream that holds it on this replica to let go."""


@dataclass
class Claim:
    """A stream's ownership of a session. ``lost`` is set when another stream takes it over, or when
    the store no longer has the session (``vanished``: it expired, or the store restarted empty).
    ``wanted`` is set when another stream on this replica asks for the session: the holder should
    end, writing what it has, and let go (``released``), which the other waits for (bounded)."""

    session_id: str
    token: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    vanished: bool = False
    wanted: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def lose(self, *, vanished: bool = False) -> None:
        """The stream no longer owns the session (the first reason given stays)."""
        if not self.lost.is_set():
            self.vanished = vanished
            self.lost.set()


async def hand_over(previous: Claim, timeout_s: float = HANDOVER_TIMEOUT_S) -> None:
    """Ask the stream that holds ``previous`` to end and let go, and wait until it has (at most
    ``timeout_s``), so that a stream resuming the session finds what the previous one was still
    writing: a reply it was cutting short when its client reconnected. Safe to cancel."""
    if previous.released.is_set() or previous.lost.is_set():
        return
    previous.wanted.set()
    await first_of(previous.released, previous.lost, timeout_s=timeout_s)


class SessionStore(Protocol):
    """Keeps sessions. Every method is safe to cancel and raises
    :class:`service.errors.StoreUnavailable` when the store cannot be reached."""

    async def create(self, session: StoredSession) -> Claim:
        """Store a new session and claim it. A store with a bounded size raises
        :class:`service.errors.Overloaded` when it cannot take another session."""
        ...

    async def resume(self, session_id: str, principal: str = "") -> tuple[StoredSession, Claim] | None:
        """Load a session and claim it (taking it over from any stream that holds it); None if it
        does not exist, has expired, or belongs to another principal than ``principal`` (then
        nothing happens to it: a leaked session id alone takes no conversation over)."""
        ...

    async def save(self, session: StoredSession, claim: Claim) -> bool:
        """Write the session (and renew its expiry) if ``claim`` still owns it; False if it does not."""
        ...

    async def release(self, claim: Claim) -> None:
        """The stream is done with the session (it stays stored until it expires)."""
        ...

    async def check(self) -> None:
        """Return once the store answers (at once for one in this process); raise
        :class:`service.errors.StoreUnavailable` when it does not. For readiness: a replica whose
        store is out of reach can start no stream."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections."""
        ...

    def counts(self) -> tuple[int, int | None]:
        """Sessions held by this process's streams, and sessions kept in this process (held or idle;
        None when they are kept elsewhere, as in Redis). Cheap: the metrics read it at each scrape,
        from another thread."""
        ...
