"""The clients against a service with TLS and API keys (a CA made at test time by openssl): the CLI,
the Node client and grpcurl, each trusting the CA; without it, or without the key, they are refused."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.auth import KeyRing
from service.core.settings import SessionDefaults
from service.server import RunningServer, start_server
from service.servicer import StreamLimits
from service.tls import ServerCertificates
from tests.clients.test_grpcurl import GRPCURL
from tests.clients.test_node import NODE_CLIENT, installed  # noqa: F401 (the fixture)
from tests.conftest import run_process
from tests.fakes import FakeLLM, FakeTTS
from tests.service.test_tls import make_ca, make_cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (make system-deps)")

KEY = "tls-0123456789abcdefghijklmnopq"


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, Path, FakeLLM]]:
    ca = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "server", ca, server=True)
    llm = FakeLLM(reply="Safe and sound.")
    running = await start_server(
        llm,
        FakeTTS(),
        host="127.0.0.1",
        port=0,
        defaults=SessionDefaults(),
        limits=StreamLimits(),
        keys=KeyRing(None, f"tls:{KEY}"),
        tls=ServerCertificates(cert, key),
    )
    yield running, ca[0], llm
    await running.stop(0)


async def test_the_cli_over_tls_with_a_key(secured: tuple[RunningServer, Path, FakeLLM], tmp_path: Path) -> None:
    running, ca, llm = secured
    server = f"localhost:{running.port}"
    base = [sys.executable, "-m", "clients.cli", "--server", server, "--out", str(tmp_path / "r.wav")]
    code, stdout, stderr = await run_process(*base, "--ca-file", str(ca), "--token", KEY, "Hi?")
    assert code == 0 and stdout.strip() == llm.reply, stderr
    code, _, stderr = await run_process(*base, "--token", KEY, "Hi?")  # plaintext to a TLS port
    assert code == 1 and "error:" in stderr
    code, _, stderr = await run_process(*base, "--ca-file", str(ca), "Hi?")  # no key
    assert code == 1 and "it needs an API key" in stderr


async def test_the_node_client_over_tls(
    installed: Path,  # noqa: F811
    secured: tuple[RunningServer, Path, FakeLLM],
    tmp_path: Path,
) -> None:
    running, ca, llm = secured
    code, stdout, stderr = await run_process(
        "node",
        "client.js",
        "--server",
        f"localhost:{running.port}",
        "--ca-file",
        str(ca),
        "--token",
        KEY,
        "--out",
        str(tmp_path / "n.wav"),
        "Hi?",
        cwd=NODE_CLIENT,
    )
    assert code == 0 and stdout.strip() == llm.reply, stderr


@pytest.mark.skipif(GRPCURL is None, reason="no grpcurl binary for this platform")
async def test_grpcurl_over_tls(secured: tuple[RunningServer, Path, FakeLLM]) -> None:
    running, ca, _ = secured
    assert GRPCURL is not None
    address = f"localhost:{running.port}"
    for extra, expect in (
        (["-H", f"authorization: Bearer {KEY}"], 0),
        ([], 1),  # reflection needs the key too
    ):
        process = await asyncio.create_subprocess_exec(
            GRPCURL,
            "-cacert",
            str(ca),
            *extra,
            address,
            "list",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert (process.returncode == 0) == (expect == 0), err.decode()
        if expect == 0:
            assert "parley.v1.VoiceService" in out.decode()
        else:
            assert "Unauthenticated" in err.decode() or "UNAUTHENTICATED" in err.decode()
