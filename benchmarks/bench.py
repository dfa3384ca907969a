"""Parley's benchmarks, one command (``make bench`` runs it with the defaults):

    python -m benchmarks.bench [--profile cloud] [--concurrency 1,50,200] [--turns 3]
                               [--duration 600] [--no-embedded] [--out benchmarks/RESULTS.md]

1. Service overhead on time to first audio: scripted engines with a known latency profile, so each
   turn's ideal first audio is computable; measured (at the client, through gRPC on loopback) minus
   ideal, at each concurrency, each stream doing several turns.
2. Streaming versus sequential: the same profile and replies (short: one sentence; long: about 150
   words) through Parley and through a naive sequential baseline (whole LLM reply, then whole TTS).
3. The embedded engines on this machine: ten questions on the local LLM and Piper.
4. Capacity and memory: streams held at once, resident memory per active stream above idle, CPU per
   turn, and whether audio arrived in order without gaps.

Results go to a Markdown file with the machine, date, commit and command, and a PNG chart. It stops
by itself: no stage starts a turn after ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import embedded, load
from benchmarks.report import Report

MESSAGES = {"medium": "What is the capital of France?", "short": "A short one, please.", "long": "A long one, please."}


async def overhead(args: argparse.Namespace, report: Report, deadline: float) -> None:
    ideal = load.ideal_first_audio_ms(args.profile, MESSAGES["medium"])
    with load.ServiceProcess(args.profile, max(args.concurrency) + 10) as service:
        await service.wait_ready()
        # Warm up: the first turns pay for imports and connection set-up.
        await load.run_load(service, 2, 1, MESSAGES["medium"], deadline)
        for concurrency in args.concurrency:
            if time.monotonic() > deadline:
                report.note(f"stopped before concurrency {concurrency}: --duration reached")
                break
            result = await load.run_load(service, concurrency, args.turns, MESSAGES["medium"], deadline)
            report.add_load(result, ideal)


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


def machine() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {model}, {memory_gb:.0f} GiB, Python {platform.python_version()}"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


async def main_async(args: argparse.Namespace) -> Report:
    deadline = time.monotonic() + args.duration
    report = Report(
        machine=machine(),
        date=datetime.date.today().isoformat(),
        commit=commit(),
        command=" ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
        profile=args.profile,
        turns=args.turns,
    )
    await overhead(args, report, deadline)
    await streaming(args, report, deadline)
    if args.embedded and time.monotonic() < deadline:
        report.add_embedded(await embedded.measure(10))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cloud", choices=sorted(load.PROFILES), help="scripted latency profile")
    parser.add_argument("--concurrency", default="1,50,200", help="comma-separated stream counts (default 1,50,200)")
    parser.add_argument("--turns", type=int, default=3, help="turns per stream (default 3)")
    parser.add_argument("--duration", type=float, default=600, help="no turn starts after this many seconds")
    parser.add_argument("--no-embedded", dest="embedded", action="store_false", help="skip the embedded engines")
    parser.add_argument("--out", default="benchmarks/RESULTS.md", help="the Markdown report")
    parser.add_argument("--chart", default=None, help="the PNG chart (default: beside the report)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    chart = Path(args.chart) if args.chart else out.with_name("first_audio.png")
    report.write(out, chart)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
