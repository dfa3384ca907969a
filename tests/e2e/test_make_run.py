"""`make run` for real (the Makefile, then scripts/run.py, the service and the bridge as processes):
when either process dies the other is stopped and the reason comes last; Ctrl-C stops both with exit 0."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

BOUND_S = 30  # a failed start must end `make run` well within this


def environment(**settings: str) -> dict[str, str]:
    """This environment without Parley's or OpenAI's settings (no key), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OPENAI_"))}
    return {**env, **settings}


def make_run() -> list[str]:
    # -o setup: the virtualenv is the one running these tests (never reinstalled from here).
    return ["make", "--no-print-directory", "-o", "setup", "run", f"PY={sys.executable}"]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def run_to_the_end(env: dict[str, str]) -> tuple[int, list[str], float]:
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *make_run(),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, to be killed whole if it hangs
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), BOUND_S)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = await process.communicate()
        pytest.fail(f"make run was still running after {BOUND_S} s:\n{out.decode()}")
    assert process.returncode is not None
    return process.returncode, out.decode().strip().splitlines(), time.monotonic() - began


async def test_the_service_failing_to_start_stops_make_run() -> None:
    port, page = free_port(), free_port()
    code, lines, took = await run_to_the_end(
        environment(PARLEY_LLM="openai", PARLEY_PORT=str(port), PARLEY_BRIDGE_PORT=str(page))
    )
    assert code != 0, "\n".join(lines)
    assert took < BOUND_S
    assert not listening(page) and not listening(port)  # the bridge is gone too
    # The reason last (only make's own one-line summary follows it).
    # ("make[1]:" when the tests themselves run under make, as `make test` does.)
    assert re.match(r"make(\[\d+\])?: \*\*\* \[Makefile:", lines[-1]) and lines[-1].endswith("run] Error 1"), lines[-1]
    assert lines[-3] == "==> the service exited with status 1, so the bridge was stopped too. Its last error:"
    assert "ERROR service: cannot start: the openai engines need an API key" in lines[-2]
    assert "Traceback" not in "\n".join(lines)


async def test_the_bridge_failing_to_start_stops_make_run() -> None:
    port = free_port()
    with socket.socket() as taken:  # something else holds the page's port
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        page = taken.getsockname()[1]
        code, lines, took = await run_to_the_end(
            environment(
                PARLEY_LLM="scripted", PARLEY_TTS="scripted", PARLEY_PORT=str(port), PARLEY_BRIDGE_PORT=str(page)
            )
        )
    assert code != 0 and took < BOUND_S, "\n".join(lines)
    assert not listening(port)  # the service was stopped
    assert lines[-3] == "==> the bridge exited with status 1, so the service was stopped too. Its last error:"
    assert "ERROR ws_bridge: cannot start the bridge" in lines[-2] and "address already in use" in lines[-2]


def read_until(fd: int, marker: bytes, timeout_s: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout_s
    while marker not in seen:
        assert time.monotonic() < deadline, f"never saw {marker!r} in:\n{seen.decode(errors='replace')}"
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal's other side closed
                break
            seen += chunk
    return seen


def test_ctrl_c_in_a_terminal_stops_both_and_make_exits_0() -> None:
    port, page = free_port(), free_port()
    env = environment(PARLEY_LLM="scripted", PARLEY_TTS="scripted", PARLEY_PORT=str(port), PARLEY_BRIDGE_PORT=str(page))
    pid, fd = pty.fork()
    if pid == 0:  # the child: make, in the foreground of a new terminal, as from a shell
        os.chdir(ROOT)
        os.execvpe("make", make_run(), env)
    try:
        screen = read_until(fd, b"ready: open", 60)
        deadline = time.monotonic() + 20
        while not listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listening(port) and listening(page), screen.decode(errors="replace")
        os.write(fd, b"\x03")  # Ctrl-C
        screen += read_until(fd, b"==> stopped", 30)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, screen.decode(errors="replace")
        text = screen.decode(errors="replace")
        assert "service.server: stopped" in text and "shutting down the bridge" in text  # gracefully, both
        assert not listening(port) and not listening(page)
    finally:
        os.close(fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the children follow their parent on Linux only")
def test_killing_the_supervisor_leaves_nothing_running() -> None:
    port, page = free_port(), free_port()
    env = environment(PARLEY_LLM="scripted", PARLEY_TTS="scripted", PARLEY_PORT=str(port), PARLEY_BRIDGE_PORT=str(page))
    supervisor = subprocess.Popen(
        [sys.executable, str(Path("scripts") / "run.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (listening(port) and listening(page)):
            assert time.monotonic() < deadline and supervisor.poll() is None
            time.sleep(0.1)
    finally:
        supervisor.kill()
        supervisor.wait()
    deadline = time.monotonic() + 15
    while listening(port) or listening(page):
        assert time.monotonic() < deadline, "the service or the bridge outlived scripts/run.py"
        time.sleep(0.1)
