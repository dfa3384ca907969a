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
