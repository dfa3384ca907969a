"""Time to first audio on the embedded engines, through the real gRPC path on loopback.

    python -m benchmarks.first_audio [--turns N] [--rate HZ]

Starts the service in-process on the default engines (Gemma 3 270M, Piper joe), asks a set of varied
short questions one after another on one stream, and prints per-turn timings and their p50/p95.
It stops by itself after the turns are done.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time

import grpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.config import Settings
from service.core.session import SessionDefaults
from service.engines.factory import load_engines
from service.server import start_server
from service.servicer import StreamLimits

PROMPTS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Tell me a fun fact about cats.",
    "What should I cook for dinner tonight?",
    "How far away is the moon?",
    "Can you recommend a good book?",
    "What is the best way to learn to swim?",
    "How do plants make food?",
    "Say something nice about Mondays.",
]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(turns: int, rate: int) -> None:
    llm, tts = await asyncio.to_thread(load_engines, Settings(_cli_parse_args=False))  # type: ignore[call-arg]
    running = await start_server(llm, tts, host="127.0.0.1", port=0, defaults=SessionDefaults(), limits=StreamLimits())
    rows = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).Converse()
        await call.write(pb.ConverseRequest(start=pb.Start(audio=pb.AudioFormat(sample_rate_hz=rate))))
        await call.read()
        for i in range(turns):
            prompt = PROMPTS[i % len(PROMPTS)]
            began = time.perf_counter()
            await call.write(pb.ConverseRequest(user_text=pb.UserText(text=prompt)))
            tokens = 0
            while True:
                response = await call.read()
                kind = response.WhichOneof("kind")
                if kind == "text_delta":
                    tokens += 1
                elif kind == "turn_ended":
                    ended = response.turn_ended
                    break
            wall_ms = (time.perf_counter() - began) * 1000
            t = ended.timings
            rows.append((prompt, t, tokens, wall_ms))
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
    await running.server.stop(0)
    await llm.aclose()
    await tts.aclose()
    report(rows, rate)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def report(rows: list, rate: int) -> None:
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    print(f"output: PCM16 at {rate} Hz; {len(rows)} turns, one stream, sequential\n")
    print(f"{'prompt':40} {'token':>6} {'segment':>8} {'audio':>6} {'total':>6} {'speech':>7}")
    for prompt, t, _, _ in rows:
        print(
            f"{prompt[:40]:40} {t.first_llm_token_ms:6} {t.first_segment_ms:8} {t.first_audio_ms:6} "
            f"{t.total_ms:6} {t.audio_duration_ms / 1000:6.1f}s"
        )
    for name, values in (
        ("first LLM token ms", [t.first_llm_token_ms for _, t, _, _ in rows]),
        ("first segment ms", [t.first_segment_ms for _, t, _, _ in rows]),
        ("first audio ms", [t.first_audio_ms for _, t, _, _ in rows]),
        ("total ms", [t.total_ms for _, t, _, _ in rows]),
    ):
        print(f"{name:20} p50 {statistics.median(values):7.0f}   p95 {percentile(values, 95):7.0f}")
    speech_s = sum(t.audio_duration_ms for _, t, _, _ in rows) / 1000
    busy_s = sum(t.total_ms for _, t, _, _ in rows) / 1000
    print(f"speech produced {speech_s:.1f} s in {busy_s:.1f} s of turns (whole turn, LLM and TTS together)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first_audio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rate", type=int, default=22050)
    args = parser.parse_args()
    asyncio.run(run(args.turns, args.rate))


if __name__ == "__main__":
    main()
