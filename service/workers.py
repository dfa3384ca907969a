"""Several service processes on one port, so that every core of a host serves streams.

``PARLEY_WORKERS=N`` (``--workers N``; ``auto``: one per core) makes ``python -m service`` a
supervisor: it starts N workers, each a whole service (``python -m service`` with ``PARLEY_WORKERS=1``)
with its own engines, all listening on the same port (gRPC sets ``SO_REUSEPORT``, and the kernel
spreads new connections over them, as gRPC's Python multiprocessing example does). A connection, and
every stream on it, stays with one worker; a session resumed on another connection may land on
another worker, so several workers need a session store they share: the Redis store (the memory
store refuses to run with several workers). The supervisor restarts a worker that dies (after a
second, longer if it keeps dying), but not one that cannot start (exit status 2, bad settings: then
it stops them all and exits 2), and on SIGTERM or SIGINT passes SIGTERM to every worker, which
drains as a lone service does, and exits once all have (0 when every running worker drained). A
worker gets SIGTERM when the supervisor dies, however it dies (Linux). Worker i serves its metrics
on ``PARLEY_METRICS_PORT + i``. A lone service does not share its port: a second one on the same
port fails to start.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time

__all__ = ["CONFIGURATION_ERROR", "MAX_RESTART_DELAY_S", "WORKER_INDEX", "supervise"]

log = logging.getLogger("service.workers")

MAX_RESTART_DELAY_S = 30.0
CONFIGURATION_ERROR = 2
"""A service's exit status for settings it cannot run with: a worker that exits so is not restarted."""
WORKER_INDEX = "PARLEY_WORKER_INDEX"
"""Set in each worker's environment: its index (a lone service has none)."""
_PR_SET_PDEATHSIG = 1
_STABLE_S = 30.0  # a worker that ran this long before dying is restarted after the shortest delay


async def supervise(count: int, argv: list[str], metrics_port: int | None) -> int:
    """Run ``count`` workers until SIGTERM or SIGINT; the exit status."""
    argv = _without_workers(argv)  # (each worker is one service)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    workers: dict[int, asyncio.subprocess.Process] = {}
    delays = dict.fromkeys(range(count), 1.0)

    failed: list[int] = []  # exit statuses that stop the supervisor (a worker that cannot start)

    async def start(index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, "PARLEY_WORKERS": "1", WORKER_INDEX: str(index)}
        if metrics_port is not None:
            env["PARLEY_METRICS_PORT"] = str(metrics_port + index)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", *argv, env=env, preexec_fn=_die_with_parent
        )
        log.info("worker %d started (pid %d)", index, process.pid)
        return process

    async def keep(index: int) -> None:
        while not stopping.is_set():
            process = workers[index] = await start(index)
            began = time.monotonic()
            waiting = asyncio.ensure_future(process.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if stopping.is_set():
                waiting.cancel()
                return
            code = process.returncode
            if code == CONFIGURATION_ERROR:  # (it said why; starting it again would say it again)
                log.error("worker %d (pid %d) cannot start (exit %d): stopping every worker", index, process.pid, code)
                failed.append(code)
                stopping.set()
                return
            if time.monotonic() - began > _STABLE_S:
                delays[index] = 1.0
            log.error(
                "worker %d (pid %d) exited with %s; restarting it in %g s", index, process.pid, code, delays[index]
            )
            try:
                async with asyncio.timeout(delays[index]):
                    await stopping.wait()
                return
            except TimeoutError:
                delays[index] = min(delays[index] * 2, MAX_RESTART_DELAY_S)

    keepers = [asyncio.create_task(keep(i), name=f"worker {i}") for i in range(count)]
    log.info("supervising %d workers", count)
    await stopping.wait()
    await asyncio.gather(*keepers, return_exceptions=True)  # (none starts a worker any more)
    running = [p for p in workers.values() if p.returncode is None]  # (not one waiting to be restarted)
    log.info("stopping %d workers (SIGTERM: each drains its streams)", len(running))
    for process in running:
        process.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(p.wait() for p in running))
    log.info("all workers stopped")
    if failed:
        return failed[0]
    return 0 if all(code == 0 for code in codes) else 1


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor dies, however it dies (Linux), so that
    no worker is left serving the port on its own."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _without_workers(argv: list[str]) -> list[str]:
    """``argv`` without ``--workers N`` (or ``--workers=N``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept
