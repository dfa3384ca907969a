"""What ``make run`` runs: the Parley service and the WebSocket bridge, together.

    python scripts/run.py        (settings come from the environment: PARLEY_PORT, PARLEY_LLM, ...)

Both run as child processes, their output passed through line by line. If either stops on its own
(the service cannot start, the bridge's port is taken, a crash), the other is stopped too and this
exits non-zero, printing the reason last: which one stopped, its exit status and its last error line.
Ctrl-C (or SIGTERM) stops both gracefully and exits 0; a second Ctrl-C kills them at once.

Under ``make``, Ctrl-C would also reach make itself, which then reports the interrupt and exits 130
whatever the recipe did. So when it runs in the foreground of a terminal, this takes the terminal for
its own process group (as a shell does for a job) and gives it back on the way out; Ctrl-Z is ignored
meanwhile, since make could not be resumed with it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
# How long the other one gets to stop gracefully once one has died (the service gives streams in flight
# PARLEY_SHUTDOWN_GRACE_S); then it is killed.
STOP_TIMEOUT_S = float(os.environ.get("PARLEY_SHUTDOWN_GRACE_S") or 10) + 20
DRAIN_TIMEOUT_S = 5.0  # for the last output of a process that has exited

# Lines that are not the reason a process stopped: log records below ERROR, and pydantic's pointer.
_NOT_AN_ERROR = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) |^\s*For further information visit "
)


def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass
class Child:
    """One of the two processes."""

    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    last_error: str = ""
    asked_to_stop: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.pumps = [
            asyncio.create_task(self._pump(self.process.stdout, sys.stdout.buffer, errors=False)),
            asyncio.create_task(self._pump(self.process.stderr, sys.stderr.buffer, errors=True)),
        ]

    async def _pump(self, source: asyncio.StreamReader, sink: IO[bytes], *, errors: bool) -> None:
        """Pass the output on whole lines at a time (so the two processes' lines do not mix)."""
        pending = b""
        while chunk := await source.read(65536):
            pending += chunk
            lines, _, pending = pending.rpartition(b"\n")
            if lines:
                self._write(sink, lines + b"\n", errors)
            if len(pending) > 65536:  # a very long line: pass it on in pieces
                self._write(sink, pending, errors)
                pending = b""
        if pending:
            self._write(sink, pending + b"\n", errors)

    def _write(self, sink: IO[bytes], data: bytes, errors: bool) -> None:
        sink.write(data)
        sink.flush()
        if errors:
            for line in data.decode(errors="replace").splitlines():
                if line.strip() and not _NOT_AN_ERROR.match(line):
                    self.last_error = line.strip()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None and self.process.returncode is None:
            self.asked_to_stop = True
            self.process.send_signal(sig)

    async def drained(self) -> None:
        """Wait (a little) for the output the process wrote before it exited."""
        await asyncio.wait(self.pumps, timeout=DRAIN_TIMEOUT_S)

    def how_it_ended(self) -> str:
        assert self.process is not None and self.process.returncode is not None
        code = self.process.returncode
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when this supervisor dies, even by SIGKILL (Linux only), so that
    neither process is left running, holding its port, with nobody to stop it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@contextmanager
def terminal_of_our_own() -> Iterator[None]:
    """Be the terminal's foreground process group while running, when started in the foreground by
    another process group (make's): Ctrl-C then reaches this and its children, and not make."""
    give_back: Callable[[], None] | None = None
    try:
        tty = os.open(os.ctermid(), os.O_RDWR | os.O_NOCTTY)
    except OSError:
        tty = -1  # no controlling terminal: nothing to do
    if tty >= 0:
        try:
            previous = os.getpgrp()
            if os.tcgetpgrp(tty) == previous and previous != os.getpid():
                os.setpgid(0, 0)
                with _ttou_ignored():
                    os.tcsetpgrp(tty, os.getpgrp())
                signal.signal(signal.SIGTSTP, signal.SIG_IGN)  # the children inherit this

                def give_back() -> None:
                    with _ttou_ignored():
                        os.tcsetpgrp(tty, previous)

        except OSError:
            pass
    try:
        yield
    finally:
        if give_back is not None:
            try:
                give_back()
            except OSError:
                pass
        if tty >= 0:
            os.close(tty)


@contextmanager
def _ttou_ignored() -> Iterator[None]:
    """A background process group that sets the terminal's foreground group gets SIGTTOU otherwise."""
    before = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTTOU, before)


async def supervise() -> int:
    port = os.environ.get("PARLEY_PORT") or "50051"
    page_port = os.environ.get("PARLEY_BRIDGE_PORT") or "8080"
    say(
        f"==> starting the service (gRPC :{port}) and the bridge; the page will be at http://localhost:{page_port}/"
        " (Ctrl-C stops both)"
    )
    service = Child("the service", [sys.executable, "-m", "service"])
    bridge = Child("the bridge", [sys.executable, "-m", "ws_bridge", "--grpc-target", f"127.0.0.1:{port}"])
    children = [service, bridge]

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stopping.set()
        if signals == 1:
            for child in children:
                child.stop(signal.SIGTERM)
        else:
            say("==> stopping at once")
            for child in children:
                child.stop(signal.SIGKILL)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)

    ended: asyncio.Queue[Child] = asyncio.Queue()

    async def watch(child: Child) -> None:
        assert child.process is not None
        await child.process.wait()
        ended.put_nowait(child)

    for child in children:
        await child.start()
    watchers = [asyncio.create_task(watch(child)) for child in children]
    first_end = asyncio.create_task(ended.get())
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({first_end, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if first_end.done() and not stopping.is_set():
        # A Ctrl-C reaches the children and this process at once: a child may exit on it before this
        # process has run its handler. Let that happen before calling the exit one of its own.
        await asyncio.sleep(0.3)

    if stopping.is_set():
        # Ctrl-C or SIGTERM: both stop gracefully (a second Ctrl-C kills them).
        await asyncio.gather(*watchers)
        for child in children:
            await child.drained()
        say("==> stopped")
        return 0

    # One stopped on its own: stop the other, then say why, after everything else.
    dead = [first_end.result()]
    for child in children:
        if child is not dead[0] and child.process is not None and child.process.returncode is None:
            child.stop(signal.SIGTERM)
    done, _ = await asyncio.wait(watchers, timeout=STOP_TIMEOUT_S)
    if len(done) < len(watchers):
        for child in children:
            if child.process is not None and child.process.returncode is None:
                say(f"==> {child.name} did not stop within {STOP_TIMEOUT_S:g} s: killing it")
                child.stop(signal.SIGKILL)
        await asyncio.gather(*watchers)
    for child in children:
        await child.drained()
        if child not in dead and not child.asked_to_stop:
            dead.append(child)  # it ended on its own too, at about the same time
    others = " and ".join(c.name for c in children if c not in dead)
    for child in dead:
        line = f"==> {child.name} {child.how_it_ended()}"
        line += f", so {others} was stopped too." if others else "."
        assert child.process is not None and child.process.returncode is not None
        if child.process.returncode > 0 and child.last_error:
            line += f" Its last error:\n    {child.last_error}"
        say(line)
    code = dead[0].process.returncode if dead[0].process is not None else None
    if code is None or code == 0:
        return 1
    return code if code > 0 else 128 - code


def main() -> int:
    with terminal_of_our_own():
        try:
            return asyncio.run(supervise())
        except KeyboardInterrupt:  # before the signal handlers were in place
            return 130


if __name__ == "__main__":
    sys.exit(main())
