"""A replica as ``deploy/kubernetes.yaml`` runs it: ``python -m service`` on the default embedded
engines (Gemma 3 270M on llama.cpp, Piper, Whisper and Silero VAD all loaded), one worker, sessions in
memory. Its resident memory at rest (what a worker costs before any stream), then the same question
asked on 1, 2, 4 and 8 streams at once, two turns each: time to first audio, and the memory at the
run's peak. The embedded LLM writes one reply at a time, so concurrent questions queue: this says
how many conversations asking at once a replica keeps within an interactive first audio."""

from __future__ import annotations

import os
import time

from benchmarks import load
from benchmarks.report import percentile

__all__ = ["measure"]

QUESTION = "Tell me a fun fact about cats."


async def measure(deadline: float, counts: tuple[int, ...] = (1, 2, 4, 8), turns: int = 2) -> str:
    env = {"PARLEY_LLM": "local", "PARLEY_TTS": "piper", "PARLEY_STT": "whisper"}
    rows = []
    with load.ServiceProcess("cloud", max(counts) + 2, env=env) as service:
        await service.wait_ready(timeout_s=600)
        at_rest = service.rss_mb()
        await load.run_load(service, 1, 1, QUESTION, deadline)  # warm-up: the first reply pays for loading
        warmed = service.rss_mb()
        for count in counts:
            if time.monotonic() > deadline:
                rows.append(f"| {count} | not run: --duration reached | | | | |")
                continue
            result = await load.run_load(service, count, turns, QUESTION, deadline)
            first = [t.first_audio_ms for t in result.turns]
            failed = len(result.errors) + sum(t.reason != "TURN_END_REASON_COMPLETED" for t in result.turns)
            rows.append(
                f"| {count} | {len(result.turns)} | {percentile(first, 50):.0f} ms | {percentile(first, 95):.0f} ms "
                f"| {result.rss_peak_mb:.0f} MB | {failed} |"
            )
    return "\n".join(
        [
            f"`python -m service` with its defaults (the embedded engines, one worker), {os.cpu_count()} cores. "
            f"Resident memory at rest, every model loaded: **{at_rest:.0f} MB**; after one warm-up reply "
            f"{warmed:.0f} MB. Then \u201c{QUESTION}\u201d asked on N streams at once (each after a ramp of 10 ms "
            f"per stream), {turns} turns each, driven by the Python load generator; first audio measured at the "
            "client from the question sent.",
            "",
            "| streams asking at once | turns | first audio p50 | p95 | RSS peak | failed |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
