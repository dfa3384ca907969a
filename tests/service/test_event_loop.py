"""The service's event loop (PARLEY_EVENT_LOOP): uvloop by default, asyncio's when asked; either one
serves a whole turn and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from tests.conftest import free_port, start, start_service_process, user, wait_listening


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")])
async def test_the_service_runs_a_turn_and_drains_on_the_loop_it_names(setting: str | None, loop: str) -> None:
    port = free_port()
    settings = {"port": str(port), "host": "127.0.0.1", "llm": "scripted", "tts": "scripted", "stt": "none"}
    settings["scripted_profile"] = "quick"
    if setting is not None:
        settings["event_loop"] = setting
    service = start_service_process(**settings)
    try:
        log = await asyncio.to_thread(wait_listening, service)
        assert f"event loop={loop})" in log
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = voice_pb2_grpc.VoiceServiceStub(channel).Converse()
            await call.write(start())
            await call.write(user("What is the capital of France?"))
            kinds, ended = [], None
            async with asyncio.timeout(30):
                while ended is None:
                    response = await call.read()
                    kinds.append(response.WhichOneof("kind"))
                    if response.HasField("turn_ended"):
                        ended = response.turn_ended
            assert ended.reason == pb.TURN_END_REASON_COMPLETED and ended.spoken_text
            assert "audio" in kinds and "text_delta" in kinds and "segment" in kinds
            service.send_signal(signal.SIGTERM)  # the stream is open: it is drained, and told where to go on
            with pytest.raises(grpc.aio.AioRpcError) as ended_by:
                async with asyncio.timeout(30):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            assert ended_by.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (ended_by.value.details() or "")
        assert await asyncio.to_thread(service.wait, 30) == 0
    finally:
        if service.poll() is None:
            service.kill()
        service.wait()
        if service.stdout is not None:
            service.stdout.close()


def test_an_unknown_event_loop_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from service.__main__ import main

    assert main(["--event-loop", "tokio"]) == 2
    assert "--event-loop / PARLEY_EVENT_LOOP: Input should be 'uvloop' or 'asyncio' (got 'tokio')" in (
        capsys.readouterr().err
    )


def test_uvloop_asked_for_and_missing_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.__main__ import event_loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # (import uvloop now raises ImportError)
    with pytest.raises(
        RuntimeError, match="PARLEY_EVENT_LOOP=uvloop, but uvloop cannot be imported .*set PARLEY_EVENT_LOOP=asyncio"
    ):
        event_loop_factory("uvloop")
    assert event_loop_factory("asyncio") is asyncio.new_event_loop
