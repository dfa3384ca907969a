"""The compiled load generator (``benchmarks/loadgen/loadgen.cc``, gRPC C++): built on first use into
``build/loadgen/`` from the contract's ``.proto``, and driven from here.

It holds the same conversations as :func:`benchmarks.load.run_load`'s Python streams (one connection
per stream, the same ramp and pauses, first audio measured at the client) for about a tenth of their
CPU, so that on a small machine the cores go to the service being measured. It needs Debian's
``libgrpc++-dev``, ``protobuf-compiler-grpc``, ``pkg-config`` and ``g++``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.load import LoadResult

__all__ = ["build", "drive"]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "loadgen" / "loadgen.cc"
PROTO = ROOT / "protos" / "parley" / "v1" / "voice.proto"
BUILD = ROOT / "build" / "loadgen"
PACKAGES = "g++ pkg-config libgrpc++-dev protobuf-compiler-grpc"
COMPILE = ("g++", "-O2", "-std=c++20")


def build() -> Path:
    """The generator's executable, compiled if it is missing or was built from other sources, flags
    or gRPC. Raises RuntimeError saying what to install when a tool is missing, or what the compiler
    said."""
    binary = BUILD / "loadgen"
    missing = [tool for tool in ("g++", "pkg-config", "protoc", "grpc_cpp_plugin") if shutil.which(tool) is None]
    if not missing and subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        missing.append("grpc++ (pkg-config)")
    if missing:
        raise RuntimeError(
            f"the compiled load generator needs {', '.join(missing)}: apt-get install {PACKAGES} "
            "(or run the benchmark with --generator python)"
        )
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True, text=True, check=True
    ).stdout.split()
    versions = subprocess.run(
        ["pkg-config", "--modversion", "grpc++", "protobuf"], capture_output=True, text=True, check=True
    ).stdout.split()
    stamp = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), PROTO.read_bytes(), " ".join([*COMPILE, *flags, *versions]).encode()])
    ).hexdigest()
    if binary.exists() and (BUILD / "stamp").exists() and (BUILD / "stamp").read_text() == stamp:
        return binary
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD, prefix="building-") as scratch:  # (two builds at once do not mix)
        work = Path(scratch)
        steps = [
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"--cpp_out={work}",
                f"--grpc_out={work}",
                f"--plugin=protoc-gen-grpc={shutil.which('grpc_cpp_plugin')}",
                str(PROTO),
            ],
            [
                *COMPILE,
                f"-I{work}",
                str(SOURCE),
                str(work / "parley" / "v1" / "voice.pb.cc"),
                str(work / "parley" / "v1" / "voice.grpc.pb.cc"),
                *flags,
                "-o",
                str(work / "loadgen"),
            ],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"building the load generator failed: {shlex.join(step[:2])} …\n{done.stderr[-2000:]}"
                )
        (work / "loadgen").replace(binary)
    (BUILD / "stamp").write_text(stamp)
    return binary


async def drive(
    target: str,
    concurrency: int,
    turns: int,
    message: str,
    deadline: float,
    result: LoadResult,
    *,
    grace_s: float = 120.0,
    captions: str = "deltas",
) -> None:
    """Run the generator against ``target`` and put its turns, errors, CPU and peak into ``result``.
    ``captions``: ``segments`` to open the streams with ``start.captions`` = CAPTION_MODE_SEGMENTS.
    No turn starts after ``deadline``; a call still open ``grace_s`` later is cut (an error). Cancelled,
    it kills the generator."""
    binary = await asyncio.to_thread(build)
    process = await asyncio.create_subprocess_exec(
        str(binary),
        "--target",
        target,
        "--streams",
        str(concurrency),
        "--turns",
        str(turns),
        "--message",
        message,
        "--deadline-s",
        f"{max(0.0, deadline - time.monotonic()):.3f}",
        "--grace-s",
        f"{grace_s:g}",
        "--captions",
        captions,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())
    try:
        await _read(process.stdout, message, result)
        code = await process.wait()
        if code != 0:
            raise RuntimeError(f"the load generator exited with {code}: {(await stderr).decode()[-2000:]}")
    finally:
        if process.returncode is None:  # (cancelled, or its output made no sense: it stops with us)
            process.kill()
            await process.wait()
        stderr.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stderr


async def _read(stdout: asyncio.StreamReader, message: str, result: LoadResult) -> None:
    from benchmarks.load import Turn

    async for raw in stdout:
        line = json.loads(raw.decode(errors="replace"))
        if "turn" in line:
            turn = line["turn"]
            first_audio = turn["first_audio_ms"] if turn["first_audio_ms"] >= 0 else float("nan")
            result.turns.append(
                Turn(
                    message,
                    first_audio,
                    turn["server_first_audio_ms"],
                    turn["audio_messages"],
                    turn["in_order"],
                    turn["reason"],
                    turn["caption_messages"],
                )
            )
        elif "error" in line:
            result.errors.append(line["error"])
        elif "done" in line:
            result.client_cpu_s = line["done"]["cpu_s"]
            result.peak_streams = line["done"]["peak_streams"]
