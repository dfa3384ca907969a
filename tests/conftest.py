"""Shared fixtures: a real grpc.aio server on 127.0.0.1 with fake engines, and a client stub."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.auth import KeyRing
from service.core.hearing import VoiceInput
from service.core.outbox import OutboxLimits
from service.core.quotas import QuotaLimits
from service.core.settings import SessionDefaults
from service.core.store import SessionStore
from service.logs import Throttled
from service.server import RunningServer, start_server
from service.servicer import StreamLimits
from tests.fakes import FakeDetector, FakeLLM, FakeSTT, FakeTTS


@dataclass
class Harness:
    """A running server with fake engines, and a channel to it."""

    llm: FakeLLM
    tts: FakeTTS
    running: RunningServer
    channel: grpc.aio.Channel
    stt: FakeSTT | None = None
    stub: voice_pb2_grpc.VoiceServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = voice_pb2_grpc.VoiceServiceStub(self.channel)


async def start_harness(
    llm: FakeLLM | None = None,
    tts: FakeTTS | None = None,
    *,
    defaults: SessionDefaults | None = None,
    limits: StreamLimits | None = None,
    store: SessionStore | None = None,
    stt: FakeSTT | None = None,
    detector: FakeDetector | None = None,
    keys: KeyRing | None = None,
    open_reflection: bool = False,
    token_secret: str = "",
    quotas: QuotaLimits | None = None,
    metrics_port: int | None = None,
    port: int = 0,
    share_port: bool = False,
    keepalive_s: float = 0.0,
) -> Harness:
    """A server with fake engines; with ``share_port``, one of several on ``port`` (as workers are)."""
    llm = llm or FakeLLM()
    tts = tts or FakeTTS()
    voice_input = VoiceInput(detector or FakeDetector(), stt) if stt is not None else None
    running = await start_server(
        llm,
        tts,
        host="127.0.0.1",
        port=port,
        defaults=defaults or SessionDefaults(outbox=OutboxLimits(max_message_ms=100)),
        limits=limits or StreamLimits(),
        store=store,
        voice_input=voice_input,
        keys=keys,
        open_reflection=open_reflection,
        token_secret=token_secret,
        quotas=quotas,
        metrics_port=metrics_port,
        share_port=share_port,
        keepalive_s=keepalive_s,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Harness(llm, tts, running, channel, stt)


async def stop_harness(harness: Harness) -> None:
    await harness.channel.close()
    await harness.running.stop(0)
    await harness.llm.aclose()
    await harness.tts.aclose()


@pytest.fixture(autouse=True)
def unthrottled_logs() -> None:
    """Each test sees the lines it causes: lines anyone may cause at will are throttled per process."""
    Throttled.reset_all()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = await start_harness()
    yield h
    await stop_harness(h)


def start(**kwargs: object) -> pb.ConverseRequest:
    return pb.ConverseRequest(start=pb.Start(**kwargs))  # type: ignore[arg-type]


def user(text: str, turn_id: str = "") -> pb.ConverseRequest:
    return pb.ConverseRequest(user_text=pb.UserText(text=text, turn_id=turn_id))


def speak(text: str, flush: bool = False) -> pb.ConverseRequest:
    return pb.ConverseRequest(speak_text=pb.SpeakText(text=text, flush=flush))


def interrupt(played_ms: int | None = None) -> pb.ConverseRequest:
    if played_ms is None:
        return pb.ConverseRequest(interrupt=pb.Interrupt())
    return pb.ConverseRequest(interrupt=pb.Interrupt(played_ms=played_ms))


async def converse_all(
    stub: voice_pb2_grpc.VoiceServiceStub, requests: Iterable[pb.ConverseRequest]
) -> list[pb.ConverseResponse]:
    """Once the service has accepted the stream (or refused it), send the requests, half-close, and
    collect every response until the stream ends. (A write that finds the call over would report
    INTERNAL instead of the service's status: see the README's contract.)"""
    pending = list(requests)

    async def sending() -> AsyncIterator[pb.ConverseRequest]:
        await call.initial_metadata()
        for request in pending:
            if call.done():
                return
            yield request

    call = stub.Converse(sending())
    return [response async for response in call]


def kinds(responses: list[pb.ConverseResponse]) -> list[str]:
    return [r.WhichOneof("kind") for r in responses]


def turn_ends(responses: list[pb.ConverseResponse]) -> list[pb.TurnEnded]:
    return [r.turn_ended for r in responses if r.WhichOneof("kind") == "turn_ended"]


async def wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is true."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polls state owned by other tasks
            await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server (Debian's package) on a free loopback port, for the whole test run."""
    import shutil
    import socket
    import time

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server as root)")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


ROOT = Path(__file__).resolve().parent.parent


async def serve_converse(handler: Any) -> tuple[grpc.aio.Server, int]:
    """A bare gRPC server on loopback whose ``Converse`` is ``handler`` (raw bytes in and out: a
    stand-in service that misbehaves as a test needs), started; it and its port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "parley.v1.VoiceService", {"Converse": grpc.stream_stream_rpc_method_handler(handler)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def free_port() -> int:
    """A port nothing listens on (at the moment of asking) on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_process(
    *argv: str, cwd: Path = ROOT, timeout_s: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run a command to its end; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()  # a test that failed this way leaves nothing running
        out, err = await process.communicate()
        raise AssertionError(f"{argv[0]} still ran after {timeout_s:g} s:\n{out.decode()}{err.decode()}") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def start_service_process(environ: dict[str, str] | None = None, **settings: str) -> subprocess.Popen[str]:
    """``python -m service`` with ``PARLEY_<NAME>`` settings, its log on stdout; in ``environ`` if given
    (else this process's environment)."""
    base = os.environ if environ is None else environ
    env = {**base, **{f"PARLEY_{name.upper()}": value for name, value in settings.items()}}
    return subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_listening(process: subprocess.Popen[str], timeout_s: float = 120) -> str:
    """Read the service's log until it listens; the log so far."""
    import time

    assert process.stdout is not None
    log, deadline = "", time.monotonic() + timeout_s
    while "listening" not in log:
        assert time.monotonic() < deadline, log
        line = process.stdout.readline()
        assert line, f"the service exited:\n{log}"
        log += line
    return log


async def rejection(stub: object, requests: list[pb.ConverseRequest]) -> grpc.aio.AioRpcError:
    """Send ``requests`` (the last one is the bad one) and return the error that ends the stream.

    It never writes after the server may have ended the call: grpc aio can then report INTERNAL in
    place of the server's status (grpc/grpc#36066), which would hide what is being tested.
    """
    call = stub.Converse()  # type: ignore[attr-defined]
    await call.initial_metadata()  # accepted, or refused (a stream over the limit)
    for request in requests:
        if call.done():
            break
        await call.write(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await call.read() is not grpc.aio.EOF:
            pass
    return caught.value


if os.environ.get("PARLEY_TEST_EVENT_LOOP") == "uvloop":
    # The in-process tests run on asyncio's loop; PARLEY_TEST_EVENT_LOOP=uvloop runs them on the service's
    # default loop instead (the tests that start ``python -m service`` run on it anyway).
    import uvloop

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
        return {"uvloop": uvloop.new_event_loop}
