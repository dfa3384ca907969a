"""Several service processes on one port, so that every core of a host serves streams.

``PARLEY_WORKERS=N`` (``--workers N``; ``auto``: one per core) makes ``python -m service`` a
supervisor: it starts N workers, each a whole service (``python -m service`` with
``PARLEY_WORKERS=1``) with its own engines, all listening on the same port (gRPC sets
``SO_REUSEPORT``, and the kernel spreads new connections over them, as gRPC's Python multiprocessing
example does). A connection, and every stream on it, stays with one worker; a session resumed on
another connection may land on another worker, so several workers need a session store they share:
the Redis store (the memory store refuses to run with several workers). The supervisor restarts a
worker that dies (after a second, longer if it keeps dying), but not one that cannot start: one that
exits with status 2 (bad settings), or that exits before it ever served (its port or a file, the
store or an engine it cannot reach: a worker tells the supervisor through a pipe once it listens).
Then it stops them all and exits with that status, as a lone service would. Once it listens, a
worker's event loop beats on that pipe every :data:`HEARTBEAT_S`; one silent for
``PARLEY_WORKER_TIMEOUT_S`` (its loop stuck, or the process stopped) is killed (SIGKILL) and
restarted, as gunicorn does with its worker timeout: the kernel would otherwise go on giving it its
share of new connections, which would hang. On SIGTERM or SIGINT it passes SIGTERM to every worker,
which drains as a lone service does (a second signal is passed on as :data:`HURRY`: the workers end
their streams at once; workers ignore SIGINT, a terminal's Ctrl-C, which reaches them through the
supervisor, and a SIGTERM that comes twice, from a signal to the whole process group), and
exits once all have (0 when every running worker drained;
one still running :data:`STOP_MARGIN_S` past the drain's grace is killed, and the status is 1); with
TLS on, SIGHUP it passes on (each worker reads its certificates again), and without, SIGHUP stops
them as SIGTERM does (unless it was ignored when the supervisor started: ``nohup``). More than
``MAX_WORKERS_PER_CORE`` workers per core are refused (by the settings). A worker gets SIGTERM when
the supervisor dies, however it dies (Linux). With ``PARLEY_METRICS_PORT``, the supervisor serves every
worker's metrics there, each series labelled with its ``worker`` (:mod:`service.worker_metrics`): each
worker serves its own on a loopback port it tells the supervisor as it comes to serve. A port is one
service's: a lone service does not share it, and a supervisor refuses a port
something already listens on (another supervisor's workers included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import time

__all__ = [
    "CONFIGURATION_ERROR",
    "HURRY",
    "HEARTBEAT_S",
    "MIN_WORKER_TIMEOUT_S",
    "MAX_RESTART_DELAY_S",
    "MAX_WORKERS_PER_CORE",
    "WORKER_INDEX",
    "become_worker",
    "core_count",
    "port_taken",
    "supervise",
    "tell_ready",
]

log = logging.getLogger("service.workers")

MAX_RESTART_DELAY_S = 30.0
MAX_WORKERS_PER_CORE = 4
"""More workers than this per core are refused (a typo such as 20 for 2 would load 20 sets of engines)."""
CONFIGURATION_ERROR = 2
"""A service's exit status for settings it cannot run with: a worker that exits so is not restarted."""
WORKER_INDEX = "PARLEY_WORKER_INDEX"
"""Set in each worker's environment: its index (a lone service has none)."""
_SUPERVISOR = "PARLEY_SUPERVISOR_PID"
"""Set in each worker's environment: its supervisor's pid (see :func:`become_worker`)."""
HURRY = signal.SIGUSR1
"""The supervisor's word to a worker that drains: end the turns still running at once (the supervisor
was signalled a second time). Not a second SIGTERM: a signal to the whole process group reaches each
worker twice, once from the group and once from its supervisor, and is still one signal."""
READY_FD = "PARLEY_READY_FD"
"""Set in each worker's environment: the pipe on which it tells the supervisor that it listens, then
beats."""
HEARTBEAT_S = 1.0
"""How often a worker that listens tells its supervisor that its event loop runs."""
MIN_WORKER_TIMEOUT_S = 3 * HEARTBEAT_S
"""The shortest ``PARLEY_WORKER_TIMEOUT_S`` (but 0, never): three heartbeats, so that one late on a busy
machine does not get a healthy worker killed."""
_PR_SET_PDEATHSIG = 1
STOP_MARGIN_S = 5.0
"""After SIGTERM, how long past its drain's grace a worker has to exit (its last history is written,
its session let go) before it is killed."""
_STABLE_S = 30.0  # a worker that ran this long before dying is restarted after the shortest delay


async def supervise(
    count: int,
    argv: list[str],
    metrics_port: int | None,
    *,
    host: str | None = None,
    port: int | None = None,
    reload_on_hup: bool = False,
    timeout_s: float = 0.0,
    grace_s: float = 10.0,
) -> int:
    """Run ``count`` workers until SIGTERM or SIGINT; the exit status. With ``host`` and ``port``, first
    refuse (exit 1) a port something already listens on. With ``reload_on_hup`` (TLS is on), SIGHUP is
    passed to the workers, which read their certificates again; without, it ends the supervisor as it
    ends a lone service (and the workers drain). With ``timeout_s``, a worker that served and then sent
    no heartbeat for so long is killed, then restarted. On SIGTERM or SIGINT each worker drains its
    streams for up to ``grace_s``; one still running :data:`STOP_MARGIN_S` after that (stopped, or
    stuck) is killed, and the exit status is 1."""
    if host is not None and port is not None and (taken := port_taken(host, port)) is not None:
        log.error("cannot start: %s", taken)
        return 1
    metrics = None
    if metrics_port is not None:
        from service.config import address
        from service.worker_metrics import WorkerMetrics

        metrics = WorkerMetrics(count, lambda: _metrics_ports(workers, heard))
        where = host or "127.0.0.1"
        try:
            served_on = metrics.serve(where, metrics_port)
        except OSError as error:
            log.error(
                "cannot start: cannot serve metrics on %s: %s", address(where, metrics_port), error.strerror or error
            )
            return 1
        log.info("metrics of every worker on http://%s/metrics", address(where, served_on))
    argv = _worker_argv(argv)  # (each worker is one service)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    workers: dict[int, asyncio.subprocess.Process] = {}

    def signalled(name: str) -> None:  # (SIGTERM or SIGINT: the first stops, a second hurries the workers)
        if not stopping.is_set():
            stopping.set()
            return
        running = [  # (one still starting has no streams, and may not yet ignore HURRY, whose default kills)
            process for index, process in workers.items() if process.returncode is None and _came_to_serve(heard[index])
        ]
        log.info(
            "%s again: passed on to the %d worker(s) still running, which end their streams now", name, len(running)
        )
        for process in running:
            process.send_signal(HURRY)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled, signal.Signals(sig).name)
    heard: dict[int, _Beats] = {}  # (each worker's pipe: whether it serves)

    def reload() -> None:  # (SIGHUP: each worker reads its TLS certificates again, as a lone service does)
        serving = [
            process for index, process in workers.items() if process.returncode is None and _came_to_serve(heard[index])
        ]
        log.info("SIGHUP: passed to %d workers (one still starting reads its certificates as it starts)", len(serving))
        for process in serving:
            process.send_signal(signal.SIGHUP)

    def hung_up() -> None:  # (SIGHUP without TLS: nothing to read again; a closed terminal's, most often)
        log.info("SIGHUP, and no TLS certificates to read again: stopping the workers as on SIGTERM")
        stopping.set()

    if reload_on_hup:
        loop.add_signal_handler(signal.SIGHUP, reload)
    elif signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (nohup's: it stays ignored)
        loop.add_signal_handler(signal.SIGHUP, hung_up)
    delays = dict.fromkeys(range(count), 1.0)

    failed: list[int] = []  # exit statuses that stop the supervisor (a worker that cannot start)

    async def start(index: int) -> tuple[asyncio.subprocess.Process, _Beats]:
        """A worker, and its end of the pipe (whether it came to serve, its heartbeats)."""
        env = {**os.environ, "PARLEY_WORKERS": "1", WORKER_INDEX: str(index), _SUPERVISOR: str(os.getpid())}
        env.pop("PARLEY_METRICS_PORT", None)
        if metrics_port is not None:
            env["PARLEY_METRICS_PORT"] = "0"  # (a loopback port of its choosing, which it tells: tell_ready)
        readable, writable = os.pipe()
        env[READY_FD] = str(writable)
        try:
            # (No preexec_fn: Python run between fork and exec, in a process with other threads, can
            # deadlock or abort the child, and it keeps the fork from being a vfork. The worker sets
            # itself up as it starts: become_worker.)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", *argv, env=env, pass_fds=(writable,)
            )
        except BaseException:
            os.close(readable)
            raise
        finally:
            os.close(writable)
        beats = _Beats(readable)
        log.info("worker %d started (pid %d)", index, process.pid)
        return process, beats

    check_every = min(1.0, timeout_s / 4) if timeout_s > 0 else None  # (how often a silence is looked for)

    async def keep(index: int) -> None:
        ever_served = False
        while not stopping.is_set():
            process, beats = await start(index)
            workers[index], heard[index] = process, beats
            began = time.monotonic()
            hung = False
            waiting = asyncio.ensure_future(process.wait())
            stop = asyncio.ensure_future(stopping.wait())
            while True:
                done, _ = await asyncio.wait({waiting, stop}, timeout=check_every, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    break
                if (silent := beats.silent_s()) is not None and silent > timeout_s:
                    log.error(
                        "worker %d (pid %d) has not answered for %g s (its event loop is stuck, or the process "
                        "was stopped): killing it",
                        index,
                        process.pid,
                        timeout_s,
                    )
                    process.kill()
                    hung = True
                    await waiting
                    break
            stop.cancel()
            if stopping.is_set():
                waiting.cancel()
                return
            code = process.returncode
            ever_served |= await beats.served  # (its end of the pipe closed when it exited)
            if code == CONFIGURATION_ERROR or not ever_served:  # (it said why; again would say it again)
                log.error("worker %d (pid %d) cannot start (%s): stopping every worker", index, process.pid, _how(code))
                failed.append(code if code is not None and code > 0 else 1)
                stopping.set()
                return
            if time.monotonic() - began > _STABLE_S:
                delays[index] = 1.0
            if metrics is not None:
                metrics.restarted(index, "hung" if hung else "exited" if code == 0 else "crashed")
            # (Exit 0 is a worker that drained after a SIGTERM of its own, an operator's say: no crash.)
            log.log(
                logging.WARNING if code == 0 else logging.ERROR,
                "worker %d (pid %d) %s; restarting it in %g s",
                index,
                process.pid,
                _how(code),
                delays[index],
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
    waits = [asyncio.ensure_future(p.wait()) for p in running]
    _, late = await asyncio.wait(waits, timeout=grace_s + STOP_MARGIN_S) if waits else (set(), set())
    if late:
        for process in running:
            if process.returncode is None:
                log.error(
                    "worker pid %d had not stopped %g s after its %g s to drain (stopped, or stuck): killing it",
                    process.pid,
                    STOP_MARGIN_S,
                    grace_s,
                )
                process.kill()
        await asyncio.wait(late)
    served = {process.pid for index, process in workers.items() if _came_to_serve(heard[index])}
    codes = []
    for process in running:
        code = process.returncode
        if code == -signal.SIGTERM and process.pid not in served:  # (still starting: it had nothing to drain)
            log.info("worker pid %d stopped before it served", process.pid)
            code = 0
        elif code != 0:  # (one that served and did not drain: it was killed, or failed as it stopped)
            log.warning("worker pid %d %s as it stopped", process.pid, _how(code))
        codes.append(code)
    log.info("all workers stopped")
    if failed:
        return failed[0]
    return 0 if all(code == 0 for code in codes) else 1


class _Beats:
    """The supervisor's end of a worker's pipe: the first message says it listens (``m<port>\\n``:
    and serves its metrics on that loopback port), each byte after that that its event loop runs; the
    pipe's end, that it exited."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self.metrics_port: int | None = None
        loop = asyncio.get_running_loop()
        self.served: asyncio.Future[bool] = loop.create_future()
        """Whether the worker came to serve: known by its first byte, or by the pipe's end."""
        self._last = 0.0
        loop.add_reader(fd, self.read)

    def read(self) -> None:
        """Take what the worker said (called when the pipe is readable, and before judging it)."""
        if self._fd is None:
            return
        try:
            said = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        if said:
            self._last = time.monotonic()
            if not self.served.done() and said.startswith(b"m"):  # (one write: whole in the first read)
                with contextlib.suppress(ValueError):
                    self.metrics_port = int(said[1 : said.index(b"\n")])
        else:  # (it exited: the pipe is no more use)
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if not self.served.done():
            self.served.set_result(bool(said))

    def silent_s(self) -> float | None:
        """How long the worker has said nothing since it came to serve; None before, or once it exited."""
        self.read()  # (beats that wait unread, after the supervisor itself was held up, count)
        if self._fd is None or not self.served.done():
            return None
        return time.monotonic() - self._last


def _metrics_ports(workers: dict[int, asyncio.subprocess.Process], heard: dict[int, _Beats]) -> dict[int, int]:
    """Where each worker that serves serves its metrics (read in the metrics server's thread: copies,
    each taken whole under the GIL; a worker that just exited is read and found gone)."""
    processes, beats = workers.copy(), heard.copy()
    return {
        index: port
        for index, said in beats.items()
        if (port := said.metrics_port) is not None and index in processes and processes[index].returncode is None
    }


def _came_to_serve(beats: _Beats) -> bool:
    beats.read()  # (a first message that waits unread counts)
    return beats.served.done() and beats.served.result()


def _how(code: int | None) -> str:
    """How a worker ended: "exited with 1", "killed by SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


def become_worker() -> None:
    """In a worker, first thing: SIGTERM when the supervisor dies, however it dies (Linux), so that
    no worker is left serving the port on its own (and at once if it died before this ran); SIGHUP
    ignored until the worker serves (it then reads its TLS certificates on SIGHUP; the supervisor
    passes SIGHUP only to workers that serve: one still starting reads them fresh anyway). Nothing in
    a lone service."""
    supervisor = os.environ.pop(_SUPERVISOR, None)
    if supervisor is None:
        return
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (with TLS, the served worker's handler replaces it)
    # A terminal's Ctrl-C reaches every process of its group: the supervisor passes it on as SIGTERM,
    # and a worker that took it too would count that SIGTERM as the second signal, which hurries.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(HURRY, signal.SIG_IGN)  # (its default ends the process: one still starting takes it so)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != supervisor:  # (it died before the line above: no signal will come)
        os.kill(os.getpid(), signal.SIGTERM)


def tell_ready(metrics_port: int | None = None) -> None:
    """In a worker, once it listens (call it on the event loop): tell the supervisor (and where it
    serves its metrics), then beat every :data:`HEARTBEAT_S` from the loop for as long as it runs (a
    lone service has no one to tell)."""
    setting = os.environ.pop(READY_FD, None)
    if setting is None:
        return
    try:
        fd = int(setting)
        os.set_blocking(fd, False)  # (a supervisor that reads late never holds the loop)
    except (OSError, ValueError):
        return
    loop = asyncio.get_running_loop()
    first = b"m%d\n" % metrics_port if metrics_port is not None else b"1"  # (under PIPE_BUF: one write)

    def beat(said: bytes = b"1") -> None:
        try:
            os.write(fd, said)
        except BlockingIOError:  # (the pipe is full: the supervisor has beats enough to read)
            pass
        except OSError:  # (the supervisor is gone)
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        loop.call_later(HEARTBEAT_S, beat)

    beat(first)


def core_count() -> int:
    """The cores this process may use: those it may run on (``taskset``, a cpuset), and no more than
    its CPU quota (a container's limit, cgroup v2's ``cpu.max``) allows, rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as limit:
            quota, period = limit.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be the workers' (something listens there), or None. The probe binds
    without ``SO_REUSEPORT``, which the kernel refuses while any socket listens on the port."""
    from service.config import address  # (the settings import this module)

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:
        return f"cannot bind to address {address(host, port)}: {error}"
    family, kind, proto, _, socket_address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(socket_address)
        except OSError as error:
            hint = " (is another service on it?)" if error.errno == errno.EADDRINUSE else ""
            return f"cannot bind to address {address(host, port)}: {error.strerror or error}{hint}"
    return None


def _worker_argv(argv: list[str]) -> list[str]:
    """``argv`` for a worker: without ``--workers N`` (each worker is one service) and without
    ``--metrics-port N`` (which would beat the ``PARLEY_METRICS_PORT`` each worker is given), in either
    form (``--name value`` or ``--name=value``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--workers", "--metrics-port", "--metrics_port"):
            skip = True
        elif not arg.startswith(("--workers=", "--metrics-port=", "--metrics_port=")):
            kept.append(arg)
    return kept
