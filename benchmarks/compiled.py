"""The compiled load generator (``benchmarks/loadgen/loadgen.cc``, gRPC C++): built on first use into
``build/loadgen/`` from the contract's ``.proto``, and driven from here.

It holds the same conversations as :func:`benchmarks.load.run_load`'s Python streams (one connection
per stream, the same ramp and pauses, first audio measured at the client) for about a tenth of their
CPU, so that on a small machine the cores go to the service being measured. It needs Debian's
``libgrpc++-dev``, ``protobuf-compiler-grpc``, ``pkg-config`` and ``g++``.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
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


def build() -> Path:
    """The generator's executable, compiled if it is missing or older than its sources. Raises
    RuntimeError saying what to install when a tool is missing, or what the compiler said."""
    binary = BUILD / "loadgen"
    if binary.exists() and binary.stat().st_mtime > max(SOURCE.stat().st_mtime, PROTO.stat().st_mtime):
        return binary
    missing = [tool for tool in ("g++", "pkg-config", "protoc", "grpc_cpp_plugin") if shutil.which(tool) is None]
    if not missing and subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        missing.append("grpc++ (pkg-config)")
    if missing:
        raise RuntimeError(f"the compiled load generator needs {', '.join(missing)}: apt-get install {PACKAGES}")
    BUILD.mkdir(parents=True, exist_ok=True)
    plugin = shutil.which("grpc_cpp_plugin")
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True, text=True, check=True
    ).stdout.split()
    steps = [
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"--cpp_out={BUILD}",
            f"--grpc_out={BUILD}",
            f"--plugin=protoc-gen-grpc={plugin}",
            str(PROTO),
        ],
        [
            "g++",
            "-O2",
            "-std=c++20",
            f"-I{BUILD}",
            str(SOURCE),
            str(BUILD / "parley" / "v1" / "voice.pb.cc"),
            str(BUILD / "parley" / "v1" / "voice.grpc.pb.cc"),
            *flags,
            "-o",
            str(BUILD / "loadgen.partial"),
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the load generator failed: {shlex.join(step[:2])} …\n{done.stderr[-2000:]}")
    (BUILD / "loadgen.partial").replace(binary)
    return binary


async def drive(target: str, concurrency: int, turns: int, message: str, deadline: float, result: LoadResult) -> None:
    """Run the generator against ``target`` and put its turns, errors, CPU and peak into ``result``."""
    from benchmarks.load import Turn

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
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())
    async for raw in process.stdout:
        line = json.loads(raw)
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
                )
            )
        elif "error" in line:
            result.errors.append(line["error"])
        elif "done" in line:
            result.client_cpu_s = line["done"]["cpu_s"]
            result.peak_streams = line["done"]["peak_streams"]
    code = await process.wait()
    if code != 0:
        raise RuntimeError(f"the load generator exited with {code}: {(await stderr).decode()[-2000:]}")
    await stderr
