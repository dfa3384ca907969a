"""The embedded engines on this machine, through the real gRPC path on loopback: ten varied short
questions on the default local LLM and Piper voice, one after another on one stream."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.config import Settings
from service.core.normalizer import speakable
from service.core.settings import SessionDefaults
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


@dataclass
class EmbeddedTurn:
    prompt: str
    first_token_ms: int
    first_audio_ms: int
    total_ms: int
    audio_s: float
    tokens: int
    tokens_per_s: float
    tts_rtf: float
    reply: str


async def measure(turns: int = 10) -> list[EmbeddedTurn]:
    """Ask ``turns`` questions; then time Piper alone on each reply for its real-time factor."""
    settings = Settings(_cli_parse_args=False)  # type: ignore[call-arg]
    llm, tts = await asyncio.to_thread(load_engines, settings)
    running = await start_server(llm, tts, host="127.0.0.1", port=0, defaults=SessionDefaults(), limits=StreamLimits())
    rows: list[EmbeddedTurn] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = voice_pb2_grpc.VoiceServiceStub(channel).Converse()
            await call.write(pb.ConverseRequest(start=pb.Start()))
            await call.read()
            for i in range(turns):
                rows.append(await _ask(call, PROMPTS[i % len(PROMPTS)]))
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        for row in rows:
            row.tts_rtf = await _real_time_factor(tts, row.reply)
    finally:
        await running.server.stop(0)
        await llm.aclose()
        await tts.aclose()
    return rows


async def _ask(call: grpc.aio.StreamStreamCall, prompt: str) -> EmbeddedTurn:
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text=prompt)))
    first_delta = last_delta = 0.0
    text = ""
    while True:
        response = await call.read()
        kind = response.WhichOneof("kind")
        if kind == "text_delta":
            last_delta = time.perf_counter()
            first_delta = first_delta or last_delta
            text += response.text_delta.text
        elif kind == "turn_ended":
            ended = response.turn_ended
            break
    t = ended.timings
    tokens = ended.usage.completion_tokens
    span = last_delta - first_delta
    return EmbeddedTurn(
        prompt,
        t.first_llm_token_ms,
        t.first_audio_ms,
        t.total_ms,
        t.audio_duration_ms / 1000,
        tokens,
        (tokens - 1) / span if span > 0 and tokens > 1 else float("nan"),
        float("nan"),
        text.strip(),
    )


async def _real_time_factor(tts: object, text: str) -> float:
    """Seconds Piper takes per second of audio it makes, for one reply."""
    began = time.perf_counter()
    samples, rate = 0, 1
    async for audio in tts.synthesize(speakable(text), tts.default_voice):  # type: ignore[attr-defined]
        samples += len(audio.pcm) // 2
        rate = audio.sample_rate_hz
    return (time.perf_counter() - began) / (samples / rate) if samples else float("nan")
