"""The ``redis`` session store: sessions shared by every replica (redis-py asyncio).

Keys, under a configurable prefix (``parley`` by default), all expiring with the session:

- ``{prefix}:session:{id}``: the session as JSON (settings and history), written when a turn ends;
- ``{prefix}:session:{id}:owner``: the token of the stream that owns the session.

Taking a session over sets the owner key and publishes the new token on
``{prefix}:takeover:{id}``; every replica listens (one pattern subscription each) and tells its
stream that lost the session. Writes check the owner in a Lua script, so a stream that lost its
session can no longer write to it.

Before it takes a session over, a stream asks its holder to let go, as :func:`hand_over` does on one
replica, so that it finds the reply the holder was giving: on the same channel, ``want:<token>`` (the
owner key's token) asks; the holder's replica answers ``held:<token>`` and, once its stream has ended
and written what it had, ``gone:<token>``. A holder that does not answer within
:data:`HELD_REPLY_S` (its replica died) is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from service.core.aio import first_of, stopped
from service.core.store import HANDOVER_TIMEOUT_S, Claim, StoredSession, hand_over
from service.errors import StoreUnavailable
from service.setting_errors import without_credentials

__all__ = ["MAX_CONNECTIONS", "TIMEOUT_S", "RedisStore"]

log = logging.getLogger(__name__)

# KEYS: session, owner. ARGV: token, json, ttl. Write only while the token owns the session: 0 when
# another token owns it, -1 when neither key exists (the session expired, or Redis lost its data).
_SAVE = """
local owner = redis.call('GET', KEYS[2])
if owner ~= ARGV[1] then
  if not owner and redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
# KEYS: session, owner, channel. ARGV: token, ttl. Read and claim in one step, and announce it.
_RESUME = """
local data = redis.call('GET', KEYS[1])
if not data then return false end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return data
"""
# KEYS: session, owner. ARGV: token, ttl. Let go: the owner key goes (if it is still this stream's),
# so that a later resume knows nobody holds the session; the session's idle time starts now.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: session, owner. ARGV: token, ttl. Keep a held session alive (0 and -1 as for _SAVE).
_RENEW = """
local owner = redis.call('GET', KEYS[2])
if owner ~= ARGV[1] then
  if not owner and redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


MAX_CONNECTIONS = 100
"""Connections to Redis one process opens at most (redis-py's default)."""
RECONNECTING_SAID_EVERY_S = 60.0
"""While Redis is unreachable, how often the takeover listener says it is still reconnecting (it
tries every second)."""
TIMEOUT_S = 5.0
"""How long an operation waits for Redis: to connect, for a reply, and for a free connection."""
HELD_REPLY_S = 0.5
"""How long a stream resuming a session held on another replica waits for that replica to answer
that it holds it (then up to HANDOVER_TIMEOUT_S for it to let go)."""


@dataclass
class _HandOver:
    """A resume waiting for another replica's stream to let go of the session."""

    token: str
    held: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)


class RedisStore:
    """Sessions in Redis. Create, then ``await start()``.

    Operations beyond ``max_connections`` at once (hundreds of turns ending together on one replica)
    wait for a free connection, up to the timeout, instead of failing: redis-py's default pool raises
    "Too many connections" there, and the history of every turn past the hundredth was not saved."""

    def __init__(
        self, url: str, *, prefix: str = "parley", ttl_s: float = 3600.0, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=TIMEOUT_S,
            decode_responses=True,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            # A pooled connection Redis closed while idle (a restart of Redis) fails once when next
            # used: each operation is tried once more on a new one (the scripts are idempotent).
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            # Made once: redis-py otherwise reads its own package metadata from disk for every new
            # connection (a millisecond or more, on the event loop), and the pool grows by up to
            # max_connections in a replica's first busy second.
            driver_info=DriverInfo(),
        )
        self._redis = redis.Redis.from_pool(pool)  # (closing the client closes the pool)
        self._url = url
        self._prefix = prefix
        self._ttl = max(1, round(ttl_s))
        self._claims: dict[str, Claim] = {}
        self._handovers: dict[str, list[_HandOver]] = {}
        self._asides: set[asyncio.Task[None]] = set()
        """What the listener started and goes on without waiting for (a slow Redis holds no notice)."""
        self._listener: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._save = self._redis.register_script(_SAVE)
        self._resume = self._redis.register_script(_RESUME)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    async def start(self) -> RedisStore:
        """Check the connection and start listening for takeovers. Raises StoreUnavailable."""
        try:
            await self._redis.ping()
            pubsub = self._redis.pubsub()  # (the subscription's confirmation says when it is back)
            await pubsub.psubscribe(f"{self._prefix}:takeover:*")
        except RedisError as error:
            await self._redis.aclose()
            raise self._unavailable(error) from error
        self._listener = asyncio.create_task(self._listen(pubsub), name="redis takeover listener")
        self._renewer = asyncio.create_task(self._keep_alive(), name="redis session renewer")
        return self

    async def create(self, session: StoredSession) -> Claim:
        claim = Claim(session.session_id, secrets.token_hex(16))
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(session.session_id), json.dumps(session.to_json()), ex=self._ttl)
                pipe.set(self._owner(session.session_id), claim.token, ex=self._ttl)
                await pipe.execute()
        except RedisError as error:
            raise self._unavailable(error) from error
        self._hold(claim)
        return claim

    async def resume(self, session_id: str, principal: str = "") -> tuple[StoredSession, Claim] | None:
        try:
            stored = await self._redis.get(self._key(session_id))
        except RedisError as error:
            raise self._unavailable(error) from error
        if stored is None or StoredSession.from_json(json.loads(stored)).principal != principal:
            return None  # (not there, or not theirs: its holder is not disturbed; the principal never changes)
        previous = self._claims.get(session_id)
        if previous is not None:
            await hand_over(previous)  # held on this replica: it writes what it has, then lets go
        else:
            await self._hand_over_elsewhere(session_id)
        claim = Claim(session_id, secrets.token_hex(16))
        keys = [self._key(session_id), self._owner(session_id), self._channel(session_id)]
        try:
            data = await self._resume(keys=keys, args=[claim.token, self._ttl])
            if not data:
                return None
            # Resumes close together may finish in another order than their scripts ran, and a rival's
            # announcement may have found no local claim to tell: the owner key decides which of this
            # claim and the one this replica held before is the owner; the other one lost.
            previous = self._claims.get(session_id)
            self._claims[session_id] = claim
            owner = await self._redis.get(self._owner(session_id))
            for candidate in (previous, claim):
                if candidate is not None and candidate.token != owner:
                    candidate.lose()
            holder = self._claims.get(session_id)
            if holder is not None and holder.lost.is_set():
                del self._claims[session_id]
            if previous is not None and previous.token == owner:
                self._claims[session_id] = previous
        except RedisError as error:
            raise self._unavailable(error) from error
        return StoredSession.from_json(json.loads(data)), claim

    async def _hand_over_elsewhere(self, session_id: str) -> None:
        """Ask the stream that holds the session on another replica (or worker) to end and let go, and
        wait until it has (at most :data:`HELD_REPLY_S` for an answer, then :data:`HANDOVER_TIMEOUT_S`)."""
        try:
            owner = await self._redis.get(self._owner(session_id))
            if owner is None:
                return
            owner = owner if isinstance(owner, str) else owner.decode()  # (decoded: decode_responses)
            waiter = _HandOver(owner)
            self._handovers.setdefault(session_id, []).append(waiter)
            try:
                await self._redis.publish(self._channel(session_id), f"want:{owner}")
                await first_of(waiter.held, waiter.gone, timeout_s=HELD_REPLY_S)
                if waiter.held.is_set():
                    await first_of(waiter.gone, timeout_s=HANDOVER_TIMEOUT_S)
            finally:
                waiting = self._handovers.get(session_id, [])
                if waiter in waiting:
                    waiting.remove(waiter)
                if not waiting:
                    self._handovers.pop(session_id, None)
        except RedisError as error:
            raise self._unavailable(error) from error

    async def save(self, session: StoredSession, claim: Claim) -> bool:
        keys = [self._key(session.session_id), self._owner(session.session_id)]
        try:
            written = await self._save(keys=keys, args=[claim.token, json.dumps(session.to_json()), self._ttl])
        except RedisError as error:
            raise self._unavailable(error) from error
        if written != 1:
            claim.lose(vanished=written == -1)
        return written == 1

    async def release(self, claim: Claim) -> None:
        """Let go; the session's idle time starts now."""
        if self._claims.get(claim.session_id) is claim:
            del self._claims[claim.session_id]
        try:
            with contextlib.suppress(RedisError):
                await self._release(
                    keys=[self._key(claim.session_id), self._owner(claim.session_id)], args=[claim.token, self._ttl]
                )
        finally:
            claim.released.set()
        if claim.wanted.is_set():  # (a resume on another replica waits for this)
            with contextlib.suppress(RedisError):
                await self._redis.publish(self._channel(claim.session_id), f"gone:{claim.token}")

    def counts(self) -> tuple[int, int | None]:
        return len(self._claims), None  # (the stored ones are Redis's to count, shared by every replica)

    async def check(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise self._unavailable(error) from error

    async def aclose(self) -> None:
        for task in (self._listener, self._renewer, *self._asides):
            if task is not None:
                await stopped(task)  # (a command in flight can lose a cancellation on Python 3.11)
        await self._redis.aclose()

    async def _keep_alive(self) -> None:
        """A session a stream holds is not idle: renew its keys well before they would expire."""
        while True:
            await asyncio.sleep(max(0.5, self._ttl / 3))
            for claim in list(self._claims.values()):
                keys = [self._key(claim.session_id), self._owner(claim.session_id)]
                try:
                    renewed = await self._renew(keys=keys, args=[claim.token, self._ttl])
                    if renewed != 1:
                        claim.lose(vanished=renewed == -1)
                        self._claims.pop(claim.session_id, None)
                except RedisError as error:
                    log.warning("could not renew session %s: %s", claim.session_id[:8], error)

    # -- internals ---------------------------------------------------------------------------------

    def _hold(self, claim: Claim) -> None:
        previous = self._claims.get(claim.session_id)
        if previous is not None:
            previous.lose()  # taken over on this very replica
        self._claims[claim.session_id] = claim

    async def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Tell local streams when another stream (on any replica) took their session over."""
        channel_prefix = f"{self._prefix}:takeover:"
        outage = _Outage()
        subscribed = False
        try:
            while True:
                try:
                    async for message in pubsub.listen():
                        if message["type"] == "psubscribe":  # (subscribed: at the start, or again)
                            outage.over()
                            if subscribed:  # (takeovers announced while it was down were not heard)
                                self._aside(self._check_claims())
                            subscribed = True
                        if message["type"] != "pmessage":
                            continue
                        session_id = str(message["channel"]).removeprefix(channel_prefix)
                        kind, _, token = str(message["data"]).partition(":")
                        if token:  # (a hand-over: want, held or gone)
                            self._aside(self._handing_over(session_id, kind, token))
                            continue
                        claim = self._claims.get(session_id)
                        if claim is not None and claim.token != message["data"]:
                            self._aside(self._check_takeover(session_id, claim))
                except RedisError as error:
                    outage.failed(error)
                    await asyncio.sleep(1)
        finally:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()

    async def _check_takeover(self, session_id: str, claim: Claim) -> None:
        """The announcement may be older than this claim (two resumes close together, the other one
        first): the owner key says who holds the session now. A claim lost is told so."""
        try:
            owner = await self._redis.get(self._owner(session_id))
        except RedisError as error:  # (not the subscription's outage: its own writes will meet the error)
            log.warning("could not check a takeover of session %s… (%s)", session_id[:8], error)
            return
        if owner != claim.token:
            self._taken(claim)

    def _aside(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the listener, which goes on at once to the next message."""
        task = asyncio.create_task(work)
        self._asides.add(task)
        task.add_done_callback(self._asides.discard)

    async def _handing_over(self, session_id: str, kind: str, token: str) -> None:
        """A hand-over message: another replica wants a session a stream here holds (it is asked to end
        and let go: it writes what it has first), or a holder elsewhere answers a resume here."""
        if kind == "want":
            claim = self._claims.get(session_id)
            if claim is not None and claim.token == token and not claim.lost.is_set():
                claim.wanted.set()
                with contextlib.suppress(RedisError):
                    await self._redis.publish(self._channel(session_id), f"held:{token}")
            return
        for waiter in self._handovers.get(session_id, []):
            if waiter.token == token:
                (waiter.held if kind == "held" else waiter.gone).set()

    async def _check_claims(self) -> None:
        """Every claim of this replica, against the owner keys: a claim another stream took over is told
        so (one whose owner key is gone is left to its next write, which says what happened)."""
        claims = list(self._claims.values())
        if not claims:
            return
        try:
            owners = await self._redis.mget([self._owner(claim.session_id) for claim in claims])
        except RedisError as error:
            log.warning("could not check this replica's %d sessions for takeovers (%s)", len(claims), error)
            return
        for claim, owner in zip(claims, owners, strict=True):
            if owner is not None and owner != claim.token:
                self._taken(claim)

    def _taken(self, claim: Claim) -> None:
        """Another stream owns ``claim``'s session now: its stream is told, and it is held no more."""
        claim.lose()
        if self._claims.get(claim.session_id) is claim:
            del self._claims[claim.session_id]

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}:session:{session_id}"

    def _owner(self, session_id: str) -> str:
        return f"{self._prefix}:session:{session_id}:owner"

    def _channel(self, session_id: str) -> str:
        return f"{self._prefix}:takeover:{session_id}"

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        return StoreUnavailable(
            f"the session store (Redis at {without_credentials(self._url)}) is unavailable: {error}"
        )


class _Outage:
    """The takeover subscription's outage: said when it begins, once a minute while it lasts (the
    listener tries again every second), and when it is over."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._said_at = 0.0

    def failed(self, error: Exception) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = self._said_at = now
            log.warning("lost the Redis takeover subscription (%s); reconnecting every second", error)
        elif now - self._said_at >= RECONNECTING_SAID_EVERY_S:
            self._said_at = now
            log.warning(
                "the Redis takeover subscription is still down after %.0f s (%s); reconnecting",
                now - self._since,
                error,
            )

    def over(self) -> None:
        if self._since is not None:
            log.info("the Redis takeover subscription is back after %.0f s", time.monotonic() - self._since)
            self._since = None
