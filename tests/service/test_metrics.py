"""Prometheus metrics: scraped over HTTP from the metrics port after real turns through gRPC."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from parley.v1 import voice_pb2 as pb
from tests.conftest import converse_all, free_port, start, start_harness, stop_harness, user
from tests.fakes import FakeLLM, FakeSTT, loud, quiet
from tests.service.test_voice import open_voice, say


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(sample.labels.items()) if k in ("reason", "status", "engine", "kind")
            )
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


async def test_turns_latencies_barge_ins_and_rejections_are_counted() -> None:
    port = free_port()
    h = await start_harness(FakeLLM(first_token_s=0.02, token_s=0.05), stt=FakeSTT(), metrics_port=port)
    try:
        await converse_all(h.stub, [start(), user("Hi?")])  # a completed turn
        call, reader = await open_voice(h, silence_ms=300, min_speech_ms=100)  # a reply interrupted by the user's voice
        await call.write(user("Tell me a story."))
        await reader.until("audio")
        await say(call, loud(300) + quiet(100))
        await reader.until("turn_ended")
        await reader.stop()
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError):  # a stream rejected: INVALID_ARGUMENT
            await converse_all(h.stub, [user("no start first")])
        await asyncio.sleep(0.2)
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    assert samples["parley_turns_total{reason=completed}"] >= 1
    assert samples["parley_turns_total{reason=interrupted}"] >= 1
    assert samples["parley_barge_ins_total"] == 1
    assert samples["parley_rejected_streams_total{status=INVALID_ARGUMENT}"] == 1
    assert samples["parley_first_audio_seconds_count"] >= 2
    assert samples["parley_first_llm_token_seconds_count"] >= 2
    assert samples["parley_stream_limit"] == 100
    assert "parley_active_streams" in samples


async def test_a_turn_failed_by_an_engine_is_counted_by_engine() -> None:
    from tests.fakes import FakeTTS

    port = free_port()
    h = await start_harness(FakeLLM(), FakeTTS(fail_on="second"), metrics_port=port)
    try:
        responses = await converse_all(h.stub, [start(), user("Hi?")])
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_FAILED
        await asyncio.sleep(0.1)
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    assert samples["parley_engine_errors_total{engine=tts,kind=permanent}"] == 1
    assert samples["parley_turns_total{reason=failed}"] == 1
