"""One service process against several (``PARLEY_WORKERS``), side by side in one run: the scripted
engines, sessions in a Redis started here (Debian's redis-server), 200 and 500 streams, the same
load generator (one connection per stream, so the kernel spreads them over the workers). Reports the
overhead on first audio (p50/p99), the failed turns, and the share of the machine the service and
the load generator each used."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

from benchmarks import load
from benchmarks.report import percentile

__all__ = ["measure"]


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def measure(profile: str, message: str, turns: int, deadline: float, counts: tuple[int, ...] = (200, 500)) -> str:
    ideal = load.ideal_first_audio_ms(profile, message)
    cores = os.cpu_count() or 1
    rows = []
    with redis_server() as redis_url:
        for workers in (1, cores):
            env = {
                "PARLEY_WORKERS": str(workers),
                "PARLEY_SESSION_STORE": "redis",
                "PARLEY_REDIS_URL": redis_url,
                "PARLEY_STT": "none",
            }
            with load.ServiceProcess(profile, max(counts) + 10, env=env) as service:
                await service.wait_ready()
                await load.run_load(service, 10, 1, message, deadline)  # warm-up: every worker's first turns
                for count in counts:
                    if time.monotonic() > deadline:
                        rows.append(f"| {workers} | {count} | not run: --duration reached | | | | | |")
                        continue
                    result = await load.run_load(service, count, turns, message, deadline)
                    overhead = [t.first_audio_ms - ideal for t in result.turns]
                    failed = len(result.errors) + sum(t.reason != "TURN_END_REASON_COMPLETED" for t in result.turns)
                    wall = max(result.wall_s, 1e-9)
                    rows.append(
                        f"| {workers} | {count} | {len(result.turns)} | {percentile(overhead, 50):.1f} ms "
                        f"| {percentile(overhead, 99):.1f} ms | {failed} | {result.cpu_s / wall / cores:.0%} "
                        f"| {result.client_cpu_s / wall / cores:.0%} |"
                    )
    return "\n".join(
        [
            f"Scripted profile `{profile}`, {turns} turns per stream, one connection per stream; sessions in Redis "
            f"(both runs, so that only the number of processes differs); {cores} cores. Overhead: first audio at the "
            "client minus the profile's ideal. Machine share: CPU time over wall time over cores, for the service "
            "(its processes together) and for the load generator (this Python process, on the same cores).",
            "",
            "| workers | streams | turns | overhead p50 | p99 | failed | service's share | load generator's share |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
