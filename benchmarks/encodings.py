"""Output encodings beside PCM16, on the embedded Piper voice through gRPC on loopback.

Each round reads the same sentences aloud (``speak_text``, no LLM: the encoding's cost is not
hidden behind the LLM's) once per encoding, the encodings in a rotating order; per encoding: time
from the request to the first audio message (p50/p95), bytes per second of speech, and, timed in
process apart from the service, the encoder's CPU per second of speech (Piper's audio fed in the
service's 200 ms pieces)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import grpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.config import Settings
from service.core.audio import AudioFormat, Encoding
from service.core.codecs import CodecOptions, output_rate, stream_encoder
from service.core.settings import SessionDefaults
from service.engines.factory import load_engines
from service.server import start_server
from service.servicer import StreamLimits

SENTENCES = [
    "The library opens at nine in the morning.",
    "Please bring your green card and a pen.",
    "Trains to the airport leave every twenty minutes.",
    "It will be sunny this afternoon, with a light breeze from the west.",
    "Your order has shipped and should arrive on Friday.",
]
ENCODINGS = [
    ("PCM16", pb.AUDIO_ENCODING_PCM16, Encoding.PCM16),
    ("OGG_OPUS", pb.AUDIO_ENCODING_OGG_OPUS, Encoding.OGG_OPUS),
    ("MP3", pb.AUDIO_ENCODING_MP3, Encoding.MP3),
    ("MULAW", pb.AUDIO_ENCODING_MULAW, Encoding.MULAW),
    ("ALAW", pb.AUDIO_ENCODING_ALAW, Encoding.ALAW),
]


@dataclass
class EncodingResult:
    name: str
    rate: int = 0
    first_audio_ms: list[float] = field(default_factory=list)
    audio_bytes: int = 0
    audio_ms: float = 0.0
    cpu_ms_per_s: float = 0.0


async def measure(rounds: int = 4) -> str:
    settings = Settings(_cli_parse_args=False)  # type: ignore[call-arg]
    llm, tts = await asyncio.to_thread(load_engines, settings)
    running = await start_server(llm, tts, host="127.0.0.1", port=0, defaults=SessionDefaults(), limits=StreamLimits())
    results = {name: EncodingResult(name) for name, _, _ in ENCODINGS}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)
            await _turn(stub, pb.AUDIO_ENCODING_PCM16, SENTENCES[0], EncodingResult("warm-up"))
            for r in range(rounds):
                order = ENCODINGS[r % len(ENCODINGS) :] + ENCODINGS[: r % len(ENCODINGS)]
                for sentence in SENTENCES:
                    for name, proto, _ in order:
                        await _turn(stub, proto, sentence, results[name])
        native = tts.voices()[0].sample_rate_hz
        pcm = b"".join([chunk.pcm async for chunk in tts.synthesize(" ".join(SENTENCES), tts.default_voice)])
        for name, _, encoding in ENCODINGS:
            results[name].cpu_ms_per_s = _encoder_cpu(encoding, pcm, native)
    finally:
        await running.server.stop(0)
        await llm.aclose()
        await tts.aclose()
    return _table(list(results.values()), rounds)


async def _turn(
    stub: voice_pb2_grpc.VoiceServiceStub, encoding: pb.AudioEncoding, text: str, result: EncodingResult
) -> None:
    call = stub.Converse()
    await call.write(pb.ConverseRequest(start=pb.Start(audio=pb.AudioFormat(encoding=encoding))))
    started = await call.read()
    result.rate = started.session_started.audio.sample_rate_hz
    began = time.perf_counter()
    await call.write(pb.ConverseRequest(speak_text=pb.SpeakText(text=text, flush=True)))
    first = None
    while (response := await call.read()) is not grpc.aio.EOF:
        kind = response.WhichOneof("kind")
        if kind == "audio":
            if first is None:
                first = (time.perf_counter() - began) * 1000
            result.audio_bytes += len(response.audio.data)
            result.audio_ms += response.audio.duration_ms
        elif kind == "turn_ended":
            break
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass
    if first is not None:
        result.first_audio_ms.append(first)


def _encoder_cpu(encoding: Encoding, pcm: bytes, native: int) -> float:
    """The encoder's CPU per second of speech (ms), the voice's audio at the encoding's rate, in 200 ms
    pieces (resampled first, apart from the timing, as the service does before encoding)."""
    import numpy as np
    import soxr

    rate = output_rate(encoding, 0, native)
    samples = np.frombuffer(pcm, dtype="<i2")
    if rate != native:
        samples = soxr.resample(samples, native, rate).astype("<i2")
    step = rate // 5
    pieces = [samples[i : i + step].tobytes() for i in range(0, len(samples), step)]
    best = float("inf")
    for _ in range(3):
        encoder = stream_encoder(AudioFormat(encoding, rate), CodecOptions())
        began = time.process_time()
        for piece in pieces:
            encoder.encode(piece)
        encoder.finish()
        best = min(best, time.process_time() - began)
    return best * 1000 / (len(samples) / rate)


def _table(results: list[EncodingResult], rounds: int) -> str:
    pcm = statistics.median(results[0].first_audio_ms)

    def pct(values: list[float], q: int) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    rows = [
        f"{len(SENTENCES)} sentences read aloud (`speak_text`, Piper en_US-joe-medium, no LLM), {rounds} rounds, "
        "each sentence once per encoding in a rotating order; one session per turn; first audio = request sent "
        "→ first `audio` message at the client. Encoder CPU: the encoder alone on the same sentences, 200 ms "
        "pieces, best of 3 (process time).",
        "",
        "| encoding | rate | first audio p50 | p95 | vs PCM16 p50 | bytes per second of speech | encoder CPU per s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p50 = statistics.median(r.first_audio_ms)
        per_s = r.audio_bytes / (r.audio_ms / 1000) if r.audio_ms else 0.0
        rows.append(
            f"| {r.name} | {r.rate} Hz | {p50:.0f} ms | {pct(r.first_audio_ms, 95):.0f} ms | {p50 - pcm:+.1f} ms "
            f"| {per_s:,.0f} B | {r.cpu_ms_per_s:.2f} ms |"
        )
    return "\n".join(rows)
