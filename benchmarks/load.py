"""Load and streaming measurements through the real gRPC path, against a service process on loopback
running the scripted engines (known latency), so that the ideal first-audio time is computable."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.core.normalizer import speakable
from service.core.segmenter import Segmenter
from service.engines.scripted import PROFILES, ScriptedLLM, ScriptedTTS, reply_for, tokens_of

ROOT = Path(__file__).resolve().parent.parent


def ideal_first_audio_ms(profile_name: str, message: str) -> float:
    """First token, plus the tokens until the segmenter releases the first segment, plus the TTS's
    first-audio delay: what an overhead-free service would achieve with this profile."""
    profile = PROFILES[profile_name]
    tokens = tokens_of(reply_for(message))
    segmenter = Segmenter()
    released_at = len(tokens) - 1  # at the latest, the end of the stream releases it
    for index, token in enumerate(tokens):
        if segmenter.push(token):
            released_at = index
            break
    return (profile.first_token_s + released_at / profile.tokens_per_s + profile.tts_first_audio_s) * 1000


@dataclass
class ServiceProcess:
    """``python -m service`` on the scripted engines, on a free loopback port."""

    profile: str
    max_streams: int
    root: Path = ROOT
    """The checkout whose service runs (another commit's, to compare before and after)."""
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """More settings (PARLEY_WORKERS, a session store)."""

    def __enter__(self) -> ServiceProcess:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {
            **os.environ,
            "PARLEY_HOST": "127.0.0.1",
            "PARLEY_PORT": str(self.port),
            "PARLEY_LLM": "scripted",
            "PARLEY_TTS": "scripted",
            "PARLEY_SCRIPTED_PROFILE": self.profile,
            "PARLEY_MAX_STREAMS": str(self.max_streams),
            "PARLEY_LOG_LEVEL": "WARNING",
            **self.env,
        }
        self.process = subprocess.Popen([sys.executable, "-m", "service"], cwd=self.root, env=env)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 60) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not become ready")
                await asyncio.sleep(0.1)

    def pids(self) -> list[int]:
        """The service's process, and its workers when it has some."""
        assert self.process is not None
        parent = self.process.pid
        children = [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) and int(fields[1]) == parent
        ]
        return [parent, *children]

    def rss_mb(self, pids: list[int] | None = None) -> float:
        total = 0.0
        for pid in self.pids() if pids is None else pids:
            status = _proc_file(pid, "status") or ""
            total += next(
                (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0
            )
        return total

    def cpu_s(self, pids: list[int] | None = None) -> float:
        total = 0.0
        for pid in self.pids() if pids is None else pids:
            if fields := _stat_fields(pid):
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def _proc_file(pid: int, name: str) -> str | None:
    """``/proc/<pid>/<name>``, or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text(encoding="utf-8")
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (the state first)."""
    stat = _proc_file(pid, "stat")
    return stat.rsplit(")", 1)[1].split() if stat else None


@dataclass
class Turn:
    message: str
    first_audio_ms: float
    server_first_audio_ms: int
    audio_messages: int
    in_order: bool
    reason: str
    caption_messages: int = 0
    """``text_delta`` messages of the turn (none when the stream asked for segment captions)."""


@dataclass
class LoadResult:
    concurrency: int
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_streams: int = 0
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    wall_s: float = 0.0
    stolen: float = math.nan
    """The share of the machine's CPU time that the hypervisor gave to others during the run (steal
    time: the virtual cores were ready to run and did not), NaN where the system does not say."""


@dataclass(frozen=True)
class MachineCPU:
    """The whole machine's CPU time since boot, in clock ticks (Linux's ``/proc/stat``)."""

    total: int
    stolen: int
    """Steal: time the virtual cores were ready to run while the hypervisor ran something else."""


def machine_cpu(stat: Path = Path("/proc/stat")) -> MachineCPU | None:
    """The machine's CPU time now, or None where ``/proc/stat`` is missing or says no steal (not Linux,
    or a kernel before 2.6.11)."""
    try:
        with stat.open() as file:
            fields = file.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    ticks = [int(value) for value in fields[1:9]]
    return MachineCPU(sum(ticks), ticks[7])


def stolen_share(before: MachineCPU | None, after: MachineCPU | None) -> float:
    """The share of the machine's CPU time between two readings (idle time included) that the
    hypervisor took (NaN if unknown). Steal builds up only while the virtual cores want to run, so
    the same contention on the host shows as a larger share under a heavier load."""
    if before is None or after is None or after.total <= before.total:
        return math.nan
    return (after.stolen - before.stolen) / (after.total - before.total)


def stolen_text(stolen: float) -> str:
    """A table's cell for :func:`stolen_share`'s value."""
    return "n/a" if math.isnan(stolen) else f"{stolen:.1%}"


async def _stream(
    target: str,
    message: str,
    turns: int,
    ready: asyncio.Barrier,
    result: LoadResult,
    live: list[int],
    deadline: float,
    captions: str,
) -> None:
    # One connection per stream, as separate users have: gRPC otherwise shares one connection between
    # channels to the same target, and every stream would reach the same worker.
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).Converse()
        mode = pb.CAPTION_MODE_SEGMENTS if captions == "segments" else pb.CAPTION_MODE_DELTAS
        await call.write(pb.ConverseRequest(start=pb.Start(captions=mode)))
        await call.read()
        await ready.wait()
        # Arrivals spread over a ramp (10 ms per stream, at most 2 s), as users do not press Enter in
        # the same millisecond; every turn after the first follows a short pause.
        await asyncio.sleep(random.uniform(0, min(2.0, 0.01 * ready.parties)))
        live[0] += 1
        result.peak_streams = max(result.peak_streams, live[0])
        try:
            for _ in range(turns):
                if time.monotonic() > deadline:
                    break
                result.turns.append(await _turn(call, message))
                await asyncio.sleep(random.uniform(0, 0.3))  # a listener's pause before the next turn
        finally:
            live[0] -= 1
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass


async def _turn(call: grpc.aio.StreamStreamCall, message: str) -> Turn:
    sent = time.perf_counter()
    await call.write(pb.ConverseRequest(user_text=pb.UserText(text=message)))
    first_audio = None
    expected_sequence, last_segment, count, in_order, captions = 0, 0, 0, True, 0
    while True:
        response = await call.read()
        kind = response.WhichOneof("kind")
        if kind == "audio":
            if first_audio is None:
                first_audio = (time.perf_counter() - sent) * 1000
            audio = response.audio
            in_order &= audio.sequence == expected_sequence and audio.segment_index >= last_segment
            expected_sequence, last_segment, count = audio.sequence + 1, audio.segment_index, count + 1
        elif kind == "text_delta":
            captions += 1
        elif kind == "turn_ended":
            ended = response.turn_ended
            return Turn(
                message,
                first_audio if first_audio is not None else float("nan"),
                ended.timings.first_audio_ms,
                count,
                in_order,
                pb.TurnEndReason.Name(ended.reason),
                captions,
            )


async def run_load(
    service: ServiceProcess,
    concurrency: int,
    turns: int,
    message: str,
    deadline: float,
    *,
    compiled: bool = False,
    captions: str = "deltas",
) -> LoadResult:
    """``concurrency`` streams, each doing ``turns`` turns, started together; driven by this process
    (``compiled=False``) or by the compiled load generator (:mod:`benchmarks.compiled`), which costs a
    fraction of the CPU. Either way the service's memory and CPU, and the generator's CPU, are measured.
    ``captions``: ``segments`` opens the streams with no caption deltas (as the phone bridge does)."""
    result = LoadResult(concurrency)
    pids = service.pids()  # (read once: scanning /proc at every sample cost the generator 7% of its time)
    result.rss_idle_mb = service.rss_mb(pids)
    cpu_before, client_before, began = service.cpu_s(pids), time.process_time(), time.perf_counter()
    machine_before = machine_cpu()
    sampling = True

    async def sample_rss() -> None:
        while sampling:
            result.rss_peak_mb = max(result.rss_peak_mb, service.rss_mb(pids))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_rss())
    try:
        if compiled:
            from benchmarks import compiled as compiled_generator

            await compiled_generator.drive(
                service.target, concurrency, turns, message, deadline, result, captions=captions
            )
        else:
            await _drive(service.target, concurrency, turns, message, deadline, result, captions)
            result.client_cpu_s = time.process_time() - client_before
    finally:
        sampling = False
        await sampler
    result.cpu_s = service.cpu_s(pids) - cpu_before
    result.wall_s = time.perf_counter() - began
    result.stolen = stolen_share(machine_before, machine_cpu())
    return result


async def _drive(
    target: str, concurrency: int, turns: int, message: str, deadline: float, result: LoadResult, captions: str
) -> None:
    ready = asyncio.Barrier(concurrency)
    live = [0]
    outcomes = await asyncio.gather(
        *(_stream(target, message, turns, ready, result, live, deadline, captions) for _ in range(concurrency)),
        return_exceptions=True,
    )
    result.errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]


async def sequential_first_audio_ms(profile_name: str, message: str) -> float:
    """The naive service: wait for the whole LLM reply, synthesize it whole, then send it."""
    from service.core.engine import LLMRequest, Message

    profile = PROFILES[profile_name]
    llm, tts = ScriptedLLM(profile, profile_name), ScriptedTTS(profile)
    began = time.perf_counter()
    text = "".join(
        [t async for t in llm.stream(LLMRequest((Message("user", message),), 0.7, 1000)) if isinstance(t, str)]
    )
    audio = [chunk async for chunk in tts.synthesize(speakable(text), "scripted")]
    assert audio
    return (time.perf_counter() - began) * 1000
