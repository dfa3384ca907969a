"""The service runs on gRPC's older I/O manager unless the operator set ``GRPC_EXPERIMENTS``."""

from __future__ import annotations

import os
import sys

import grpc
import pytest

from parley.v1 import voice_pb2_grpc
from service.grpc_io import EXPERIMENTS, choose_io_stack
from tests.conftest import converse_all, free_port, start, start_service_process, user, wait_listening

# gRPC's trace of a socket's reads and writes names its source file: the I/O manager's endpoint is
# tcp_posix.cc, the EventEngine's posix_endpoint.cc.
IOMGR, EVENT_ENGINE = "tcp_posix.cc", "posix_endpoint.cc"


async def _files_that_carried_a_turn(**environ: str) -> str:
    """The log of ``python -m service`` (scripted engines, gRPC's TCP trace on) through one turn."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "GRPC_EXPERIMENTS"}
    env |= {"GRPC_TRACE": "tcp", "GRPC_VERBOSITY": "debug", **environ}
    process = start_service_process(
        env, port=str(port), llm="scripted", tts="scripted", stt="none", scripted_profile="quick"
    )
    try:
        log = wait_listening(process)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            responses = await converse_all(voice_pb2_grpc.VoiceServiceStub(channel), [start(), user("Hi?")])
        assert responses[-1].HasField("turn_ended")
        process.terminate()
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return log + rest


async def test_the_service_serves_on_the_io_manager_by_default() -> None:
    log = await _files_that_carried_a_turn()
    assert IOMGR in log
    assert EVENT_ENGINE not in log


async def test_an_operators_grpc_experiments_are_kept_even_empty() -> None:
    log = await _files_that_carried_a_turn(GRPC_EXPERIMENTS="")  # (gRPC's own defaults: the EventEngine)
    assert EVENT_ENGINE in log
    assert IOMGR not in log


def test_the_choice_is_made_once_and_only_before_grpc_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    environ: dict[str, str] = {}
    assert "grpc" in sys.modules  # (this test's own process: too late to choose)
    assert not choose_io_stack(environ)
    assert environ == {}
    monkeypatch.delitem(sys.modules, "grpc")
    assert choose_io_stack(environ)
    assert environ == {"GRPC_EXPERIMENTS": EXPERIMENTS}
    environ["GRPC_EXPERIMENTS"] = "tcp_rcv_lowat"
    assert not choose_io_stack(environ)
    assert environ == {"GRPC_EXPERIMENTS": "tcp_rcv_lowat"}
