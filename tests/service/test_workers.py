"""Several service processes on one port (PARLEY_WORKERS): they share the port and the Redis store,
a worker that dies is restarted, SIGTERM drains them all; the memory store refuses several workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from tests.conftest import ROOT, converse_all, free_port, start, start_service_process, user, wait_for


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def wait_for_lines(process: subprocess.Popen[str], marker: str, count: int, timeout_s: float = 60) -> str:
    assert process.stdout is not None
    log, deadline = "", time.monotonic() + timeout_s
    while log.count(marker) < count:
        assert time.monotonic() < deadline, log
        line = process.stdout.readline()
        assert line, f"the service exited:\n{log}"
        log += line
    return log


async def one_turn(port: int) -> pb.TurnEnded:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        responses = await converse_all(voice_pb2_grpc.VoiceServiceStub(channel), [start(), user("Hi?")])
    return responses[-1].turn_ended


async def end_of_a_turn_signalled(port: int, signal_it: Callable[[], object]) -> pb.TurnEnded:
    """Begin a turn on ``port``, call ``signal_it`` once its audio flows, half-close, and read to the
    end: the turn's end (its stream must end OK: it drained)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).Converse()
        await call.write(start())
        await call.write(user("Tell me about the sky."))
        while (await call.read()).WhichOneof("kind") != "audio":  # the turn is under way
            pass
        signal_it()
        await call.done_writing()
        responses = []
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
    return responses[-1].turn_ended


async def drained(parent: subprocess.Popen[str]) -> int:
    """SIGTERM to the supervisor; its exit status once every worker drained."""
    parent.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(parent.wait, 60)


def reap(parent: subprocess.Popen[str]) -> None:
    """However a test ended: the supervisor gone, its output read."""
    if parent.poll() is None:
        parent.kill()
    parent.communicate(timeout=30)


def start_workers(port: int, redis_url: str, **settings: str) -> subprocess.Popen[str]:
    """Two workers on ``port``, scripted engines, sessions in Redis under a prefix of their own."""
    return start_service_process(
        workers="2",
        port=str(port),
        llm="scripted",
        tts="scripted",
        stt="none",
        session_store="redis",
        redis_url=redis_url,
        redis_prefix=f"w{secrets.token_hex(4)}",
        **settings,
    )


async def test_workers_share_a_port_are_restarted_and_drain_together(redis_url: str) -> None:
    port = free_port()
    parent = start_workers(port, redis_url, shutdown_grace="5")  # (misspelled: said once, by the supervisor)
    try:
        log = await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        assert "[w0] service: Parley listening" in log and "[w1] service: Parley listening" in log  # (which worker)
        said = "WARNING service: PARLEY_SHUTDOWN_GRACE is not a variable Parley reads; it is ignored (did you mean "
        assert log.count(said) == 1 and f"{said}PARLEY_SHUTDOWN_GRACE_S?)" in log
        workers = await asyncio.to_thread(children, parent.pid)
        assert len(workers) == 2
        ends = await asyncio.gather(*(one_turn(port) for _ in range(6)))  # new connections: either worker
        assert all(e.reason == pb.TURN_END_REASON_COMPLETED for e in ends)
        killed = min(workers)
        os.kill(killed, signal.SIGKILL)
        log = await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 1)  # its replacement
        assert f"(pid {killed}) was killed by SIGKILL; restarting it in 1 s" in log
        replaced = await asyncio.to_thread(children, parent.pid)
        assert len(replaced) == 2 and killed not in replaced
        assert (await one_turn(port)).reason == pb.TURN_END_REASON_COMPLETED
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 60) == 0
        for pid in replaced:  # no worker left behind
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"worker {pid} still runs")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=30)


async def test_a_worker_that_stops_answering_is_killed_and_restarted(redis_url: str) -> None:
    # Found in an SRE's chaos pass: a stopped worker (SIGSTOP; a loop stuck for good is the same) kept
    # its share of the port, so the kernel went on giving it new connections, which hung.
    port = free_port()
    parent = start_workers(port, redis_url, worker_timeout_s="3")
    try:
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        workers = await asyncio.to_thread(children, parent.pid)
        await asyncio.sleep(5)  # (healthy workers beat: none is taken for hung)
        assert await asyncio.to_thread(children, parent.pid) == workers
        stopped = min(workers)
        os.kill(stopped, signal.SIGSTOP)
        log = await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 1, 30)  # its replacement
        assert f"(pid {stopped}) has not answered for 3 s (its event loop is stuck, or the process was stopped)" in log
        assert f"(pid {stopped}) was killed by SIGKILL; restarting it in 1 s" in log
        assert stopped not in await asyncio.to_thread(children, parent.pid)
        ends = await asyncio.gather(*(one_turn(port) for _ in range(6)))  # new connections: either worker
        assert all(e.reason == pb.TURN_END_REASON_COMPLETED for e in ends)
        assert await drained(parent) == 0
    finally:
        reap(parent)


async def test_a_worker_that_does_not_stop_is_killed_after_the_grace_and_the_rest(redis_url: str) -> None:
    # Found in an SRE's chaos pass: a worker stopped (SIGSTOP) when the supervisor was told to stop
    # kept it waiting for good, and the supervisor never exited.
    port = free_port()
    parent = start_workers(port, redis_url, shutdown_grace_s="1")
    try:
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        workers = await asyncio.to_thread(children, parent.pid)
        stopped = min(workers)
        os.kill(stopped, signal.SIGSTOP)
        assert await drained(parent) == 1  # (in 1 s of grace and 5 more, not never)
        out, _ = parent.communicate(timeout=30)
        assert f"worker pid {stopped} had not stopped 5 s after its 1 s to drain (stopped, or stuck): killing it" in out
        assert f"worker pid {stopped} was killed by SIGKILL as it stopped" in out
        assert all(_gone(pid) for pid in workers)
    finally:
        reap(parent)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_workers_outlive_neither_a_killed_supervisor_nor_a_clean_stop_during_a_restart(redis_url: str) -> None:
    port = free_port()
    settings = {
        "workers": "2",
        "port": str(port),
        "llm": "scripted",
        "tts": "scripted",
        "stt": "none",
        "session_store": "redis",
        "redis_url": redis_url,
        "redis_prefix": f"w{secrets.token_hex(4)}",
    }
    # SIGTERM while a worker waits to be restarted: the others drain, and the exit is clean.
    parent = start_service_process(**settings)
    try:
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        os.kill(min(await asyncio.to_thread(children, parent.pid)), signal.SIGKILL)
        await asyncio.to_thread(wait_for_lines, parent, "restarting it in", 1)
        assert await drained(parent) == 0
    finally:
        reap(parent)
    # The supervisor killed outright: its workers stop too (none keeps serving the port on its own).
    await kill_the_supervisor_once(start_service_process(**settings), "Parley listening", 2)
    # Killed while its workers still load (each sets itself to go with its supervisor as it starts,
    # and one that finds it gone already goes at once).
    await kill_the_supervisor_once(start_service_process(**settings), "worker 1 started", 1)


async def kill_the_supervisor_once(parent: subprocess.Popen[str], marker: str, count: int) -> None:
    """SIGKILL to the supervisor once its log says ``marker`` ``count`` times: every worker must go."""
    try:
        await asyncio.to_thread(wait_for_lines, parent, marker, count)
        workers = await asyncio.to_thread(children, parent.pid)
        parent.kill()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            await asyncio.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=30)


@pytest.mark.parametrize(
    ("exit_status", "why"),
    [
        (2, "invalid setting"),  # settings it cannot run with
        # Its port or a file it needs, the store or an engine it cannot reach, before it ever served: a
        # lone service exits 1 at once, and so does the supervisor (it restarted such workers for ever).
        (1, "cannot start: the API keys file"),
    ],
)
async def test_a_worker_that_cannot_start_is_not_restarted(
    exit_status: int, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import workers

    broken = tmp_path / "python"  # stands for a worker that cannot start (it never says it serves)
    broken.write_text(f"#!{sys.executable}\nimport sys\nprint({why!r}, file=sys.stderr)\nsys.exit({exit_status})\n")
    broken.chmod(0o755)
    monkeypatch.setattr(workers.sys, "executable", str(broken))
    began = time.monotonic()
    assert await asyncio.wait_for(workers.supervise(2, [], None), timeout=20) == exit_status
    assert time.monotonic() - began < 5  # (not restarted after 1 s, 2 s, 4 s, …)


async def test_a_supervisor_refuses_a_port_something_listens_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another supervisor's workers share their port (SO_REUSEPORT): a second supervisor's would have
    # joined them, splitting the traffic between two configurations.
    import socket

    from service import workers

    started = tmp_path / "started"
    worker = tmp_path / "python"
    worker.write_text(f"#!{sys.executable}\nimport pathlib, sys\npathlib.Path({str(started)!r}).touch()\nsys.exit(2)\n")
    worker.chmod(0o755)
    monkeypatch.setattr(workers.sys, "executable", str(worker))
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert await asyncio.wait_for(workers.supervise(2, [], None, host="127.0.0.1", port=port), timeout=20) == 1
    assert not started.exists()  # no worker was started
    assert await asyncio.wait_for(workers.supervise(2, [], None, host="127.0.0.1", port=port), timeout=20) == 2
    assert started.exists()  # (once the port is free, the workers start)


async def test_the_supervisor_serves_every_workers_metrics_on_the_one_port(redis_url: str) -> None:
    # An SRE's pass: worker i served its metrics on PARLEY_METRICS_PORT + i, and a pod's annotation (or a
    # ServiceMonitor) names one port: with two workers, half the figures went unseen. (And the flag
    # beats the environment: each worker kept --metrics-port N, and all but one failed to bind it.)
    from tests.service.test_metrics import scrape

    port, metrics = free_port(), free_port()
    env = {**os.environ, "PARLEY_LLM": "scripted", "PARLEY_TTS": "scripted", "PARLEY_STT": "none"}
    env.update(PARLEY_SESSION_STORE="redis", PARLEY_REDIS_URL=redis_url, PARLEY_SCRIPTED_PROFILE="quick")
    argv = ["--workers", "2", "--port", str(port), f"--metrics-port={metrics}"]
    parent = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "service", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def up() -> float:
        return sum(v for k, v in scrape(metrics, ("worker",)).items() if k.startswith("parley_worker_up{"))

    try:
        log = await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        assert f"metrics of every worker on http://127.0.0.1:{metrics}/metrics" in log
        await asyncio.gather(*(one_turn(port) for _ in range(6)))  # new connections: either worker
        samples = await asyncio.to_thread(scrape, metrics, ("worker",))
        assert samples["parley_worker_up{worker=0}"] == samples["parley_worker_up{worker=1}"] == 1
        assert "parley_active_streams{worker=0}" in samples and "parley_active_streams{worker=1}" in samples
        completed = [v for k, v in samples.items() if k.startswith("parley_turns_total{reason=completed,")]
        assert len(completed) == 2 and sum(completed) == 6  # (each worker's, told apart, none lost)
        killed = max(await asyncio.to_thread(children, parent.pid))
        os.kill(killed, signal.SIGKILL)
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 1)  # its replacement
        samples = await asyncio.to_thread(scrape, metrics, ("worker",))
        restarted = {k: v for k, v in samples.items() if k.startswith("parley_worker_restarts_total") and v}
        assert len(restarted) == 1 and "{reason=crashed," in next(iter(restarted))  # (a SIGKILL)
        await wait_for(lambda: up() == 2, 10)
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 60) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=30)


def test_auto_counts_the_cores_this_process_may_use() -> None:
    from service.workers import core_count

    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # as `taskset -c 0` or a cpuset does
        assert core_count() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert core_count() == min(len(allowed), core_count())


def test_a_lone_service_does_not_share_its_port() -> None:
    port = free_port()
    first = start_service_process(port=str(port), llm="scripted", tts="scripted", stt="none")
    try:
        wait_for_lines(first, "Parley listening", 1)
        env = {**os.environ, "PARLEY_PORT": str(port), "PARLEY_LLM": "scripted", "PARLEY_TTS": "scripted"}
        env["PARLEY_STT"] = "none"
        second = subprocess.run(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        # (It said gRPC's "Failed to bind ...; set GRPC_VERBOSITY=debug ..." without the cause: a QA pass.)
        assert f"cannot start: cannot bind to address 127.0.0.1:{port}: Address already in use" in second.stderr
        assert "(is another service on it?)" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_a_metrics_port_in_use_is_said_plainly() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "PARLEY_LLM": "scripted", "PARLEY_TTS": "scripted", "PARLEY_STT": "none"}
        env.update(PARLEY_PORT=str(free_port()), PARLEY_METRICS_PORT=str(taken.getsockname()[1]))
        env["PARLEY_LOG_FORMAT"] = "json"
        result = subprocess.run(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot serve metrics on" in result.stderr


def test_several_workers_refuse_the_memory_store() -> None:
    env = {**os.environ, "PARLEY_WORKERS": "2", "PARLEY_SESSION_STORE": "memory", "PARLEY_LLM": "scripted"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "several workers need a session store they share: set PARLEY_SESSION_STORE=redis" in result.stderr


def test_more_workers_than_four_per_core_are_refused() -> None:
    # Found in QA: PARLEY_WORKERS=99999 was taken, and the host spent minutes starting workers (each
    # loading its own engines) with SIGTERM unheard.
    from service.workers import core_count

    too_many = 4 * core_count() + 1
    env = {**os.environ, "PARLEY_WORKERS": str(too_many), "PARLEY_SESSION_STORE": "redis", "PARLEY_PORT": "50099"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"PARLEY_WORKERS (--workers) is {too_many}, more than {too_many - 1}" in result.stderr


async def test_sighup_reaches_the_workers_with_tls_and_stops_nothing(redis_url: str, tmp_path: Path) -> None:
    # Found in QA: with workers, SIGHUP (read the TLS certificates again) ended the supervisor, and so
    # the whole service.
    from tests.service.test_tls import make_ca, make_cert

    ca = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "server", ca, server=True)
    port = free_port()
    parent = start_workers(port, redis_url, tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        await asyncio.to_thread(wait_for_lines, parent, "worker 1 started", 1)
        parent.send_signal(signal.SIGHUP)  # (from a review: a worker still starting was killed by it)
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        workers = await asyncio.to_thread(children, parent.pid)
        parent.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_for_lines, parent, "SIGHUP: passed to 2 workers", 1)
        await asyncio.sleep(1)
        assert parent.poll() is None and await asyncio.to_thread(children, parent.pid) == workers
        credentials = grpc.ssl_channel_credentials(ca[0].read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            responses = await converse_all(voice_pb2_grpc.VoiceServiceStub(channel), [start(), user("Hi?")])
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_COMPLETED
        assert await drained(parent) == 0
    finally:
        reap(parent)


async def test_sighup_without_tls_drains_a_lone_service_and_workers_as_sigterm_does(redis_url: str) -> None:
    # Found in a QA pass: without TLS, SIGHUP (a closed terminal's) ended a lone service at once (exit
    # 129, nothing logged): its stream was cut, its turn unsaved, its session left claimed in Redis;
    # with workers the supervisor exited 129 at once and left its workers draining without it.
    port = free_port()
    lone = start_service_process(
        port=str(port), llm="scripted", tts="scripted", stt="none", session_store="redis", redis_url=redis_url,
        redis_prefix=f"h{secrets.token_hex(4)}",
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for_lines, lone, "Parley listening", 1)
        ended = await end_of_a_turn_signalled(port, lambda: lone.send_signal(signal.SIGHUP))
        assert ended.reason == pb.TURN_END_REASON_COMPLETED  # its turn finished
        assert await asyncio.to_thread(lone.wait, 60) == 0
        out, _ = lone.communicate(timeout=30)
        assert "SIGHUP, and no TLS certificates to read again: shutting down as on SIGTERM" in out
    finally:
        reap(lone)
    parent = start_workers(free_port(), redis_url)
    try:
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        workers = await asyncio.to_thread(children, parent.pid)
        parent.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(parent.wait, 60) == 0  # once both drained
        out, _ = parent.communicate(timeout=30)
        assert "SIGHUP, and no TLS certificates to read again: stopping the workers as on SIGTERM" in out
        assert all(_gone(pid) for pid in workers)
    finally:
        reap(parent)


def start_under_nohup(**settings: str) -> subprocess.Popen[str]:
    """``nohup python -m service``: SIGHUP ignored from the start, as a service meant to outlive its
    terminal is started."""
    env = {**os.environ, **{f"PARLEY_{name.upper()}": value for name, value in settings.items()}}
    command = ["nohup", sys.executable, "-m", "service"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def test_sighup_is_still_ignored_under_nohup(redis_url: str) -> None:
    # Found in a QA pass of the change above: a service started with nohup (SIGHUP ignored, so that it
    # outlives its terminal) drained when the terminal closed, its handler put in place of nohup's.
    for workers in ("1", "2"):
        port = free_port()
        process = start_under_nohup(
            workers=workers, port=str(port), llm="scripted", tts="scripted", stt="none", session_store="redis",
            redis_url=redis_url, redis_prefix=f"n{secrets.token_hex(4)}",
        )  # fmt: skip
        try:
            await asyncio.to_thread(wait_for_lines, process, "Parley listening", int(workers))
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1)
            assert process.poll() is None
            assert (await one_turn(port)).reason == pb.TURN_END_REASON_COMPLETED
            assert await drained(process) == 0
            out, _ = process.communicate(timeout=30)
            assert "SIGHUP" not in out, out
        finally:
            reap(process)


def test_what_is_loaded_before_serving_is_out_of_the_collectors_sight() -> None:
    import gc

    from service.__main__ import settle_memory

    loaded = [[n] for n in range(1000)]  # (stands for the engines, loaded before serving)
    try:
        settle_memory()
        assert gc.get_freeze_count() >= len(loaded)
        scanned = {id(o) for generation in range(3) for o in gc.get_objects(generation=generation)}
        assert all(gc.is_tracked(o) and id(o) not in scanned for o in loaded)
    finally:
        gc.unfreeze()


def test_the_collector_waits_for_the_live_objects_to_grow_and_still_collects_cycles() -> None:
    import gc
    import weakref

    from service.__main__ import YOUNG_COLLECTION_GROWTH, settle_memory

    class Node:
        pass

    threshold = gc.get_threshold()
    ran: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            ran.append(info["generation"])

    try:
        settle_memory()
        gc.callbacks.append(count)
        alive = [[n] for n in range(YOUNG_COLLECTION_GROWTH // 4)]  # (turns' objects, alive for a while)
        for _ in range(20):  # (made and freed: no growth)
            made: list[dict[str, int]] = [{} for _ in range(YOUNG_COLLECTION_GROWTH // 4)]
            del made
        assert len(ran) <= 2  # (at CPython's 700: about 64; a thread of an earlier test may allocate meanwhile)
        refs = []
        for _ in range(2 * YOUNG_COLLECTION_GROWTH):
            node = Node()
            node.me = node  # type: ignore[attr-defined]
            refs.append(weakref.ref(node))
            del node
        assert ran, "garbage in cycles never set off a collection"
        assert sum(ref() is not None for ref in refs) <= YOUNG_COLLECTION_GROWTH
        del alive
    finally:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(count)
        gc.set_threshold(*threshold)
        gc.unfreeze()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["--workers", "abc"],
            "  --workers / PARLEY_WORKERS: Input should be a valid integer, unable to parse string as an integer; "
            "or Input should be 'auto' (got 'abc')",
        ),
        (["--workers", "0"], "  settings: PARLEY_WORKERS (--workers) must be at least 1, or auto"),
        (
            ["--metrics-port", "70000"],
            "  --metrics-port / PARLEY_METRICS_PORT: Input should be less than or equal to 65535 (got '70000')",
        ),
        (
            ["--metrics-port", "50051", "--port", "50051"],
            "  settings: PARLEY_METRICS_PORT (50051) must not be the gRPC port (PARLEY_PORT)",
        ),
        (  # (a password in a URL, and a key, were shown back: "got 'redis://:s3cret@...'" (a QA pass))
            ["--session-store", "redis", "--redis-url", "redis://:s3cret@127.0.0.1:99999/0"],
            "  --redis-url / PARLEY_REDIS_URL: PARLEY_REDIS_URL (--redis-url) is 'redis://***@127.0.0.1:99999/0', "
            "whose port is not a number up to 65535: e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS, or unix:// "
            "and the socket's path) (got 'redis://***@127.0.0.1:99999/0')",
        ),
        (
            ["--api-keys", "alice:tooShortASecret"],
            "  --api-keys / PARLEY_API_KEYS: PARLEY_API_KEYS, entry 1: a key must have at least 24 characters "
            "(python -m service.auth prints a good one) (got a value not shown)",
        ),
        (  # (a setting named for tokens, not for a secret: shown)
            ["--llm-max-tokens", "abc"],
            "  --llm-max-tokens / PARLEY_LLM_MAX_TOKENS: Input should be a valid integer, unable to parse string as "
            "an integer (got 'abc')",
        ),
        (  # (a QA pass: 0.5 s killed healthy workers, which beat once a second, again and again)
            ["--worker-timeout-s", "0.5"],
            "  settings: PARLEY_WORKER_TIMEOUT_S (--worker-timeout-s) must be 0 (never) or at least 3 s: a worker "
            "tells the supervisor it is alive every 1 s, so a shorter timeout would kill healthy workers again and "
            "again",
        ),
        (  # (a QA pass: gRPC's own error, exit 1; and "[::1]:5000" was told it is not loopback)
            ["--host", "[::1]:5000"],
            "  --host / PARLEY_HOST: PARLEY_HOST (--host) is '[::1]:5000': give an address or a name without a "
            "port (the port is PARLEY_PORT), an IPv6 address with or without its brackets (::1 or [::1]) (got "
            "'[::1]:5000')",
        ),
        (  # (a QA pass: 0.0004 s rounded to a ping every 0 ms, and a turn failed "Internal error from Core")
            ["--keepalive-s", "0.0004"],
            "  settings: PARLEY_KEEPALIVE_S (--keepalive-s) must be 0 (gRPC's default) or at least 1 s: a ping "
            "every few milliseconds is a flood, and gRPC fails the calls of a connection it cannot keep up with",
        ),
        (  # (a QA pass: accepted, and logged as "get inf s to finish")
            ["--shutdown-grace-s", "inf"],
            "  --shutdown-grace-s / PARLEY_SHUTDOWN_GRACE_S: Input should be a finite number (got 'inf')",
        ),
    ],
)
def test_a_bad_setting_is_said_in_one_line_naming_its_flag_and_variable(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.__main__ import main

    assert main(argv) == 2
    assert capsys.readouterr().err == f"python -m service: invalid setting:\n{said}\n"


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--workers", "abc", "--log-format", "json"], {}),
        (["--workers=abc", "--log-format=json"], {}),
        (["--workers", "abc"], {"PARLEY_LOG_FORMAT": "json"}),
        (["--workers", "abc"], {"parley_log_format": "json"}),  # (the service reads its variables in any case)
        (["--workers", "abc", "--log-format", "json"], {"PARLEY_LOG_FORMAT": "text"}),  # (flags win)
    ],
)
def test_a_bad_setting_is_one_json_line_when_the_log_is_json(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from service.__main__ import main

    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    entry = json.loads(line)
    assert (entry["level"], entry["logger"]) == ("ERROR", "service")
    assert entry["message"].startswith("invalid setting:\n  --workers / PARLEY_WORKERS: Input should be a valid")


def test_a_variable_set_to_nothing_is_a_setting_left_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings

    for name in Settings.model_fields:  # every setting at once: PARLEY_X= is PARLEY_X unset
        monkeypatch.setenv(f"PARLEY_{name.upper()}", "")
    assert Settings() == Settings.model_construct()


def test_a_variable_no_setting_reads_is_named_with_the_closest_setting() -> None:
    from service.config import unknown_variables

    environ = {
        "PARLEY_WORKRES": "2",  # misspelled
        "parley_port": "50099",  # (the service reads its variables in any case)
        "PARLEY_LLM": "scripted",
        "PARLEY_OPENAI_API_KEY": "sk-1",  # read by the engines, not a setting
        "PARLEY_SERVER": "localhost:50051",  # the CLI's
        "PARLEY_BRIDGE_PROT": "8080",  # the bridge's to check
        "PARLEY_TWILIO_AUTH_TOKEN": "x",
        "PARLEY_SOMETHING_ELSE": "1",
        "OPENAI_API_KEY": "sk-1",
        "PATH": "/usr/bin",
    }
    assert unknown_variables(environ) == [
        "PARLEY_SOMETHING_ELSE is not a variable Parley reads; it is ignored",
        "PARLEY_WORKRES is not a variable Parley reads; it is ignored (did you mean PARLEY_WORKERS?)",
    ]


def test_the_service_and_the_bridge_check_apart_the_variables_each_reads() -> None:
    from service.config import OTHER_VARIABLES, Settings
    from service.setting_errors import BRIDGE_PREFIXES
    from ws_bridge.config import BridgeSettings, env_name

    service = {f"PARLEY_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    assert not {name for name in service if name.startswith(BRIDGE_PREFIXES)}
    for field in BridgeSettings.model_fields.values():  # the bridge's: its prefixes, or the service's log settings
        name = env_name(field)
        assert name.startswith(BRIDGE_PREFIXES) or (name.startswith("PARLEY_LOG_") and name in service), name


async def _long_turn_cut_by_a_second_signal(port: int, process: subprocess.Popen[str], second: signal.Signals) -> None:
    """Begin a long reply on ``port``, SIGTERM ``process``, then ``second``: the turn is stopped at
    once (not finished, nor left to the 60 s grace), and the stream still says where to resume."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).Converse()
        await call.write(start())
        await call.write(user("A long one, please."))  # (about 70 s of speech)
        while (await call.read()).WhichOneof("kind") != "audio":  # the turn is under way
            pass
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1)
        process.send_signal(second)
        responses = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(20):
                while (response := await call.read()) is not grpc.aio.EOF:
                    responses.append(response)
    assert [r.turn_ended.reason for r in responses if r.HasField("turn_ended")] == [pb.TURN_END_REASON_INTERRUPTED]
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "resume session" in (ended.value.details() or "")


@pytest.mark.parametrize("with_workers", [False, True])
async def test_a_second_signal_during_the_shutdown_ends_the_turns_at_once(redis_url: str, with_workers: bool) -> None:
    # Found in an SRE's pass: a second SIGTERM or SIGINT (Ctrl-C twice) did nothing and said nothing:
    # the service waited out its whole grace period, and seemed to hang.
    port = free_port()
    if with_workers:
        process = start_workers(port, redis_url, shutdown_grace_s="60")
        said = [
            "worker(s) still running, which end their streams now",  # (1, or 2 if the idle one is slow to go)
            "told by the supervisor (a second signal): 1 stream(s) still open end now",
        ]
    else:
        process = start_service_process(
            port=str(port), llm="scripted", tts="scripted", stt="none", shutdown_grace_s="60"
        )
        said = ["SIGINT again, during the shutdown: 1 stream(s) still open end now"]
    try:
        await asyncio.to_thread(wait_for_lines, process, "Parley listening", 2 if with_workers else 1)
        await _long_turn_cut_by_a_second_signal(port, process, signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 30) == 0
        out, _ = process.communicate(timeout=30)
        for line in said:
            assert line in out
    finally:
        reap(process)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_whole_process_group_drains_workers_as_one_signal(
    redis_url: str, sent: signal.Signals
) -> None:
    # A terminal's Ctrl-C signals its whole process group, and so do systemd's stop and `kill -TERM
    # -PGID`: each worker gets the signal from the group and SIGTERM from its supervisor, which must
    # not count as the second signal that ends turns at once (a QA pass: the group's SIGTERM did).
    port = free_port()
    parent = start_workers(port, redis_url, shutdown_grace_s="60")
    try:
        await asyncio.to_thread(wait_for_lines, parent, "Parley listening", 2)
        group = (parent.pid, *await asyncio.to_thread(children, parent.pid))
        ended = await end_of_a_turn_signalled(port, lambda: [os.kill(pid, sent) for pid in group])  # (every one)
        assert ended.reason == pb.TURN_END_REASON_COMPLETED  # its turn finished
        assert await asyncio.to_thread(parent.wait, 60) == 0
        out, _ = parent.communicate(timeout=30)
        assert "still open end now" not in out
    finally:
        reap(parent)


async def test_workers_stopped_while_starting_exit_cleanly(redis_url: str) -> None:
    # A QA pass: SIGTERM in the first second (workers still starting, nothing to drain) made the
    # supervisor warn "was killed by SIGTERM as it stopped" and exit 1.
    parent = start_workers(free_port(), redis_url)
    try:
        await asyncio.to_thread(wait_for_lines, parent, "worker 1 started", 1)
        parent.send_signal(signal.SIGTERM)  # (the workers are still importing their modules)
        assert await asyncio.to_thread(parent.wait, 60) == 0
        out, _ = parent.communicate(timeout=30)
        assert "stopped before it served" in out and "as it stopped" not in out
    finally:
        reap(parent)
