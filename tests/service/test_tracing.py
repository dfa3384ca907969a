"""Traces with OpenTelemetry's SDK and its in-memory exporter: one span per turn, with the LLM stream,
each synthesis and each transcription as its children, and the timings as attributes."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.core import tracing
from tests.conftest import start_harness, stop_harness
from tests.fakes import FakeLLM, FakeSTT, loud, quiet
from tests.service.test_voice import open_voice, say

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def in_memory_traces() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # (once per process: OpenTelemetry refuses to replace it)
    tracing.enable()


async def test_a_voice_turn_is_one_span_with_its_stages_as_children() -> None:
    EXPORTER.clear()
    h = await start_harness(FakeLLM(first_token_s=0.02), stt=FakeSTT())
    try:
        call, reader = await open_voice(h, silence_ms=300, min_speech_ms=100)
        await say(call, quiet(200) + loud(600) + quiet(500))
        await reader.until("turn_ended")
        await reader.stop()
        call.cancel()
    finally:
        await stop_harness(h)
    spans = EXPORTER.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (turn,) = by_name["parley.turn"]
    assert turn.attributes["parley.turn"] == "turn-1"
    assert turn.attributes["parley.first_llm_token_ms"] >= 15 and turn.attributes["parley.first_audio_ms"] > 0
    (llm,) = by_name["parley.llm"]
    assert llm.parent.span_id == turn.context.span_id
    assert by_name["parley.tts"] and all(s.parent.span_id == turn.context.span_id for s in by_name["parley.tts"])
    assert by_name["parley.transcription"]
    assert "What is the weather like?" not in str([dict(s.attributes) for s in spans])  # never what was said
