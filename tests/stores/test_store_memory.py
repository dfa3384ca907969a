"""The memory session store on its own: its bound (least recently used idle session first, held
sessions never), expiry on a fake clock, ownership, and exact round trips of the stored data."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from service.core.history import Entry
from service.core.store import Claim, StoredSession
from service.errors import Overloaded
from service.stores.memory import MemoryStore

TTL_S = 60.0


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def session(session_id: str, **fields: object) -> StoredSession:
    return StoredSession(**{"session_id": session_id, "system_prompt": "Be brief.", "voice": "v1", **fields})  # type: ignore[arg-type]


def new_store(max_sessions: int = 100, clock: FakeClock | None = None) -> MemoryStore:
    return MemoryStore(TTL_S, max_sessions=max_sessions, clock=clock or FakeClock())


async def stored_ids(store: MemoryStore, candidates: str) -> str:
    """Which of the candidate ids (one letter each) the store still has. Resuming is a use, so call
    this only at the end of a test."""
    present = ""
    for session_id in candidates:
        resumed = await store.resume(session_id)
        if resumed is not None:
            present += session_id
            await store.release(resumed[1])
    return present


# -- the bound ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uses", "evicted"),
    [
        # Each letter is a use: a new id is created, a known one resumed; the session is then released.
        ("abc", "a"),  # nothing used since creation: the oldest goes
        ("abca", "b"),  # resuming a made it recent
        ("abcab", "c"),
        ("abcba", "c"),
        ("abccba", "c"),  # order of last use, not of first or count of uses
        ("abcbbbbbbca", "b"),
    ],
)
async def test_a_full_store_forgets_the_least_recently_used_idle_session(uses: str, evicted: str) -> None:
    store = new_store(max_sessions=3)
    created: set[str] = set()
    for session_id in uses:
        if session_id in created:
            resumed = await store.resume(session_id)
            assert resumed is not None
            claim = resumed[1]
        else:
            claim = await store.create(session(session_id))
            created.add(session_id)
        await store.release(claim)

    await store.release(await store.create(session("d")))

    assert await store.resume(evicted) is None
    assert await stored_ids(store, "abcd") == "".join(sorted(set("abcd") - {evicted}))


TALK = [Entry("user", "Hi"), Entry("assistant", "Hello.")]


async def test_sessions_without_history_are_forgotten_before_conversations() -> None:
    # Streams that only started (each stored a session, none took a turn) pushed the conversations
    # out, however recently those were used (an attack pass).
    store = new_store(max_sessions=3)
    await store.release(await store.create(session("a", entries=TALK)))  # the least recently used
    claim = await store.create(session("b"))
    assert await store.save(session("b", entries=TALK), claim)  # a turn since: a conversation too
    await store.release(claim)
    for session_id in "cdefg":
        await store.release(await store.create(session(session_id)))
    assert await stored_ids(store, "abcdefg") == "abg"


async def test_a_resumed_session_without_history_is_still_the_first_to_go() -> None:
    store = new_store(max_sessions=3)
    for session_id, entries in (("a", TALK), ("b", TALK), ("c", [])):
        await store.release(await store.create(session(session_id, entries=entries)))
    resumed = await store.resume("c")  # (now the most recently used)
    assert resumed is not None
    await store.release(resumed[1])
    await store.release(await store.create(session("d", entries=TALK)))  # evicts c
    await store.release(await store.create(session("e", entries=TALK)))  # evicts a, the least recently used
    assert await stored_ids(store, "abcde") == "bde"


async def test_held_sessions_are_never_evicted() -> None:
    store = new_store(max_sessions=3)
    held = await store.create(session("a"))  # the oldest, but a stream holds it
    await store.release(await store.create(session("b")))
    await store.release(await store.create(session("c")))

    await store.release(await store.create(session("d")))  # evicts b, not a
    await store.release(await store.create(session("e")))  # evicts c

    assert await store.save(session("a", turns_started=3), held)
    assert not held.lost.is_set()
    await store.release(held)
    assert await stored_ids(store, "abcde") == "ade"


async def test_a_store_full_of_held_sessions_is_overloaded_until_one_is_released() -> None:
    store = new_store(max_sessions=2)
    first = await store.create(session("a"))
    await store.create(session("b"))

    with pytest.raises(Overloaded) as caught:
        await store.create(session("c"))
    message = str(caught.value)
    assert "maximum number of sessions" in message
    assert "retry later" in message
    assert await store.resume("c") is None

    await store.release(first)
    await store.create(session("c"))  # a, idle now, makes room
    assert await store.resume("a") is None


async def test_a_resumed_evicted_session_is_none() -> None:
    store = new_store(max_sessions=1)
    await store.release(await store.create(session("a")))
    await store.release(await store.create(session("b")))
    assert await store.resume("a") is None
    assert await store.resume("b") is not None


def test_max_sessions_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        MemoryStore(TTL_S, max_sessions=0)


# -- expiry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("idle_s", "kept"), [(0.0, True), (TTL_S - 0.001, True), (TTL_S, False), (TTL_S * 10, False)])
async def test_an_idle_session_expires_after_the_ttl(idle_s: float, kept: bool) -> None:
    clock = FakeClock()
    store = new_store(clock=clock)
    await store.release(await store.create(session("a")))
    clock.advance(idle_s)
    assert (await store.resume("a") is not None) is kept


async def test_a_held_session_does_not_expire() -> None:
    clock = FakeClock()
    store = new_store(clock=clock)
    held = await store.create(session("a", turns_started=2))
    clock.advance(TTL_S * 5)
    assert await store.save(session("a", turns_started=3), held)
    clock.advance(TTL_S * 5)
    resumed = await store.resume("a")  # another stream takes it over: it is still there
    assert resumed is not None
    assert resumed[0].turns_started == 3


async def test_expired_sessions_go_and_recent_ones_stay() -> None:
    clock = FakeClock()
    store = new_store(clock=clock)
    for session_id in "abcd":
        await store.release(await store.create(session(session_id)))
        clock.advance(10)
    # Now a is 40 s idle, b 30, c 20, d 10; 35 s later a and b are past the 60 s TTL, c and d not.
    clock.advance(35)
    assert await stored_ids(store, "abcd") == "cd"


async def test_the_idle_time_starts_when_the_stream_lets_go() -> None:
    clock = FakeClock()
    store = new_store(clock=clock)
    claim = await store.create(session("a"))
    clock.advance(TTL_S * 2)  # held all this time
    await store.release(claim)
    clock.advance(TTL_S - 1)
    assert await store.resume("a") is not None


# -- ownership ----------------------------------------------------------------------------------------


async def test_a_takeover_tells_the_previous_stream() -> None:
    store = new_store()
    first = await store.create(session("a"))
    resumed = await store.resume("a")
    assert resumed is not None
    second = resumed[1]
    assert first.lost.is_set()
    assert not second.lost.is_set()
    assert first.token != second.token

    third = (await store.resume("a") or pytest.fail("gone"))[1]
    assert second.lost.is_set()
    assert not third.lost.is_set()


async def test_a_release_by_a_stream_that_lost_the_session_changes_nothing() -> None:
    store = new_store()
    first = await store.create(session("a"))
    second = (await store.resume("a") or pytest.fail("gone"))[1]
    await store.release(first)
    assert await store.save(session("a", turns_started=5), second)


async def _released(store: MemoryStore) -> Claim:
    claim = await store.create(session("a"))
    await store.release(claim)
    return claim


async def _taken_over(store: MemoryStore) -> Claim:
    claim = await store.create(session("a"))
    await store.resume("a")
    return claim


async def _forged(store: MemoryStore) -> Claim:
    claim = await store.create(session("a"))
    return Claim("a", claim.token)  # same id and token, but not the claim the store gave


async def _of_another_session(store: MemoryStore) -> Claim:
    await store.release(await store.create(session("a")))
    return await store.create(session("b"))


@pytest.mark.parametrize("make_claim", [_released, _taken_over, _forged, _of_another_session])
async def test_a_save_without_owning_the_session_is_refused(
    make_claim: Callable[[MemoryStore], Awaitable[Claim]],
) -> None:
    store = new_store()
    claim = await make_claim(store)
    assert not await store.save(session("a", turns_started=9, entries=[Entry("user", "not mine")]), claim)
    stored = await store.resume("a")
    assert stored is not None
    assert stored[0] == session("a")


async def test_a_save_of_a_session_that_is_gone_is_refused() -> None:
    store = new_store(max_sessions=1)
    await store.release(await store.create(session("a")))
    held = await store.create(session("b"))  # evicts a
    assert not await store.save(session("a"), held)
    assert await store.resume("a") is None


# -- the stored data ----------------------------------------------------------------------------------

ROUND_TRIPS = {
    "empty": session("a"),
    "temperature None": session("a", temperature=None, max_tokens=None),
    "temperature 0": session("a", temperature=0.0, max_tokens=1),
    "temperature set": session("a", temperature=0.7, max_tokens=200),
    "awkward float": session("a", temperature=0.1 + 0.2),
    "history": session(
        "a",
        entries=[
            Entry("user", "Tell me a story."),
            Entry("assistant", "Once upon a time [interrupted: the user heard only this much]", True),
            Entry("user", "Shorter."),
            Entry("assistant", "Fine.", False),
            Entry("user", "And?"),
            Entry("assistant", "", True),
        ],
        turns_started=3,
    ),
    "text of every kind": StoredSession(
        session_id="Zx-_09",
        system_prompt='Quotes " \\ back\\slash, new\nlines\ttabs, \x00 nul, Ünïcødé, 日本語, emoji 🎙️, \ud800 lone',
        voice="de_DE-thorsten",
        entries=[Entry("user", "¿Qué tal? \u2028 \U0001f600")],
        turns_started=2**40,
    ),
    "long prompt": session("a", system_prompt="x" * 4000, entries=[Entry("user", "y" * 20_000)]),
}


@pytest.mark.parametrize("stored", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
async def test_a_session_comes_back_exactly_as_created_and_as_saved(stored: StoredSession) -> None:
    store = new_store()
    await store.release(await store.create(stored))
    resumed = await store.resume(stored.session_id)
    assert resumed is not None
    assert resumed[0] == stored
    assert [type(e) for e in resumed[0].entries] == [Entry] * len(stored.entries)

    blank = dataclasses.replace(stored, entries=[], turns_started=0, temperature=None, max_tokens=None)
    claim = await store.create(blank)
    assert await store.save(stored, claim)
    await store.release(claim)
    again = await store.resume(stored.session_id)
    assert again is not None
    assert again[0] == stored


async def test_stored_data_is_a_copy() -> None:
    store = new_store()
    original = session("a", entries=[Entry("user", "Hi.")])
    claim = await store.create(original)
    original.entries.append(Entry("assistant", "changed after create"))
    original.system_prompt = "changed"
    await store.release(claim)

    first = await store.resume("a")
    assert first is not None
    assert first[0] == session("a", entries=[Entry("user", "Hi.")])
    first[0].entries.clear()  # the caller's copy, not the store's
    await store.release(first[1])

    second = await store.resume("a")
    assert second is not None
    assert second[0].entries == [Entry("user", "Hi.")]


async def test_a_session_resumes_only_for_its_principal() -> None:
    memory = new_store()
    claim = await memory.create(session("s1", principal="key:alice"))
    assert await memory.resume("s1") is None
    assert await memory.resume("s1", "key:bob") is None
    assert not claim.lost.is_set() and not claim.wanted.is_set()  # the holder was not disturbed
    resumed = await memory.resume("s1", "key:alice")
    assert resumed is not None and resumed[0].principal == "key:alice"
    await memory.release(resumed[1])
    assert await memory.resume("s1", "key:bob") is None  # idle too
