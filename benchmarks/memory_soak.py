"""What sessions cost in memory, and whether the service's memory stays flat under churn:

    python -m benchmarks.memory_soak [--sessions 10000] [--cycles 10000] [--concurrency 8] [--quick]

1. Bytes per stored session: sessions created and released in a ``MemoryStore`` in this process,
   measured with tracemalloc, for a typical session (the default system prompt, ten turns of
   history), a worst-case prompt (4,000 characters, ten turns) and a session at the history limits
   (4,000-character prompt, 20,000 characters of history); beside each, what the same sessions cost
   as live Python objects (how the store kept them before).
2. The "cancel after first response" soak (as in gRPC's interop tests): a service process on the
   scripted engines (``quick`` profile) and default settings on a free loopback port; each cycle
   opens Converse, sends ``start`` (a new session) and a ``user_text``, reads the first response and
   cancels the call, ``--concurrency`` cycles at a time. The service's resident memory (VmRSS) after
   the first 1,000 cycles and at the end; the target is at most 10% growth between the two, as every
   cycle leaves a session stored for the session TTL.

It stops by itself: every call has a deadline, and no cycle starts after ``--timeout`` seconds.
``run(quick)`` gives the Markdown for the benchmark report.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import gc
import json
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from benchmarks import load
from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.core.history import Entry
from service.core.settings import SessionDefaults, new_session_id
from service.core.store import StoredSession
from service.stores.memory import MemoryStore

TARGET_GROWTH_PCT = 10.0
BASELINE_CYCLES = 1000
QUESTION = "What is the capital of France?"

_WORDS = (
    "the a voice answer question today weather city river music quickly sure here is of and to in you "
    "your it that this with for about three minutes later morning train ticket paris france seine"
).split()


# -- 1. bytes per stored session ---------------------------------------------------------------------


def _corpus(chars: int) -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(_WORDS) for _ in range(chars // 4))


_CORPUS = _corpus(100_000)


def _text(rng: random.Random, chars: int) -> str:
    """``chars`` characters of words, a new string each time (as a session's own text would be)."""
    start = rng.randrange(len(_CORPUS) - chars)
    return _CORPUS[start : start + chars - 1].capitalize() + "."


def _history(rng: random.Random, turns: int, user_chars: int, reply_chars: int) -> list[Entry]:
    entries: list[Entry] = []
    for turn in range(turns):
        entries.append(Entry("user", _text(rng, user_chars)))
        entries.append(Entry("assistant", _text(rng, reply_chars), interrupted=turn % 4 == 3))
    return entries


def typical_session(rng: random.Random) -> StoredSession:
    """The default system prompt and ten turns: questions of about 60 characters, spoken replies of
    about 250 (the default prompt asks for brief answers), one in four cut by a barge-in."""
    return StoredSession(
        session_id=new_session_id(),
        system_prompt=SessionDefaults.system_prompt,
        voice="en_US-joe-medium",
        temperature=0.7,
        entries=_history(rng, 10, 60, 250),
        turns_started=10,
    )


def long_prompt_session(rng: random.Random) -> StoredSession:
    """A 4,000-character system prompt (the longest a client may send) and ten typical turns."""
    session = typical_session(rng)
    session.system_prompt = _text(rng, 4000)
    return session


def full_session(rng: random.Random) -> StoredSession:
    """A 4,000-character prompt and 20,000 characters of history (the default history limit)."""
    session = long_prompt_session(rng)
    session.entries = _history(rng, 40, 100, 400)
    session.turns_started = 40
    return session


KINDS: dict[str, Callable[[random.Random], StoredSession]] = {
    "typical (default prompt, 10 turns)": typical_session,
    "4,000-char prompt, 10 turns": long_prompt_session,
    "4,000-char prompt, 20,000 chars of history": full_session,
}


@dataclass
class SessionCost:
    kind: str
    count: int
    json_bytes: float
    stored_bytes: float
    live_bytes: float


def _traced(fill: Callable[[], object]) -> float:
    """Bytes still allocated after ``fill()``, while what it returns is alive."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return float(after - before)


def session_cost(kind: str, count: int) -> SessionCost:
    make = KINDS[kind]

    def in_store() -> MemoryStore:
        store = MemoryStore(3600, max_sessions=count)
        rng = random.Random(1)

        async def fill() -> None:
            for _ in range(count):
                await store.release(await store.create(make(rng)))

        asyncio.run(fill())
        return store

    def as_objects() -> dict[str, StoredSession]:
        # What the store kept before: a deep copy of each session (whose strings it shares).
        rng = random.Random(1)
        kept: dict[str, StoredSession] = {}
        for _ in range(count):
            session = make(rng)
            kept[session.session_id] = copy.deepcopy(session)
        return kept

    sample = make(random.Random(1))
    json_bytes = len(json.dumps(sample.to_json(), ensure_ascii=False, separators=(",", ":")).encode())
    return SessionCost(kind, count, json_bytes, _traced(in_store) / count, _traced(as_objects) / count)


# -- 2. the cancel-after-first-response soak ------------------------------------------------------


@dataclass
class SoakResult:
    cycles: int = 0
    concurrency: int = 0
    first_responses: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    rss_ready_mb: float = 0.0
    rss_baseline_mb: float = 0.0
    baseline_cycles: int = 0
    rss_end_mb: float = 0.0
    samples: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False

    @property
    def growth_pct(self) -> float:
        return (self.rss_end_mb / self.rss_baseline_mb - 1) * 100 if self.rss_baseline_mb else float("nan")


async def _cycle(stub: voice_pb2_grpc.VoiceServiceStub, result: SoakResult) -> None:
    call = stub.Converse(timeout=10)
    try:
        await call.write(pb.ConverseRequest(start=pb.Start()))
        await call.write(pb.ConverseRequest(user_text=pb.UserText(text=QUESTION)))
        response = await call.read()
        kind = "EOF" if response is grpc.aio.EOF else str(response.WhichOneof("kind"))
        result.first_responses[kind] += 1
    except grpc.aio.AioRpcError as error:
        result.errors[error.code().name] += 1
    except Exception as error:  # counted and reported; the soak goes on
        result.errors[type(error).__name__] += 1
    finally:
        call.cancel()


async def soak(cycles: int, concurrency: int, *, timeout_s: float = 1800.0, sample_every: int = 1000) -> SoakResult:
    result = SoakResult(concurrency=concurrency, baseline_cycles=min(BASELINE_CYCLES, max(1, cycles // 2)))
    deadline = time.monotonic() + timeout_s
    with load.ServiceProcess("quick", max_streams=100) as service:  # 100: the default
        await service.wait_ready()
        result.rss_ready_mb = service.rss_mb()
        started = 0
        began = time.perf_counter()
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)

            async def worker() -> None:
                nonlocal started
                while started < cycles:
                    if time.monotonic() > deadline:
                        result.stopped_early = True
                        return
                    started += 1
                    await _cycle(stub, result)
                    result.cycles += 1
                    if result.cycles == result.baseline_cycles:
                        result.rss_baseline_mb = service.rss_mb()
                    if result.cycles % sample_every == 0:
                        result.samples.append((result.cycles, service.rss_mb()))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - began
        await asyncio.sleep(1.0)  # the last cancelled streams end on the server
        result.rss_end_mb = service.rss_mb()
        if not result.samples or result.samples[-1][0] != result.cycles:
            result.samples.append((result.cycles, result.rss_end_mb))
    return result


# -- the report ----------------------------------------------------------------------------------


def _costs_table(costs: list[SessionCost]) -> list[str]:
    lines = [
        f"Stored sessions in a `MemoryStore` in process (tracemalloc, {costs[0].count:,} sessions each):",
        "",
        "| session | JSON | stored, per session | as live objects (before) | 10,000 sessions stored |",
        "|---|---:|---:|---:|---:|",
    ]
    for cost in costs:
        lines.append(
            f"| {cost.kind} | {cost.json_bytes:,.0f} B | {cost.stored_bytes:,.0f} B | {cost.live_bytes:,.0f} B "
            f"| {cost.stored_bytes * 10_000 / 2**20:,.1f} MiB |"
        )
    return lines


def _soak_table(result: SoakResult) -> list[str]:
    verdict = "met" if result.growth_pct <= TARGET_GROWTH_PCT else "MISSED"
    lines = [
        f"Cancel after first response: {result.cycles:,} cycles, {result.concurrency} at a time, in "
        f"{result.wall_s:.0f} s ({result.cycles / result.wall_s:.0f} cycles/s); service on the scripted engines "
        f"(`quick`), default settings; RSS when ready {result.rss_ready_mb:.1f} MiB. Every cycle leaves a session "
        "stored for the TTL (an hour), up to the store's bound (10,000 by default).",
        "",
        "| cycles | service RSS |",
        "|---:|---:|",
    ]
    lines += [f"| {cycles:,} | {rss:.1f} MiB |" for cycles, rss in result.samples]
    lines += [
        "",
        f"RSS after {result.baseline_cycles:,} cycles {result.rss_baseline_mb:.1f} MiB, at the end "
        f"{result.rss_end_mb:.1f} MiB: **{result.growth_pct:+.1f}%** (target ≤ +{TARGET_GROWTH_PCT:g}%: {verdict}).",
        "First responses: " + ", ".join(f"{kind} {n:,}" for kind, n in sorted(result.first_responses.items())) + ".",
        "Failed cycles: "
        + (", ".join(f"{code} {n:,}" for code, n in sorted(result.errors.items())) if result.errors else "none")
        + ".",
    ]
    if result.stopped_early:
        lines.append("Stopped early: the time limit was reached.")
    return lines


def report(costs: list[SessionCost], result: SoakResult) -> str:
    return "\n".join([*_costs_table(costs), "", *_soak_table(result)]) + "\n"


def run(
    quick: bool,
    *,
    sessions: int | None = None,
    cycles: int | None = None,
    concurrency: int = 8,
    timeout_s: float = 1800.0,
) -> str:
    """Both measurements, as Markdown. ``quick``: 1,000 sessions and 2,000 cycles instead of 10,000."""
    sessions = sessions or (1000 if quick else 10_000)
    cycles = cycles or (2000 if quick else 10_000)
    costs = [session_cost(kind, sessions) for kind in KINDS]
    result = asyncio.run(soak(cycles, concurrency, timeout_s=timeout_s))
    return report(costs, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=None, help="sessions per kind in part 1 (default 10,000)")
    parser.add_argument("--cycles", type=int, default=None, help="soak cycles (default 10,000)")
    parser.add_argument("--concurrency", type=int, default=8, help="cycles at a time (default 8)")
    parser.add_argument("--quick", action="store_true", help="1,000 sessions and 2,000 cycles")
    parser.add_argument("--timeout", type=float, default=1800.0, help="start no cycle after this (s)")
    args = parser.parse_args(argv)
    from benchmarks.bench import machine  # the same machine line as the benchmark report

    print(f"Machine: {machine()}\n")
    print(
        run(
            args.quick, sessions=args.sessions, cycles=args.cycles, concurrency=args.concurrency, timeout_s=args.timeout
        ),
        end="",
    )


if __name__ == "__main__":
    main()
