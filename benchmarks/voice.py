"""Voice to voice on the embedded engines, through the real gRPC path on loopback: each question of
``benchmarks.embedded.PROMPTS`` said by espeak-ng (a voice other than the reply's Piper voice),
streamed in real time in 20 ms chunks and followed by silence, through Silero VAD, Whisper, the local
LLM and Piper. Measured at the client: from the last speech sample sent to the first reply audio
message, and to ``speech_stopped``; from ``TurnEnded.timings``: the server's parts; and the word
error rate of each final transcript against the question."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from benchmarks.embedded import PROMPTS
from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.config import Settings
from service.core.settings import SessionDefaults
from service.engines.factory import load_engines, load_voice_input
from service.server import start_server
from service.servicer import StreamLimits

RATE = 16000
CHUNK_BYTES = RATE * 2 // 50  # 20 ms of PCM16
LEAD_S = 0.5  # silence before the question
SPEECH_THRESHOLD = 500  # |sample| above this is speech (PCM16), for finding the last speech sample
TURN_TIMEOUT_S = 60.0


@dataclass
class VoiceTurn:
    prompt: str
    transcript: str
    wer: float
    speech_s: float
    end_to_first_audio_ms: float  # client: last speech sample sent -> first reply audio received
    end_detection_ms: float  # client: last speech sample sent -> speech_stopped received
    server_end_to_first_audio_ms: int
    transcription_ms: int
    first_llm_token_ms: int
    first_audio_ms: int
    reason: str


@dataclass
class VoiceResult:
    speaker: str  # which voice said the questions
    turns: list[VoiceTurn]
    notes: list[str]
    without_tentative: list[VoiceTurn] = field(default_factory=list)  # the same, no reply prepared in pauses


def words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes inside words kept)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).replace(" '", " ").split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return float(bool(hyp))
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / len(ref)


def ensure_espeak() -> str | None:
    """The espeak-ng executable, installed with apt-get when missing and running as root; else None."""
    found = shutil.which("espeak-ng")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "espeak-ng"]):
        if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
            return None
    return shutil.which("espeak-ng")


def _resample(pcm: bytes, native: int) -> bytes:
    if native == RATE:
        return pcm
    import soxr

    return soxr.resample(np.frombuffer(pcm, dtype="<i2"), native, RATE).astype("<i2").tobytes()


def espeak_pcm(executable: str, text: str, folder: Path) -> bytes:
    """``text`` said by espeak-ng (US English), written as a WAV, read back as 16 kHz PCM16."""
    path = folder / "question.wav"
    subprocess.run([executable, "-v", "en-us", "-s", "160", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return _resample(wav.readframes(wav.getnframes()), wav.getframerate())


async def piper_pcm(text: str) -> bytes:
    from service.engines.piper_tts import PiperOptions, PiperTTS, default_voice_path

    tts = PiperTTS(PiperOptions(default_voice_path()))
    try:
        chunks = [a async for a in tts.synthesize(text, tts.default_voice)]
    finally:
        await tts.aclose()
    return _resample(b"".join(a.pcm for a in chunks), chunks[0].sample_rate_hz)


def last_speech_byte(pcm: bytes) -> int:
    """The byte offset just past the last sample louder than the threshold."""
    loud = np.flatnonzero(np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32)) > SPEECH_THRESHOLD)
    return (int(loud[-1]) + 1) * 2 if loud.size else len(pcm)


async def questions(count: int, notes: list[str]) -> tuple[str, list[bytes]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    executable = await asyncio.to_thread(ensure_espeak)
    if executable:
        with tempfile.TemporaryDirectory(prefix="parley-voice-") as folder:
            pcms = [await asyncio.to_thread(espeak_pcm, executable, p, Path(folder)) for p in prompts]
        return "espeak-ng en-us", pcms
    notes.append("espeak-ng could not be had: the questions are in Piper's en_US-joe-medium, the reply's own voice")
    return "Piper en_US-joe-medium (fallback: espeak-ng missing)", [await piper_pcm(p) for p in prompts]


async def measure(count: int = 10) -> VoiceResult:
    notes: list[str] = []
    speaker, pcms = await questions(count, notes)
    settings = Settings(_cli_parse_args=False)  # type: ignore[call-arg]
    llm, tts = await asyncio.to_thread(load_engines, settings)
    ears = await asyncio.to_thread(load_voice_input, settings)
    if ears is None:
        raise RuntimeError("voice input is off (PARLEY_STT=none)")
    running = await start_server(
        llm,
        tts,
        host="127.0.0.1",
        port=0,
        defaults=SessionDefaults(),
        limits=StreamLimits(),
        voice_input=ears,
    )
    turns: list[VoiceTurn] = []
    without: list[VoiceTurn] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)
            # Warm-up (not counted): the first turn pays for lazy loading in Whisper and the LLM.
            await _ask(stub, PROMPTS[0], pcms[0])
            for i, pcm in enumerate(pcms):
                turns.append(await _ask(stub, PROMPTS[i % len(PROMPTS)], pcm))
                without.append(await _ask(stub, PROMPTS[i % len(PROMPTS)], pcm, tentative=False))
    finally:
        await running.stop(0)
        await llm.aclose()
        await tts.aclose()
    return VoiceResult(speaker, turns, notes, without)


async def _ask(stub: voice_pb2_grpc.VoiceServiceStub, prompt: str, pcm: bytes, *, tentative: bool = True) -> VoiceTurn:
    """One session: the question streamed in real time, then silence until the turn ends.
    ``tentative``: the server's default; else no reply is prepared during a pause."""
    call = stub.Converse()
    listen = pb.InputAudio(sample_rate_hz=RATE)
    if not tentative:
        listen.turn_detection.tentative_silence_ms = 0
    await call.write(pb.ConverseRequest(start=pb.Start(input_audio=listen)))
    await call.read()
    lead = b"\x00\x00" * int(RATE * LEAD_S)
    audio = lead + pcm
    speech_end_byte = len(lead) + last_speech_byte(pcm)
    speech_sent = stopped = first_audio = 0.0
    transcript = ""
    ended: pb.TurnEnded | None = None
    done = asyncio.Event()

    async def read() -> None:
        nonlocal stopped, first_audio, transcript, ended
        while (response := await call.read()) is not grpc.aio.EOF:
            kind = response.WhichOneof("kind")
            now = time.monotonic()
            if kind == "speech_stopped" and not stopped:
                stopped = now
            elif kind == "transcript" and response.transcript.is_final:
                transcript = response.transcript.text
            elif kind == "audio" and not first_audio:
                first_audio = now
            elif kind == "turn_ended":
                ended = response.turn_ended
                done.set()
                return
        done.set()

    reader = asyncio.create_task(read())
    try:
        began, i = time.monotonic(), 0
        give_up = began + len(audio) / 2 / RATE + TURN_TIMEOUT_S
        while not done.is_set() and time.monotonic() < give_up:
            offset = i * CHUNK_BYTES
            chunk = audio[offset : offset + CHUNK_BYTES] if offset < len(audio) else b""
            chunk = chunk.ljust(CHUNK_BYTES, b"\x00")  # silence after the question
            await call.write(pb.ConverseRequest(user_audio=pb.UserAudio(data=chunk)))
            if offset < speech_end_byte <= offset + CHUNK_BYTES:
                speech_sent = time.monotonic()
            i += 1
            await asyncio.sleep(max(0.0, began + i * 0.02 - time.monotonic()))
    finally:
        call.cancel()
        reader.cancel()
    t = ended.timings if ended is not None else pb.TurnTimings()

    def since_speech(moment: float) -> float:
        return (moment - speech_sent) * 1000 if moment and speech_sent else float("nan")

    return VoiceTurn(
        prompt=prompt,
        transcript=transcript,
        wer=word_error_rate(prompt, transcript),
        speech_s=last_speech_byte(pcm) / 2 / RATE,
        end_to_first_audio_ms=since_speech(first_audio),
        end_detection_ms=since_speech(stopped),
        server_end_to_first_audio_ms=t.speech_end_to_first_audio_ms,
        transcription_ms=t.transcription_ms,
        first_llm_token_ms=t.first_llm_token_ms,
        first_audio_ms=t.first_audio_ms,
        reason=pb.TurnEndReason.Name(ended.reason) if ended is not None else "NO_TURN_ENDED",
    )
