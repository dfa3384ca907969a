"""The WebSocket bridge: a real service and bridge on loopback, a real WebSocket client."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from tests.conftest import Harness, free_port, serve_converse, start_harness, stop_harness, wait_for
from tests.fakes import FakeLLM, FakeTTS
from ws_bridge.calls import accepted_write, answered
from ws_bridge.server import Bridge, BridgeOptions

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    harness: Harness
    bridge: Bridge

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.bridge.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.bridge.port}"


async def start_stack(harness: Harness, **options: Any) -> Stack:
    bridge = await Bridge(
        BridgeOptions(grpc_target=f"127.0.0.1:{harness.running.port}", host="127.0.0.1", port=0, **options)
    ).start()
    return Stack(harness, bridge)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    harness = await start_harness(
        FakeLLM(reply="Right, here is a reply. " + "It goes on for a while. " * 12, token_s=0.01),
        FakeTTS(chunk_s=0.02),
    )
    s = await start_stack(harness)
    yield s
    await s.bridge.aclose()
    await stop_harness(harness)


def parse_audio(frame: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", frame[:4])
    header = json.loads(frame[4 : 4 + length])
    assert set(header) == {"turnId", "segmentIndex", "sequence", "durationMs"}  # the AudioChunk without its data
    return header, frame[4 + length :]


async def until_turn_ended(ws: ClientConnection) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], bytes]]]:
    texts: list[dict[str, Any]] = []
    audio: list[tuple[dict[str, Any], bytes]] = []
    while True:
        frame = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(frame, bytes):
            audio.append(parse_audio(frame))
            continue
        message = json.loads(frame)
        texts.append(message)
        if "turnEnded" in message:
            return texts, audio


async def test_full_turn_through_the_bridge(stack: Stack) -> None:
    async with connect(stack.url) as ws:
        await ws.send(json.dumps({"start": {"audio": {"encoding": "AUDIO_ENCODING_PCM16", "sampleRateHz": 24000}}}))
        started = json.loads(await ws.recv())
        assert started["sessionStarted"]["audio"]["sampleRateHz"] == 24000
        await ws.send(json.dumps({"userText": {"text": "Hello?", "turnId": "b1"}}))
        texts, audio = await until_turn_ended(ws)
        ended = texts[-1]["turnEnded"]
        assert ended["reason"] == "TURN_END_REASON_COMPLETED" and ended["turnId"] == "b1"
        captions = "".join(m["textDelta"]["text"] for m in texts if "textDelta" in m)
        assert captions == stack.harness.llm.reply
        segments = [m["segment"] for m in texts if "segment" in m]
        assert segments[0]["index"] == 0 and segments[0]["startMs"] == "0"  # defaults are sent, int64 as strings
        # Binary frames carry their turn, segment and a gap-free sequence.
        assert [int(h["sequence"]) for h, _ in audio] == list(range(len(audio)))
        assert {h["turnId"] for h, _ in audio} == {"b1"}
        pcm = b"".join(data for _, data in audio)
        expected_ms = sum(stack.harness.tts.duration_ms(t) for t in stack.harness.tts.texts)
        assert len(pcm) / 2 / 24 == pytest.approx(expected_ms, rel=0.01)


async def test_interrupt_through_the_bridge(stack: Stack) -> None:
    async with connect(stack.url) as ws:
        await ws.send(json.dumps({"start": {}}))
        await ws.recv()
        await ws.send(json.dumps({"userText": {"text": "Talk."}}))
        while not isinstance(await ws.recv(), bytes):
            pass
        await ws.send(json.dumps({"interrupt": {"playedMs": 100}}))
        texts, _ = await until_turn_ended(ws)
        assert texts[-1]["turnEnded"]["reason"] == "TURN_END_REASON_INTERRUPTED"
        await wait_for(lambda: stack.harness.llm.cancelled == 1 and stack.harness.llm.open_streams == 0)


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        ("{not json", 1008, "not a ConverseRequest"),
        ('{"start": {}, "bogus": 1}', 1008, "bogus"),
        ('{"userText": {"text": 5}}', 1008, "not a ConverseRequest"),
        (b"\x00\x01binary", 1008, "start.input_audio"),  # voice, on a session opened without voice input
        ('{"speakText": {"text": "' + "x" * 140_000 + '"}}', 1009, ""),
        ('{"userAudio": {"data": "!!!"}}', 1008, "not base64"),  # (protobuf's parser made it no audio)
        ('{"user_audio": {"data": "AQI=AQI="}}', 1008, "not base64"),  # (it kept the first half)
        ('{"userAudio": {"data": "AAAA+/-_"}}', 1008, "mixes the two alphabets"),  # (found in QA)
        ("[1, 2]", 1008, "a message is a JSON object"),  # (protobuf's words were Python's: "got 'int'")
        ("null", 1008, "a message is a JSON object"),  # ("TypeError: 'NoneType' object is not iterable")
        (b'{"userText": {"text": "Hi"}}', 1008, "came in a binary frame"),  # (it was taken for voice)
    ],
    ids=[
        "invalid-json",
        "unknown-field",
        "wrong-type",
        "voice without input_audio",
        "oversize",
        "voice not base64",
        "voice after padding",
        "voice in two alphabets",
        "a JSON array",
        "JSON null",
        "JSON in a binary frame",
    ],
)
async def test_bad_frames_close_the_socket(stack: Stack, frame: str | bytes, code: int, reason: str) -> None:
    async with connect(stack.url, max_size=None) as ws:
        await ws.send(json.dumps({"start": {}}))
        await ws.recv()
        await ws.send(frame)
        received = []
        with pytest.raises(ConnectionClosed):
            while True:
                received.append(await asyncio.wait_for(ws.recv(), 5))
        assert ws.close_code == code
        assert reason in (ws.close_reason or "")
        if code == 1008:  # the full reason came first, as an error frame
            (error,) = [json.loads(r)["error"] for r in received]
            assert error["code"] == "INVALID_ARGUMENT" and reason in error["message"]
    # Everyone else is still served, and the bad socket's call was cancelled.
    await test_full_turn_through_the_bridge(stack)
    await wait_for(lambda: stack.bridge.sockets == 0 and stack.harness.running.servicer.active_streams == 0)


async def test_a_client_that_sends_on_after_a_bad_frame_is_let_go_at_once(stack: Stack) -> None:
    """Found in QA (on /twilio): once the bridge closes, nothing read the socket, so frames sent after
    the close filled websockets' queue and hid the client's answer to the close: the socket stayed
    open for the close timeout (10 s)."""
    async with connect(stack.url) as ws:
        await ws.send(json.dumps({"start": {}}))
        await ws.recv()
        began = time.monotonic()
        await ws.send("{not json")
        with contextlib.suppress(ConnectionClosed):
            for _ in range(100):
                await ws.send(json.dumps({"userText": {"text": "more"}}))
        await wait_for(lambda: stack.bridge.sockets == 0, 10)
        assert time.monotonic() - began < 3


async def test_service_rejection_closes_with_its_reason(stack: Stack) -> None:
    async with connect(stack.url) as ws:
        await ws.send(json.dumps({"start": {"voice": "nobody"}}))
        error = json.loads(await ws.recv())
        assert error["error"]["code"] == "INVALID_ARGUMENT" and "unknown voice 'nobody'" in error["error"]["message"]
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008 and "INVALID_ARGUMENT: unknown voice" in (ws.close_reason or "")


async def test_closing_the_socket_cancels_the_call(stack: Stack) -> None:
    async with connect(stack.url) as ws:
        await ws.send(json.dumps({"start": {}}))
        await ws.recv()
        await ws.send(json.dumps({"userText": {"text": "Talk."}}))
        await ws.recv()
    await wait_for(lambda: stack.harness.llm.cancelled == 1 and stack.harness.running.servicer.active_streams == 0)
    assert stack.bridge.sockets == 0


async def test_foreign_origin_is_refused(stack: Stack) -> None:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert caught.value.response.status_code == 403
    for allowed in ("http://localhost:3000", f"http://127.0.0.1:{stack.bridge.port}"):
        async with connect(stack.url, origin=allowed) as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"start": {}}))
            assert "sessionStarted" in json.loads(await ws.recv())


async def upgrade_status(port: int, host: str, origin: str) -> int:
    """The HTTP status a WebSocket upgrade with these Host and Origin headers gets."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
        ).encode()
    )
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


async def test_a_rebound_dns_name_is_not_the_bridges_own_origin(stack: Stack) -> None:
    # A page on evil.example whose name now resolves to the bridge sends its own name as Host too.
    port = stack.bridge.port
    assert await upgrade_status(port, f"evil.example:{port}", f"http://evil.example:{port}") == 403
    # Reached by IP address (say from another machine on the LAN), the page is the bridge's own.
    assert await upgrade_status(port, f"192.0.2.7:{port}", f"http://192.0.2.7:{port}") == 101


async def test_configured_origin_is_allowed() -> None:
    harness = await start_harness()
    s = await start_stack(harness, allowed_origins=("https://app.example.com",))
    try:
        async with connect(s.url, origin="https://app.example.com") as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"start": {}}))
            assert "sessionStarted" in json.loads(await ws.recv())
    finally:
        await s.bridge.aclose()
        await stop_harness(harness)


async def test_socket_limit() -> None:
    harness = await start_harness()
    s = await start_stack(harness, max_sockets=1)
    try:
        async with connect(s.url) as first:
            await first.send(json.dumps({"start": {}}))
            await first.recv()
            with pytest.raises(InvalidStatus) as caught:
                async with connect(s.url):
                    pass
            assert caught.value.response.status_code == 503
    finally:
        await s.bridge.aclose()
        await stop_harness(harness)


async def test_service_down() -> None:
    bridge = await Bridge(BridgeOptions(grpc_target=f"127.0.0.1:{free_port()}", host="127.0.0.1", port=0)).start()
    try:
        async with connect(f"ws://127.0.0.1:{bridge.port}/ws") as ws:
            await ws.send(json.dumps({"start": {}}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert error["error"]["code"] == "UNAVAILABLE"
            assert "is unavailable; try again later" in error["error"]["message"]
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1013
            assert ws.close_reason is not None and ws.close_reason.startswith("UNAVAILABLE: the voice service at")
        voices = await asyncio.to_thread(http_get, f"http://127.0.0.1:{bridge.port}/voices")
        assert (
            voices[0] == 503 and json.loads(voices[1])["error"]["code"] == "UNAVAILABLE" and "unavailable" in voices[1]
        )
    finally:
        await bridge.aclose()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_page_voices_and_health_over_http(stack: Stack) -> None:
    status, page = await asyncio.to_thread(http_get, stack.http + "/")
    assert status == 200 and "<title>Parley</title>" in page
    status, script = await asyncio.to_thread(http_get, stack.http + "/app.js")
    assert status == 200 and "AudioContext" in script
    status, body = await asyncio.to_thread(http_get, stack.http + "/voices")
    voices = json.loads(body)
    assert status == 200 and voices["defaultVoice"] == "fake-voice" and len(voices["voices"]) == 2
    assert (await asyncio.to_thread(http_get, stack.http + "/healthz"))[0] == 200
    assert (await asyncio.to_thread(http_get, stack.http + "/../pyproject.toml"))[0] == 404
    assert (await asyncio.to_thread(http_get, stack.http + "/nothing.js"))[0] == 404


async def test_readiness_follows_the_service_and_liveness_does_not() -> None:
    harness = await start_harness()
    stack = await start_stack(harness)
    try:
        assert await asyncio.to_thread(http_get, stack.http + "/readyz") == (200, "ready\n")
        await stop_harness(harness)  # (the service goes away: a load balancer should send pages elsewhere)
        status, said = await asyncio.to_thread(http_get, stack.http + "/readyz")
        assert status == 503 and said == "the voice service is not reachable\n"
        assert await asyncio.to_thread(http_get, stack.http + "/healthz") == (200, "ok\n")
    finally:
        await stack.bridge.aclose()


async def test_bridge_shutdown_closes_sockets_going_away(stack: Stack) -> None:
    async with connect(stack.url) as ws:
        await ws.send(json.dumps({"start": {}}))
        await ws.recv()
        await stack.bridge.aclose()
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1001


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
async def test_bridge_process_from_the_environment(harness: Harness, stop: str) -> None:
    """`python -m ws_bridge` as `make run` starts it: settings from the environment, SIGTERM stops it;
    so does SIGHUP (a closed terminal's), the sockets closed going away (a QA pass: it cut them)."""
    import os
    import signal
    import sys

    port = free_port()
    env = {
        **os.environ,
        "PARLEY_BRIDGE_PORT": str(port),
        "PARLEY_GRPC_TARGET": f"127.0.0.1:{harness.running.port}",
        "PARLEY_BRIDGE_MAX_SOCKET": "10",  # misspelled: said, not a silent default
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ws_bridge",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    log = ""
    try:
        async with asyncio.timeout(20):
            while "ready: open" not in log:
                line = await process.stdout.readline()
                assert line, log
                log += line.decode()
        assert f"http://localhost:{port}/" in log
        assert "PARLEY_BRIDGE_MAX_SOCKET is not a variable the bridge reads; it is ignored (did you mean " in log
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/voices")
        assert status == 200 and "fake-voice" in body
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(json.dumps({"start": {}}))
            assert "sessionStarted" in json.loads(await asyncio.wait_for(ws.recv(), 10))
            process.send_signal(getattr(signal, stop))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 20)
            assert (ws.close_code, ws.close_reason) == (1001, "the bridge is shutting down")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, rest.decode()
    assert ("SIGHUP: shutting down as on SIGTERM" in rest.decode()) == (stop == "SIGHUP")


ALICE_KEY = "alice-0123456789abcdefghijklmn"
SECRET = "s3cret-0123456789abcdefghijklmnopqrstuv"


@pytest.fixture
async def guarded() -> AsyncIterator[Stack]:
    from service.auth import KeyRing

    harness = await start_harness(keys=KeyRing(None, f"alice:{ALICE_KEY}"), token_secret=SECRET)
    s = await start_stack(harness)
    yield s
    await s.bridge.aclose()
    await stop_harness(harness)


async def client_token(stack: Stack) -> str:
    from parley.v1 import voice_pb2 as pb

    minted = await stack.harness.stub.CreateClientToken(
        pb.CreateClientTokenRequest(subject="page-user"), metadata=[("authorization", f"Bearer {ALICE_KEY}")]
    )
    return minted.token


async def test_a_token_as_subprotocol_or_first_frame_reaches_the_service(guarded: Stack) -> None:
    token = await client_token(guarded)
    async with connect(guarded.url, subprotocols=["parley", f"bearer.{token}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "parley"
        await ws.send(json.dumps({"start": {}}))
        assert "sessionStarted" in json.loads(await ws.recv())
    async with connect(guarded.url) as ws:
        await ws.send(json.dumps({"auth": {"token": token}}))
        await ws.send(json.dumps({"start": {}}))
        assert "sessionStarted" in json.loads(await ws.recv())


async def test_without_a_token_the_socket_says_why_and_closes(guarded: Stack) -> None:
    async with connect(guarded.url) as ws:
        await ws.send(json.dumps({"start": {}}))
        frame = json.loads(await ws.recv())
        assert frame["error"]["code"] == "UNAUTHENTICATED"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@pytest.mark.parametrize("query", ["token=abc", "access_token=abc", "key=abc"])
async def test_credentials_in_the_query_string_are_refused(guarded: Stack, query: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{guarded.url}?{query}"):
            pass
    assert refused.value.response.status_code == 400
    assert b"never in the query string" in refused.value.response.body


async def test_voices_pass_the_page_token_on(guarded: Stack) -> None:
    token = await client_token(guarded)
    request = urllib.request.Request(f"{guarded.http}/voices", headers={"Authorization": f"Bearer {token}"})

    def fetch(what: urllib.request.Request | str) -> bytes:
        with urllib.request.urlopen(what, timeout=5) as response:
            return bytes(response.read())

    body = await asyncio.to_thread(fetch, request)
    assert json.loads(body)["defaultVoice"] == "fake-voice"
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(fetch, f"{guarded.http}/voices")
    refused.value.close()
    assert refused.value.code == 401


async def test_a_quota_reaches_the_page_with_when_to_retry() -> None:
    from service.core.quotas import QuotaLimits

    harness = await start_harness(quotas=QuotaLimits(turns_per_minute=1))
    stack = await start_stack(harness)
    try:
        async with connect(stack.url) as ws:
            await ws.send(json.dumps({"start": {}}))
            await ws.recv()
            for text in ("One?", "Two?"):
                await ws.send(json.dumps({"userText": {"text": text}}))
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(await ws.recv())
        error = next(m["error"] for m in (json.loads(f) for f in frames if isinstance(f, str)) if "error" in m)
        assert error["code"] == "RESOURCE_EXHAUSTED" and 1 <= error["retryAfterS"] <= 60
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    finally:
        await stack.bridge.aclose()
        await stop_harness(harness)


async def test_an_auth_frame_that_is_not_a_token_is_refused_plainly(guarded: Stack) -> None:
    async with connect(guarded.url) as ws:
        await ws.send(json.dumps({"auth": {"token": "abc\ndef"}}))
        frame = json.loads(await ws.recv())
        assert frame["error"]["code"] == "UNAUTHENTICATED"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_a_bridge_open_to_the_network_before_a_keyless_service_says_so() -> None:
    import signal
    import sys

    harness = await start_harness()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ws_bridge",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--grpc-target",
        f"127.0.0.1:{harness.running.port}",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        lines = []
        async with asyncio.timeout(20):
            while not any("anyone who reaches the bridge may use the service" in line for line in lines):
                lines.append((await process.stderr.readline()).decode())
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
        await stop_harness(harness)


async def test_the_bridges_metrics_count_sockets_closes_and_every_refusal() -> None:
    # A client chose the close code label (4001, 4002, ... one series each), and only a bad frame after
    # the first was counted: not a bad first frame, a bad auth frame, or one over the size limit.
    from tests.service.test_metrics import scrape

    harness = await start_harness()
    port = free_port()
    stack = await start_stack(harness, metrics_port=port, max_frame_bytes=4096)

    async def refused(*frames: str) -> None:
        async with connect(stack.url) as ws:
            for frame in frames:
                await ws.send(frame)
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()

    try:
        for code in (4001, 4002, 3999):
            async with connect(stack.url) as ws:
                await ws.send(json.dumps({"start": {}}))
                await ws.recv()
                await ws.close(code)
        await refused("not json")  # a bad first frame
        await refused(json.dumps({"auth": {"token": ""}}))  # a bad auth frame
        await refused("x" * 5000)  # over the size limit: websockets closes 1009
        with pytest.raises(InvalidStatus):  # (refused at the upgrade: no socket, no close)
            async with connect(f"{stack.url}?token=abc"):
                pass
        await wait_for(lambda: stack.bridge.sockets == 0)
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stack.bridge.aclose()
        await stop_harness(harness)
    text = "\n".join(f"{k} {v}" for k, v in samples.items())
    closes = {k: v for k, v in samples.items() if k.startswith("parley_bridge_socket_closes_total")}
    assert closes == {
        "parley_bridge_socket_closes_total{code=4xxx}": 2,
        "parley_bridge_socket_closes_total{code=3xxx}": 1,
        "parley_bridge_socket_closes_total{code=1008}": 2,  # (the bridge's code, not the client's echo)
        "parley_bridge_socket_closes_total{code=1009}": 1,
    }, text
    assert samples["parley_bridge_refused_total{reason=bad frame}"] == 2, text
    assert samples["parley_bridge_refused_total{reason=frame too large}"] == 1, text
    assert samples["parley_bridge_refused_total{reason=credentials in URL}"] == 1, text
    assert samples["parley_bridge_refused_total{reason=origin}"] == 0, text  # (every reason, from the start)
    assert samples["parley_bridge_sockets"] == 0, text


async def test_a_metrics_port_in_use_stops_the_bridge_naming_it() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bridge = Bridge(BridgeOptions(grpc_target="127.0.0.1:1", host="127.0.0.1", port=0, metrics_port=port))
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
            await bridge.start()


async def test_a_service_that_does_not_answer_at_once_is_written_to_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A service from before it sent its response headers at once sends them only after a request:
    # waiting for them for ever would be a deadlock.
    from ws_bridge import calls

    monkeypatch.setattr(calls, "ANSWER_WAIT_S", 0.05)

    class Silent:
        async def initial_metadata(self) -> None:
            await asyncio.Event().wait()

    await asyncio.wait_for(calls.answered(Silent()), 5)  # type: ignore[arg-type]


# -- clients that do not read, or send what the bridge cannot take ---------------------------------


def small_window_socket() -> socket.socket:
    """A client socket that takes little before the bridge's writes to it wait: a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


async def test_a_client_that_stops_reading_is_cut_and_its_call_ended() -> None:
    # It held its socket, and the service stream behind it, for ever: websockets waited in send, and
    # its keepalive ping waited behind the same writes (an attack pass).
    from tests.service.test_metrics import scrape

    harness = await start_harness(FakeLLM(reply="It goes on and on. " * 200), FakeTTS())
    port = free_port()
    # (A stall of 5 s: the reply's audio fills the socket well before the first keepalive ping.)
    stack = await start_stack(harness, metrics_port=port, ping_interval_s=2.5, ping_timeout_s=2.5)
    try:
        sock = small_window_socket()
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.bridge.port))
        async with connect(stack.url, sock=sock, max_queue=1) as ws:  # (never reads: the queue stops it)
            await ws.send(json.dumps({"start": {"audio": {"sampleRateHz": 48000}}}))
            await ws.send(json.dumps({"userText": {"text": "Talk."}}))
            await wait_for(lambda: stack.bridge.sockets == 0, 20)
        await wait_for(lambda: harness.running.servicer.active_streams == 0, 10)
        samples = await asyncio.to_thread(scrape, port)
        assert samples["parley_bridge_refused_total{reason=not reading}"] == 1
        async with connect(stack.url) as ws:  # everyone else is served
            await ws.send(json.dumps({"start": {}}))
            await ws.send(json.dumps({"userText": {"text": "Hello?"}}))
            texts, _ = await until_turn_ended(ws)
            assert texts[-1]["turnEnded"]["reason"] == "TURN_END_REASON_COMPLETED"
    finally:
        await stack.bridge.aclose()
        await stop_harness(harness)


async def test_pings_from_a_client_that_does_not_read_cannot_grow_the_bridges_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each ping is answered with a pong, which waits for the client without going through the writes
    # that wait: 172 MB of pings grew the bridge by as much (an attack pass).
    from ws_bridge.reading import MAX_UNREAD_BYTES, ReadingConnection

    cut_at: list[int] = []  # what waited for the client when it was cut
    cut = ReadingConnection._cut

    def recording(self: ReadingConnection, why: str) -> None:
        cut_at.append(self.transport.get_write_buffer_size())
        cut(self, why)

    monkeypatch.setattr(ReadingConnection, "_cut", recording)
    harness = await start_harness()
    stack = await start_stack(harness)  # (the default keepalive: only the bound can cut it in time)
    try:
        sock = small_window_socket()
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.bridge.port))
        async with connect(stack.url, sock=sock) as ws:
            await ws.send(json.dumps({"start": {}}))
            await ws.recv()
            ws.transport.pause_reading()
            with pytest.raises(ConnectionClosed):
                for count in range(200_000):  # 24 MB of pings, if nothing cut it
                    await ws.ping(count.to_bytes(8, "big") * 15)  # (each different: one pong awaited each)
            # Cut at the bound, give or take the pongs of one read (at most 256 KiB of pings).
            assert len(cut_at) == 1 and MAX_UNREAD_BYTES < cut_at[0] <= MAX_UNREAD_BYTES + (256 << 10)
        await wait_for(lambda: stack.bridge.sockets == 0, 10)
    finally:
        await stack.bridge.aclose()
        await stop_harness(harness)


async def test_a_first_message_in_a_binary_frame_is_said_to_be_one(stack: Stack) -> None:
    # It was taken for voice: "send `start` before `user_audio`", to a client that had (a QA pass).
    async with connect(stack.url) as ws:
        await ws.send(b' {"start": {}}\n')
        error = json.loads(await ws.recv())["error"]
        assert error["code"] == "INVALID_ARGUMENT" and "came in a binary frame" in error["message"]
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


def test_voice_is_never_taken_for_a_json_message() -> None:
    from ws_bridge.server import _request_of

    for frame in (b"{", b"{}}", b"{\x00\xff}", b"{" + bytes(range(256)) * 4 + b"}", b'{"a": 1}x'):
        assert _request_of(frame).user_audio.data == frame


async def test_a_first_frame_nested_too_deeply_is_a_bad_frame(stack: Stack) -> None:
    # It raised RecursionError: 1011 with no reason, and a traceback (an attack pass).
    async with connect(stack.url) as ws:
        await ws.send('{"auth": ' + "[" * 5000 + "]" * 5000 + "}")
        error = json.loads(await ws.recv())["error"]
        assert error["code"] == "INVALID_ARGUMENT"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


@pytest.mark.parametrize(
    "headers",
    [
        "Origin: http://localhost\r\nOrigin: http://localhost\r\n",
        "Origin: http://[::1\r\n",
        "Host: [::1\r\n",
    ],
    ids=["two origins", "origin not a URL", "two hosts"],
)
async def test_a_malformed_upgrade_request_is_a_bad_request(stack: Stack, headers: str) -> None:
    # They were HTTP 500 and a traceback in the bridge's log (an attack pass).
    status = await raw_request(
        stack,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n",
    )
    assert status.startswith("HTTP/1.1 400"), status
    await test_full_turn_through_the_bridge(stack)


async def test_voices_with_an_authorization_that_is_not_ascii_is_a_bad_request(stack: Stack) -> None:
    status = await raw_request(
        stack, "GET /voices HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xe9t\xe9\r\n\r\n", "latin-1"
    )
    assert status.startswith("HTTP/1.1 400"), status


async def raw_request(stack: Stack, request: str, encoding: str = "ascii") -> str:
    """The status line of the bridge's answer to ``request``, sent as it is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.bridge.port)
    try:
        writer.write(request.encode(encoding))
        return (await asyncio.wait_for(reader.readline(), 5)).decode(errors="replace").strip()
    finally:
        writer.close()


async def test_a_socket_that_sends_nothing_is_told_and_closed_even_with_its_token(
    guarded: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the token as a subprotocol the service's stream was opened at once and the socket kept
    # until the service's idle timeout (10 minutes); without one it was closed with no error frame.
    import ws_bridge.server

    monkeypatch.setattr(ws_bridge.server, "_FIRST_FRAME_S", 0.5)
    token = await client_token(guarded)
    for subprotocols, first in (([f"bearer.{token}"], None), ([], json.dumps({"auth": {"token": token}}))):
        async with connect(guarded.url, subprotocols=["parley", *subprotocols]) as ws:  # type: ignore[list-item]
            if first is not None:
                await ws.send(first)  # (then no start)
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))["error"]
            assert error["code"] == "INVALID_ARGUMENT" and "send start" in error["message"]
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
    assert guarded.harness.running.servicer.active_streams == 0


async def test_a_call_the_service_ends_closes_soon_though_the_client_sent_on_meanwhile() -> None:
    """Found in a review: when the service ended a call, the socket's close left reading the client's
    frames to the task that forwards them, which stops at its next frame: what the client went on
    sending until it took in the close filled the socket's queue and hid the client's answer to the
    close, so the socket stayed open for the close timeout (10 s)."""

    async def refuses_after_starting(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield pb.ConverseResponse(session_started=pb.SessionStarted(session_id="s" * 32)).SerializeToString()
        for _ in range(3):
            yield pb.ConverseResponse(text_delta=pb.TextDelta(turn_id="t", text="Hm. ")).SerializeToString()
        await asyncio.sleep(0.3)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this call is refused")

    service, port = await serve_converse(refuses_after_starting)
    bridge = await Bridge(BridgeOptions(grpc_target=f"127.0.0.1:{port}", host="127.0.0.1", port=0)).start()

    async def send_on(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(json.dumps({"userText": {"text": "And another thing."}}))
                await asyncio.sleep(0.02)  # (as a phone sends its audio)

    try:
        # A client busy elsewhere: it reads nothing for a second (with a message unread it stops
        # reading the socket, so it takes in the close late) but goes on sending.
        async with connect(f"ws://127.0.0.1:{bridge.port}/ws", max_queue=1) as ws:
            await ws.send(json.dumps({"start": {}}))
            assert "sessionStarted" in json.loads(await ws.recv())
            sending = asyncio.create_task(send_on(ws))
            await asyncio.sleep(1.3)
            began = time.monotonic()
            frames = []
            with contextlib.suppress(ConnectionClosed):
                async for frame in ws:  # until the socket closes
                    frames.append(frame)
            assert time.monotonic() - began < 3, time.monotonic() - began
            assert json.loads(frames[-1])["error"] == {"code": "INVALID_ARGUMENT", "message": "this call is refused"}
            assert ws.close_code == 1008, ws.close_code
            await sending
    finally:
        await bridge.aclose()
        await service.stop(0)


async def test_a_write_that_meets_the_end_of_a_call_leaves_the_service_its_status() -> None:
    """grpc aio's own write, refused by Core for a call that is over, puts INTERNAL "Internal error
    from Core" in place of the service's status for good (grpc/grpc#36066): a script writing back to
    back while the service ended its streams got it in 190 of 200 calls. The bridges' writes leave the
    status to the call's read, so that a replica going away (UNAVAILABLE) is told from a failure."""

    async def ends_while_the_client_writes(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await context.send_initial_metadata(())  # (accepted at once, as the service does)
        read = 0
        async for _ in requests:
            read += 1
            if read == 20:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        yield b""  # (never reached: a generator, as a streaming handler is)

    service, port = await serve_converse(ends_while_the_client_writes)
    audio = pb.ConverseRequest(user_audio=pb.UserAudio(data=bytes(320)))
    ends: collections.Counter[tuple[grpc.StatusCode, str]] = collections.Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)
            for _ in range(50):
                call = stub.Converse()
                await answered(call)
                written = 0
                while await accepted_write(call, audio):  # back to back until the call is over
                    written += 1
                assert written >= 20
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                ends[(caught.value.code(), caught.value.details() or "")] += 1
    finally:
        await service.stop(0)
    assert ends == {(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"): 50}


async def test_pages_sending_their_voice_as_the_service_shuts_down_are_told_it_is_restarting() -> None:
    # Pages whose microphones send on (here as fast as the socket takes it, as a page catching up)
    # are told the service is going away, with the session to resume, whatever their writes meet
    # (a write that meets the call's end is the test above).
    from tests.fakes import FakeSTT

    harness = await start_harness(FakeLLM(reply="Hello."), FakeTTS(), stt=FakeSTT(texts=["Hi."]))
    stack = await start_stack(harness)
    silence = bytes(320)  # 10 ms at 16 kHz

    async def page() -> tuple[dict[str, str], int | None]:
        async with connect(stack.url) as ws:
            await ws.send(json.dumps({"start": {"inputAudio": {"sampleRateHz": 16000}}}))
            assert "sessionStarted" in json.loads(await asyncio.wait_for(ws.recv(), 10))

            async def microphone() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.send(silence)  # (as fast as the socket takes it: a page catching up)
                        await asyncio.sleep(0)

            speaking = asyncio.create_task(microphone())
            frames = []
            with contextlib.suppress(ConnectionClosed):
                async for frame in ws:  # until the socket closes
                    frames.append(frame)
            await speaking
            return json.loads(frames[-1])["error"], ws.close_code

    try:
        pages = [asyncio.create_task(page()) for _ in range(8)]
        await wait_for(lambda: harness.running.servicer.active_streams == 8, 10)
        await asyncio.sleep(0.5)
        await harness.running.stop(grace_s=10)
        ends = await asyncio.wait_for(asyncio.gather(*pages), 20)
    finally:
        await stack.bridge.aclose()
        await stop_harness(harness)
    for error, close_code in ends:
        assert error["code"] == "UNAVAILABLE", error
        assert "the server is shutting down; resume session" in error["message"], error
        assert close_code == 1013
