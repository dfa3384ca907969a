"""Parley's benchmarks, one command (``make bench`` runs it with the defaults):

    python -m benchmarks.bench [--profile cloud] [--concurrency 1,50,200] [--turns 3]
                               [--duration 600] [--no-embedded] [--out benchmarks/RESULTS.md]
                               [--compare REV] [--extras full|quick|none] [--only voice]
                               [--generator compiled|python]

1. Service overhead on time to first audio: scripted engines with a known latency profile, so each
   turn's ideal first audio is computable; measured (at the client, through gRPC on loopback) minus
   ideal, at each concurrency, each stream doing several turns. The load is driven by a compiled load
   generator (``benchmarks/loadgen/``, gRPC C++, built on first use; ``--generator python`` drives it
   from this process instead), which costs a fraction of the service's CPU.
2. Streaming versus sequential: the same profile and replies (short: one sentence; long: about 150
   words) through Parley and through a naive sequential baseline (whole LLM reply, then whole TTS).
3. The embedded engines on this machine: ten questions on the local LLM and Piper; then voice to
   voice: the same questions spoken by espeak-ng, streamed in real time through Silero VAD and
   Whisper (``benchmarks/voice.py``). ``--only voice`` runs that alone and puts its section into
   the existing report in place of the old one. Then the output encodings beside PCM16 (first audio,
   bytes per second, encoder CPU; ``benchmarks/encodings.py``; alone: ``--only encodings``). Then a
   replica as the manifest runs it: its memory at rest with every model loaded, and first audio with
   1 to 8 streams asking at once (``benchmarks/replica.py``; alone: ``--only replica``).
4. Capacity and memory: streams held at once, resident memory per active stream above idle, CPU per
   turn, and whether audio arrived in order without gaps. With ``--extras full`` (``make bench``), one
   service process against one per core (``PARLEY_WORKERS``) at 200 and 500 streams, and the largest
   stream count meeting the overhead target for each, sessions in a Redis started for it
   (``benchmarks/workers.py``; alone: ``--only workers``).
5. With ``--compare REV``: stage 1 also against the service of commit REV (checked out in a
   temporary git worktree, run by the same harness, the two alternating at each concurrency), so a
   change is judged before and after in one run; with ``--only workers``, one worker per core of
   each, both running, measured in turn at 100 and 200 streams over three rounds.
6. The segmenter's worst case (the longest single call, which holds the event loop, over
   pathological inputs; ``benchmarks/segmenter_stall.py``) and the session store's memory (bytes per
   stored session and a cancel-after-first-response soak; ``benchmarks/memory_soak.py``).

Results go to a Markdown file with the machine, date, commit and command, and a PNG chart. It stops
by itself: no stage starts a turn after ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import embedded, encodings, load, replica, voice, workers
from benchmarks.report import Report, reference_ms

MESSAGES = {"medium": "What is the capital of France?", "short": "A short one, please.", "long": "A long one, please."}


async def overhead(args: argparse.Namespace, report: Report, deadline: float, baseline: Path | None) -> None:
    ideal = load.ideal_first_audio_ms(args.profile, MESSAGES["medium"])
    compiled = args.generator == "compiled"
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(load.ServiceProcess(args.profile, max(args.concurrency) + 10))
        before = None
        if baseline is not None:
            before = stack.enter_context(load.ServiceProcess(args.profile, max(args.concurrency) + 10, root=baseline))
        for each in (service, before):
            if each is not None:
                await each.wait_ready()
                # Warm up: the first turns pay for imports and connection set-up.
                await load.run_load(each, 2, 1, MESSAGES["medium"], deadline, compiled=compiled)
        for round_, concurrency in enumerate(args.concurrency):
            if time.monotonic() > deadline:
                report.note(f"stopped before concurrency {concurrency}: --duration reached")
                break
            runs = [("after", service)] if before is None else [("before", before), ("after", service)]
            if round_ % 2:
                runs.reverse()  # neither always goes first
            for label, each in runs:
                result = await load.run_load(
                    each, concurrency, args.turns, MESSAGES["medium"], deadline, compiled=compiled
                )
                if label == "after":
                    report.add_load(result, ideal)
                if before is not None:
                    report.add_comparison(label, result, ideal)


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """``revision`` checked out in a temporary git worktree (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="parley-baseline-") as folder:
        path = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=False, capture_output=True)


async def extras(args: argparse.Namespace, report: Report) -> None:
    """The segmenter's worst case and the session store's memory (their own modules' reports)."""
    from benchmarks import memory_soak, segmenter_stall

    quick = args.extras == "quick"
    for title, run in (
        ("6. Segmenter: the longest event-loop stall", segmenter_stall.run),
        ("7. Session store memory", memory_soak.run),
    ):
        try:
            report.add_section(title, await asyncio.to_thread(run, quick))
        except Exception as error:  # one stage failing must not lose the others' figures
            report.note(f"{title}: failed ({type(error).__name__}: {error})")


async def streaming(args: argparse.Namespace, report: Report, deadline: float) -> None:
    with load.ServiceProcess(args.profile, 10) as service:
        await service.wait_ready()
        await load.run_load(service, 1, 1, MESSAGES["short"], deadline)  # warm-up
        for kind in ("short", "long"):
            if time.monotonic() > deadline:
                break
            result = await load.run_load(service, 1, args.turns, MESSAGES[kind], deadline)
            streamed = [t.first_audio_ms for t in result.turns]
            sequential = [await load.sequential_first_audio_ms(args.profile, MESSAGES[kind]) for _ in streamed]
            report.add_streaming(kind, streamed, sequential)


ENCODINGS_TITLE = "3c. Output encodings (Piper, speak_text)"
WORKERS_TITLE = "4b. One process or one per core (PARLEY_WORKERS)"
REPLICA_TITLE = "3d. A replica on the embedded engines: memory and conversations at once"


async def workers_stage(
    args: argparse.Namespace, report: Report, deadline: float, baseline: Path | None = None
) -> None:
    compiled = args.generator == "compiled"
    try:
        measured = await workers.measure(args.profile, MESSAGES["medium"], args.turns, deadline, compiled=compiled)
        if baseline is not None:
            compared = await workers.compare(
                args.profile, MESSAGES["medium"], args.turns, deadline, baseline, args.compare, compiled=compiled
            )
            measured = f"{measured}\n\n{compared}"
        report.add_section(WORKERS_TITLE, measured)
    except Exception as error:  # the other stages' figures still count
        report.note(f"workers: failed ({type(error).__name__}: {error})")


async def replica_stage(report: Report, deadline: float) -> None:
    try:
        report.add_section(REPLICA_TITLE, await replica.measure(deadline))
    except Exception as error:  # the other stages' figures still count
        report.note(f"replica: failed ({type(error).__name__}: {error})")


async def encodings_stage(report: Report) -> None:
    try:
        report.add_section(ENCODINGS_TITLE, await encodings.measure())
    except Exception as error:  # the other stages' figures still count
        report.note(f"output encodings: failed ({type(error).__name__}: {error})")


async def voice_stage(report: Report) -> None:
    try:
        report.add_voice(await voice.measure(10))
    except Exception as error:  # the other stages' figures still count
        report.note(f"voice to voice: failed ({type(error).__name__}: {error})")


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, {memory_gib():.0f} GiB, Python {python_build()}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the machine's architecture where it is not said."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def python_build() -> str:
    """This interpreter's version and build: which build of Python matters as much as its version
    (a source build without optimizations took 1.25 to 1.44 times as long to cut and normalize a
    reply on this project's machine); its build date and compiler tell builds apart."""
    built = " ".join(platform.python_build()[1].split()[:3])
    return f"{platform.python_version()} (built {built}, {platform.python_compiler()})"


OUTPUTS = ("benchmarks/RESULTS.md", "benchmarks/first_audio.png")


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    # (The reports this harness writes do not change what it measures: a stage run after another,
    # before its figures are committed, still measures the commit.)
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in OUTPUTS))
    return sha + (" (with uncommitted changes)" if changed else "")


async def main_async(args: argparse.Namespace) -> Report:
    deadline = time.monotonic() + args.duration
    report = Report(
        # (The machine's speed drifts on a shared host: the reference says how fast it ran at the start.)
        machine=f"{machine()}, reference workload {reference_ms():.1f} ms at the start (`reference_ms`)",
        date=datetime.date.today().isoformat(),
        commit=commit(),
        command=" ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
        profile=args.profile,
        turns=args.turns,
        generator=args.generator,
    )
    if args.only == "voice":
        await voice_stage(report)
        return report
    if args.only == "encodings":
        await encodings_stage(report)
        return report
    if args.only == "workers":
        with contextlib.ExitStack() as stack:
            baseline = stack.enter_context(checkout(args.compare)) if args.compare else None
            await workers_stage(args, report, deadline, baseline)
        return report
    if args.only == "replica":
        await replica_stage(report, deadline)
        return report
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(checkout(args.compare)) if args.compare else None
        await overhead(args, report, deadline, baseline)
    await streaming(args, report, deadline)
    if args.extras == "full" and time.monotonic() < deadline:  # (minutes: make bench, not a smoke run)
        await workers_stage(args, report, deadline)
    if args.embedded and time.monotonic() < deadline:
        report.add_embedded(await embedded.measure(10))
        await voice_stage(report)
        await encodings_stage(report)
        await replica_stage(report, deadline)
    if args.extras != "none":
        await extras(args, report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cloud", choices=sorted(load.PROFILES), help="scripted latency profile")
    parser.add_argument("--concurrency", default="1,50,200", help="comma-separated stream counts (default 1,50,200)")
    parser.add_argument("--turns", type=int, default=3, help="turns per stream (default 3)")
    parser.add_argument("--duration", type=float, default=600, help="no turn starts after this many seconds")
    parser.add_argument("--no-embedded", dest="embedded", action="store_false", help="skip the embedded engines")
    parser.add_argument("--out", default="benchmarks/RESULTS.md", help="the Markdown report")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="REV",
        help="also measure commit REV: stage 1, or with --only workers one worker per core side by side",
    )
    parser.add_argument(
        "--extras",
        default="full",
        choices=["full", "quick", "none"],
        help="the segmenter and memory stages: full (default), quick, or none",
    )
    parser.add_argument(
        "--only",
        default=None,
        choices=["voice", "encodings", "workers", "replica"],
        help="run one stage alone (merged into --out in place of its old section)",
    )
    parser.add_argument(
        "--generator",
        default="compiled",
        choices=["compiled", "python"],
        help="the load generator: compiled (benchmarks/loadgen/, gRPC C++; default) or python (grpc.aio)",
    )
    parser.add_argument("--chart", default=None, help="the PNG chart (default: beside the report)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    chart = Path(args.chart) if args.chart else out.with_name("first_audio.png")
    if args.only == "voice":
        report.merge_voice(out)
    elif args.only == "encodings":
        report.merge_section(out, ENCODINGS_TITLE)
    elif args.only == "workers":
        report.merge_section(out, WORKERS_TITLE)
    elif args.only == "replica":
        report.merge_section(out, REPLICA_TITLE)
    else:
        report.write(out, chart)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
