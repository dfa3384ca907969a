"""The Node.js example client (clients/node), installed with npm from its lock file and run against
a live service: captions on stdout, a WAV file with the right header, rate and sound."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Harness, free_port, run_process

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="Node.js and npm are not installed"
)


@pytest.fixture(scope="module")
def installed() -> Path:
    """``npm ci``: exactly the versions in package-lock.json."""
    result = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return NODE_CLIENT


async def run_node(*args: str) -> tuple[int, str, str]:
    return await run_process("node", "client.js", *args, cwd=NODE_CLIENT)


async def test_node_client_asks_and_writes_a_wav(installed: Path, harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "node.wav"
    code, stdout, stderr = await run_node(
        "--server", f"127.0.0.1:{harness.running.port}", "--out", str(out), "--rate", "24000", "What is up?"
    )
    assert code == 0, stderr
    assert stdout.strip() == harness.llm.reply
    assert "[completed: first token" in stderr and "first audio" in stderr
    raw = out.read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:16] == b"WAVEfmt " and raw[36:40] == b"data"
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    expected_ms = sum(harness.tts.duration_ms(t) for t in harness.tts.texts)
    assert len(samples) == pytest.approx(expected_ms * 24, rel=0.01)
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 1000  # not silence


async def test_node_client_reports_a_missing_service(installed: Path) -> None:
    code, _, stderr = await run_node("--server", f"127.0.0.1:{free_port()}", "Hello?")
    assert code == 1
    assert "UNAVAILABLE" in stderr and "is the service running?" in stderr


def no_stack_trace(stderr: str) -> bool:
    return not any(line.lstrip().startswith("at ") for line in stderr.splitlines()) and "node:internal" not in stderr


async def test_node_client_copied_out_of_the_repository(installed: Path, harness: Harness, tmp_path: Path) -> None:
    """client.js and package.json copied elsewhere (their dependencies installed there): --protos finds
    the contract, as a folder or as the file; without it the client says what to pass."""
    copy = tmp_path / "mine"
    copy.mkdir()
    for name in ("client.js", "package.json"):
        shutil.copy(NODE_CLIENT / name, copy / name)
    (copy / "node_modules").symlink_to(installed / "node_modules")  # stands in for `npm ci` in the copy
    protos = tmp_path / "contract"
    (protos / "parley" / "v1").mkdir(parents=True)
    shutil.copy(NODE_CLIENT.parents[1] / "protos" / "parley" / "v1" / "voice.proto", protos / "parley" / "v1")
    server = f"127.0.0.1:{harness.running.port}"

    code, _, stderr = await run_process("node", "client.js", "--server", server, "Hi?", cwd=copy)
    assert code == 2 and no_stack_trace(stderr), stderr
    assert "cannot find" in stderr and "pass --protos with the folder that holds parley/v1/voice.proto" in stderr

    for contract in (protos, protos / "parley" / "v1" / "voice.proto"):
        out = tmp_path / "reply.wav"
        code, stdout, stderr = await run_process(
            "node", "client.js", "--protos", str(contract), "--server", server, "--out", str(out), "Hi", cwd=copy
        )
        assert code == 0, stderr
        assert stdout.strip() == harness.llm.reply and out.read_bytes()[:4] == b"RIFF"
        out.unlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", "Hi?"], "error: Unknown option '--bogus'"),
        (["--rate"], "error: Option '--rate <value>' argument missing"),
        (["--rate", "fast", "Hi?"], "error: --rate fast is not a sample rate"),
        ([], "error: give the question to ask"),
    ],
)
async def test_node_client_usage_errors(installed: Path, args: list[str], message: str) -> None:
    code, stdout, stderr = await run_node(*args)
    assert code == 2 and stdout == ""
    assert stderr.startswith("usage: node client.js [options] QUESTION...")
    assert stderr.strip().splitlines()[-1].startswith(message)
    assert no_stack_trace(stderr), stderr


async def test_node_client_help(installed: Path) -> None:
    for flag in ("--help", "-h"):
        code, stdout, stderr = await run_node(flag)
        assert code == 0 and stderr == ""
        assert stdout.startswith("usage: node client.js [options] QUESTION...") and "--protos PATH" in stdout


async def test_node_client_asks_for_ogg_opus_and_writes_the_file(
    installed: Path, harness: Harness, tmp_path: Path
) -> None:
    import av

    out = tmp_path / "node.ogg"
    code, _, stderr = await run_node(
        "--server", f"127.0.0.1:{harness.running.port}", "--encoding", "ogg_opus", "--out", str(out), "Hi?"
    )
    assert code == 0, stderr
    with av.open(str(out)) as stream:
        seconds = sum(frame.samples for frame in stream.decode(audio=0)) / stream.streams.audio[0].rate
    spoken_s = sum(harness.tts.duration_ms(t) for t in harness.tts.texts) / 1000
    assert spoken_s <= seconds <= spoken_s + 0.15


async def test_node_client_sends_its_token(installed: Path, tmp_path: Path) -> None:
    from service.auth import KeyRing
    from tests.conftest import start_harness, stop_harness

    key = "node-0123456789abcdefghijklmnop"
    h = await start_harness(keys=KeyRing(None, f"node:{key}"))
    try:
        server = f"127.0.0.1:{h.running.port}"
        code, _, stderr = await run_node("--server", server, "--out", str(tmp_path / "a.wav"), "Hi?")
        assert code == 1 and "UNAUTHENTICATED" in stderr, stderr
        code, stdout, stderr = await run_node(
            "--server", server, "--token", key, "--out", str(tmp_path / "b.wav"), "Hi?"
        )
        assert code == 0 and stdout.strip() == h.llm.reply, stderr
    finally:
        await stop_harness(h)
