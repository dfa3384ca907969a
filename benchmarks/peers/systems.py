"""The processes of the peer benchmark and one turn through each: the shared llama.cpp server, Parley
services (gRPC on loopback), and the Pipecat worker (JSON lines on its stdin and stdout).

Every process is started in its own session (so a Ctrl-C at the terminal reaches only the driver,
which then stops them in order) and logs to a file in the run's log folder, whose tail is quoted
when a process fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.peers.audible import first_audible_ms
from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc

MODEL_NAME = "gemma-3-270m"
"""The name the llama.cpp server answers to, and both systems ask for."""

STAGES = ("first_token_ms", "first_segment_ms", "first_audio_ms", "first_audible_ms", "total_ms")


class BenchmarkError(RuntimeError):
    """A failure that ends the run, with a message that says what and where."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """A child process with its output in a log file; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    name: str
    argv: list[str]
    cwd: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    stdin: int | None = None
    stdout: int | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdin=self.stdin if self.stdin is not None else subprocess.DEVNULL,
                stdout=self.stdout if self.stdout is not None else log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise BenchmarkError(f"{self.name} exited with status {self.popen.returncode}{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; the end of its log ({self.log}):\n    " + "\n    ".join(text) if text else ""

    def stop(self) -> None:
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=5)


# --- the llama.cpp server -------------------------------------------------------------------------


@dataclass
class LlamaServer:
    process: Process
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.process.check_alive()
            try:
                await asyncio.to_thread(self._get, "/models")
                return
            except (OSError, urllib.error.URLError):
                await asyncio.sleep(0.2)
        raise BenchmarkError(f"the llama.cpp server did not answer within {timeout_s:g} s{self.process.tail()}")

    async def scrub_cache(self) -> None:
        """A one-token completion of an unrelated prompt: llama.cpp reuses the longest prefix it shares
        with the previous request, so this keeps a turn from profiting from the previous one."""
        body = {"model": MODEL_NAME, "prompt": "Prime numbers below twenty:", "max_tokens": 1, "temperature": 0}
        await asyncio.to_thread(self._post, "/completions", body)

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=5) as response:
            return json.load(response)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.base_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)


# --- Parley ---------------------------------------------------------------------------------------


@dataclass
class Parley:
    """A Parley service process and a channel to it."""

    label: str
    process: Process
    port: int
    temperature: float
    max_tokens: int
    channel: grpc.aio.Channel | None = None

    async def wait_ready(self, timeout_s: float = 180) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.process.check_alive()
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
        raise BenchmarkError(f"{self.label} was not serving within {timeout_s:g} s{self.process.tail()}")

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def turn(self, question: str, timeout_s: float) -> dict[str, Any]:
        """One question on a fresh session; times in ms from writing ``user_text`` to each arrival."""
        assert self.channel is not None
        call = voice_pb2_grpc.VoiceServiceStub(self.channel).Converse()
        try:
            async with asyncio.timeout(timeout_s):
                return await self._turn(call, question)
        except TimeoutError:
            raise BenchmarkError(f"{self.label}: no turn_ended within {timeout_s:g} s for {question!r}") from None
        except grpc.aio.AioRpcError as error:
            raise BenchmarkError(
                f"{self.label} ended the stream: {error.code().name}: {error.details()}{self.process.tail()}"
            ) from None
        finally:
            call.cancel()

    async def _turn(self, call: grpc.aio.StreamStreamCall, question: str) -> dict[str, Any]:
        options = pb.LlmOptions(temperature=self.temperature, max_tokens=self.max_tokens)
        await call.write(pb.ConverseRequest(start=pb.Start(llm=options)))
        started = await call.read()
        if started is grpc.aio.EOF or started.WhichOneof("kind") != "session_started":
            raise BenchmarkError(f"{self.label}: expected session_started, got {started}")
        rate = started.session_started.audio.sample_rate_hz
        text: list[str] = []
        segments: list[str] = []
        chunks: list[tuple[float, bytes]] = []
        first_delta = first_segment_message = None
        sent = time.perf_counter()
        await call.write(pb.ConverseRequest(user_text=pb.UserText(text=question)))
        while True:
            response = await call.read()
            at = (time.perf_counter() - sent) * 1000
            if response is grpc.aio.EOF:
                raise BenchmarkError(f"{self.label}: the stream ended before turn_ended")
            kind = response.WhichOneof("kind")
            if kind == "text_delta":
                first_delta = first_delta if first_delta is not None else at
                text.append(response.text_delta.text)
            elif kind == "segment":
                first_segment_message = first_segment_message if first_segment_message is not None else at
                segments.append(response.segment.spoken_text)
            elif kind == "audio":
                chunks.append((at, response.audio.data))
            elif kind == "turn_ended":
                ended = response.turn_ended
                break
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        reason = pb.TurnEndReason.Name(ended.reason)
        if reason != "TURN_END_REASON_COMPLETED":
            raise BenchmarkError(f"{self.label}: the turn ended {reason}: {ended.error}{self.process.tail()}")
        audible = first_audible_ms(chunks, rate)
        timings = ended.timings
        return {
            "first_token_ms": first_delta,
            "first_segment_ms": float(timings.first_segment_ms) if timings.first_segment_ms else None,
            "first_audio_ms": chunks[0][0] if chunks else None,
            "first_audible_ms": audible[0] if audible else None,
            "total_ms": at,
            "onset_sample": audible[1] if audible else None,
            "text": "".join(text),
            "first_segment_text": segments[0] if segments else "",
            "segments": segments,
            "audio_ms": sum(len(data) for _, data in chunks) / 2 / rate * 1000 if rate else 0.0,
            "chunks": len(chunks),
            "sample_rate": rate,
            "server_first_token_ms": timings.first_llm_token_ms,
            "server_first_segment_ms": timings.first_segment_ms,
            "server_first_audio_ms": timings.first_audio_ms,
            "server_total_ms": timings.total_ms,
            "first_segment_message_ms": first_segment_message,
        }


# --- Pipecat --------------------------------------------------------------------------------------


@dataclass
class PipecatWorker:
    """``pipecat_worker.py`` in .venv-peers, asked one question at a time over JSON lines."""

    process: Process
    info: dict[str, Any] = field(default_factory=dict)
    label: str = "Pipecat"
    _next_id: int = 0

    async def wait_ready(self, timeout_s: float = 180) -> None:
        line = await self._readline(timeout_s, "to start its pipeline")
        self.info = json.loads(line)
        if not self.info.get("ready"):
            raise BenchmarkError(f"the Pipecat worker did not start: {line!r}{self.process.tail()}")

    async def turn(self, question: str, timeout_s: float) -> dict[str, Any]:
        popen = self.process.popen
        assert popen is not None and popen.stdin is not None
        self._next_id += 1
        request = {"id": self._next_id, "text": question, "timeout_s": timeout_s}
        try:
            popen.stdin.write((json.dumps(request) + "\n").encode())
            popen.stdin.flush()
        except OSError:
            self.process.check_alive()
            raise BenchmarkError(f"cannot ask the Pipecat worker{self.process.tail()}") from None
        answer = json.loads(await self._readline(timeout_s + 10, f"to answer {question!r}"))
        if answer.get("id") != self._next_id:
            raise BenchmarkError(f"the Pipecat worker answered out of turn: {answer}")
        if answer.get("errors"):
            raise BenchmarkError(f"Pipecat failed on {question!r}: {'; '.join(answer['errors'])}{self.process.tail()}")
        return dict(answer)

    async def _readline(self, timeout_s: float, what: str) -> str:
        popen = self.process.popen
        assert popen is not None and popen.stdout is not None
        stdout = popen.stdout
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout_s)
        except TimeoutError:
            raise BenchmarkError(
                f"the Pipecat worker took more than {timeout_s:g} s {what}{self.process.tail()}"
            ) from None
        if not line:
            self.process.check_alive()
            raise BenchmarkError(f"the Pipecat worker closed its output{self.process.tail()}")
        return line.decode()

    async def close(self) -> None:
        popen = self.process.popen
        if popen is not None and popen.stdin is not None and not popen.stdin.closed:
            with contextlib.suppress(OSError):  # it may have exited already
                popen.stdin.close()  # end of questions: the worker ends its pipeline and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(popen.wait, 15)


def missing_stage(row: dict[str, Any]) -> str | None:
    """The first stage a turn lacks, if any."""
    return next((stage for stage in STAGES if row.get(stage) is None), None)
