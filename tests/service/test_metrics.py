"""Prometheus metrics: scraped over HTTP from the metrics port after real turns through gRPC."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from parley.v1 import voice_pb2 as pb
from service.core.settings import SessionDefaults
from service.metrics import FAILING_ENGINES, REJECTION_STATUSES, STREAM_END_REASONS, TURN_REASONS
from tests.conftest import converse_all, free_port, start, start_harness, stop_harness, user, wait_for
from tests.fakes import FakeLLM, FakeSTT, FakeTTS, loud, quiet
from tests.service.test_voice import open_voice, say


def scrape(port: int, more: tuple[str, ...] = ()) -> dict[str, float]:
    """The samples at ``port``, by name and labels (those of low cardinality, and ``more``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(
                f"{k}={v}"
                for k, v in sorted(sample.labels.items())
                if k in ("reason", "status", "engine", "kind", "pool", "code", "generation", "le", *more)
            )
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


async def test_turns_latencies_barge_ins_and_rejections_are_counted() -> None:
    port = free_port()
    # (Replies of about 2 s: still running when the user's voice comes over it, however busy the machine.)
    llm = FakeLLM(reply=FakeLLM.reply * 3, first_token_s=0.02, token_s=0.05)
    h = await start_harness(llm, stt=FakeSTT(), metrics_port=port)
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


async def test_sessions_held_and_stored_are_gauged() -> None:
    port = free_port()
    h = await start_harness(FakeLLM(), metrics_port=port)
    try:
        call = h.stub.Converse()
        await call.write(start())
        await call.read()  # session_started: the stream holds its session
        held = await asyncio.to_thread(scrape, port)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        await asyncio.sleep(0.1)
        released = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    assert (held["parley_held_sessions"], held["parley_stored_sessions"]) == (1, 1)
    assert (released["parley_held_sessions"], released["parley_stored_sessions"]) == (0, 1)  # kept, idle


async def test_busy_worker_threads_are_gauged_by_pool() -> None:
    from service.core.workpool import WorkPool

    port = free_port()
    h = await start_harness(FakeLLM(), metrics_port=port)
    pool = WorkPool("test-pool", 3)
    release = threading.Event()
    try:
        jobs = [asyncio.get_running_loop().run_in_executor(pool, release.wait, 5) for _ in range(2)]
        await wait_for(lambda: pool.busy == 2)
        busy = await asyncio.to_thread(scrape, port)
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.gather(*jobs)
        idle = await asyncio.to_thread(scrape, port)
    finally:
        release.set()
        pool.shutdown()
        await stop_harness(h)
    assert busy["parley_worker_threads_busy{pool=test-pool}"] == 2
    assert busy["parley_worker_threads_limit{pool=test-pool}"] == 3
    assert idle["parley_worker_threads_busy{pool=test-pool}"] == 0
    assert busy["parley_worker_busy_seconds_total{pool=test-pool}"] == 0  # (counted as each job ends)
    assert idle["parley_worker_busy_seconds_total{pool=test-pool}"] >= 2 * 0.2  # two jobs of at least 0.2 s
    from service.core.workpool import pools

    assert all(p.name != "test-pool" for p in pools())  # a pool shut down is no longer reported


async def test_provider_retries_are_counted_by_engine() -> None:
    from tests.engines.test_openai import openai_llm, openai_tts
    from tests.fake_openai import FakeOpenAI, Plan

    fake = FakeOpenAI().start()
    port = free_port()
    h = await start_harness(openai_llm(fake), openai_tts(fake), metrics_port=port)  # type: ignore[arg-type]
    try:
        before = await asyncio.to_thread(scrape, port)
        fake.plan_chat(Plan(status=503, error_message="Overloaded"))
        fake.plan_speech(Plan(status=502, error_message="Bad gateway"), Plan(hang_up=True))
        responses = await converse_all(h.stub, [start(), user("Hi?")])
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_COMPLETED
        after = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
        fake.stop()
    retried = {
        e: after[f"parley_engine_retries_total{{engine={e}}}"] - before[f"parley_engine_retries_total{{engine={e}}}"]
        for e in ("llm", "tts", "stt")
    }
    assert retried == {"llm": 1, "tts": 2, "stt": 0}


async def test_a_spoken_question_stopped_by_an_interrupt_is_no_barge_in() -> None:
    # The question's own speech starts before its reply: stopping that reply with a message is no
    # barge-in; the user's voice over the reply is one.
    port = free_port()
    llm = FakeLLM(reply=FakeLLM.reply * 3, first_token_s=0.02, token_s=0.05)  # (still running at the interrupt)
    h = await start_harness(llm, stt=FakeSTT(), metrics_port=port)
    try:
        call, reader = await open_voice(h, silence_ms=300, min_speech_ms=100)
        await say(call, loud(300) + quiet(600))
        await reader.until("audio")
        await call.write(pb.ConverseRequest(interrupt=pb.Interrupt()))
        await reader.until("turn_ended")
        before = await asyncio.to_thread(scrape, port)
        await say(call, loud(300) + quiet(100))  # a second question, over nothing (the reply was stopped)
        await asyncio.sleep(0.3)
        after = await asyncio.to_thread(scrape, port)
        await reader.stop()
        call.cancel()
    finally:
        await stop_harness(h)
    assert before["parley_turns_total{reason=interrupted}"] == 1
    assert before["parley_barge_ins_total"] == 0
    assert after["parley_barge_ins_total"] == 0


@pytest.mark.parametrize("when", ["mid-reply", "before the first audio"])
async def test_a_turn_whose_client_hangs_up_is_counted_abandoned(when: str, caplog: pytest.LogCaptureFixture) -> None:
    # An SRE's pass: a hang-up was counted (and logged) as "interrupted", as if the user had said stop;
    # and a turn given up before its first audio is in no latency histogram: it is counted apart.
    caplog.set_level(logging.INFO, logger="service.servicer")
    port = free_port()
    llm = FakeLLM(first_token_s=30 if when != "mid-reply" else 0.02, token_s=0.05)  # (the cancel ends it)
    h = await start_harness(llm, metrics_port=port)
    try:
        call = h.stub.Converse()
        await call.write(start())
        await call.write(user("Tell me a story."))
        if when == "mid-reply":
            while (await call.read()).WhichOneof("kind") != "audio":
                pass
        else:
            await call.read()  # (session_started; the LLM's first token is 30 s away)
            await asyncio.sleep(0.1)
        call.cancel()
        await wait_for(lambda: h.running.servicer.active_streams == 0)
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    assert samples["parley_turns_total{reason=abandoned}"] == 1
    assert samples["parley_turns_total{reason=interrupted}"] == 0
    assert samples.get("parley_first_audio_seconds_count", 0) == (1 if when == "mid-reply" else 0)
    assert samples["parley_turns_unheard_total{reason=abandoned}"] == (0 if when == "mid-reply" else 1)
    assert samples["parley_stream_ends_total{reason=hangup}"] == 1
    assert sum(v for k, v in samples.items() if k.startswith("parley_rejected_streams_total")) == 0  # (no error)
    assert "turn turn-1 abandoned (the client went away)" in caplog.text


async def test_stream_ends_are_counted_by_why_and_only_errors_as_rejected() -> None:
    # An SRE's pass: every stream a drain ended counted as a rejected stream (UNAVAILABLE), and so did
    # every idle timeout (DEADLINE_EXCEEDED), so an alert on rejections fired on each rolling update.
    port = free_port()
    llm = FakeLLM(first_token_s=2)  # (the interrupt below comes well before it, however busy the machine)
    h = await start_harness(llm, defaults=SessionDefaults(idle_timeout_s=0.5), metrics_port=port)
    try:
        await converse_all(h.stub, [start(), user("Hi?")])  # closed by the client
        idle = h.stub.Converse()
        await idle.write(start())
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            while True:
                await idle.read()
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError):  # an error: INVALID_ARGUMENT
            await converse_all(h.stub, [user("no start first")])
        interrupted = h.stub.Converse()  # a turn the user stops before its first audio
        await interrupted.write(start())
        await interrupted.read()
        await interrupted.write(user("Tell me a story."))
        await interrupted.write(pb.ConverseRequest(interrupt=pb.Interrupt()))
        while (await interrupted.read()).WhichOneof("kind") != "turn_ended":
            pass
        draining = h.stub.Converse()  # open as the server shuts down
        await draining.write(start())
        await draining.read()
        leaving = h.stub.Converse()  # its client hangs up as the server drains (a QA pass: "shutdown")
        await leaving.write(start())
        await leaving.read()
        await leaving.write(user("Tell me a story."))
        samples = await asyncio.to_thread(scrape, port)
        assert samples["parley_active_streams"] == 3
        stopping = asyncio.create_task(h.running.stop(5))
        await asyncio.sleep(0.05)
        leaving.cancel()
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as shut:
            await draining.read()
        assert shut.value.code() == grpc.StatusCode.UNAVAILABLE
        samples = await asyncio.to_thread(scrape, port)
        settled = time.monotonic() + 5  # (a handler gRPC cancelled may end a moment after the stop returns)
        while samples["parley_active_streams"] and time.monotonic() < settled:
            await asyncio.sleep(0.05)
            samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    ends = {reason: samples[f"parley_stream_ends_total{{reason={reason}}}"] for reason in STREAM_END_REASONS}
    assert ends == {"closed": 1, "hangup": 1, "idle": 1, "shutdown": 2, "takeover": 0, "error": 1}
    rejected = {k: v for k, v in samples.items() if k.startswith("parley_rejected_streams_total") and v}
    assert rejected == {"parley_rejected_streams_total{status=INVALID_ARGUMENT}": 1}
    assert samples["parley_turns_unheard_total{reason=interrupted}"] == 1
    assert samples["parley_turns_unheard_total{reason=completed}"] == 0


async def test_an_overload_that_outlasts_the_retries_is_counted_retryable() -> None:
    from tests.engines.test_openai import openai_llm, openai_tts
    from tests.fake_openai import FakeOpenAI, Plan

    fake = FakeOpenAI().start()
    port = free_port()
    h = await start_harness(openai_llm(fake), openai_tts(fake), metrics_port=port)  # type: ignore[arg-type]
    try:
        fake.plan_chat(*[Plan(status=503, error_message="Overloaded")] * 3)
        responses = await converse_all(h.stub, [start(), user("Hi?")])
        assert "gave up after 3 tries" in responses[-1].turn_ended.error
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
        fake.stop()
    assert samples["parley_engine_errors_total{engine=llm,kind=retryable}"] == 1  # (not a bad key or model)


async def test_every_outcome_series_exists_from_the_start_at_zero() -> None:
    from service.servicer import STATUS_FOR, end_reason

    port = free_port()
    h = await start_harness(metrics_port=port)
    try:
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    for engine in FAILING_ENGINES:
        for kind in ("retryable", "permanent"):
            assert samples[f"parley_engine_errors_total{{engine={engine},kind={kind}}}"] == 0
    # Every status a stream can be refused or fail with (not a hang-up, an idle timeout, a shutdown or
    # a takeover, which are ends as a stream's life goes, each with a reason of its own).
    failed_with = {code.name for kind, code in STATUS_FOR.items() if end_reason(kind("")) == "error"}
    assert set(REJECTION_STATUSES) == failed_with | {"UNAUTHENTICATED", "INTERNAL"}
    for status in REJECTION_STATUSES:
        assert samples[f"parley_rejected_streams_total{{status={status}}}"] == 0
    for reason in STREAM_END_REASONS:
        assert samples[f"parley_stream_ends_total{{reason={reason}}}"] == 0
    for reason in TURN_REASONS:
        assert samples[f"parley_turns_total{{reason={reason}}}"] == 0
        assert samples[f"parley_turns_unheard_total{{reason={reason}}}"] == 0
    # The process's own: its memory, CPU and start (a restarted worker shows a new start; a QA pass).
    assert samples["process_resident_memory_bytes"] > 10e6
    assert samples["process_start_time_seconds"] > 0 and "process_cpu_seconds_total" in samples


async def test_a_stream_without_credentials_is_counted_unauthenticated() -> None:
    from service.auth import KeyRing

    port = free_port()
    h = await start_harness(keys=KeyRing(None, "ops:ops-0123456789abcdefghijklmnop"), metrics_port=port)
    try:
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await converse_all(h.stub, [start()])
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    assert samples["parley_rejected_streams_total{status=UNAUTHENTICATED}"] == 2


async def test_the_garbage_collectors_pauses_are_measured_by_generation() -> None:
    import gc

    port = free_port()
    h = await start_harness(FakeLLM(), metrics_port=port)
    try:
        before = await asyncio.to_thread(scrape, port)
        gc.collect()  # (a full collection: generation 2)
        after = await asyncio.to_thread(scrape, port)
    finally:
        await stop_harness(h)
    full = "parley_gc_pause_seconds_count{generation=2}"
    assert after[full] >= before[full] + 1
    assert after["parley_gc_pause_seconds_sum{generation=2}"] > before["parley_gc_pause_seconds_sum{generation=2}"]
    assert after["parley_gc_pause_seconds_bucket{generation=2,le=+Inf}"] == after[full]
    bounds = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25]
    cumulative = [after[f"parley_gc_pause_seconds_bucket{{generation=2,le={b}}}"] for b in bounds]
    assert cumulative == sorted(cumulative) and cumulative[-1] <= after[full]
    assert gc.callbacks.count(next(c for c in gc.callbacks if type(c).__name__ == "_CollectorPauses")) == 1


@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_an_ipv6_address_serves_the_service_and_its_metrics(host: str) -> None:
    # Found in a QA pass: PARLEY_HOST=::1 failed to start ("Misformatted domain name": gRPC took
    # "::1:PORT"), and [::1] served gRPC but not the metrics ("Name or service not known").
    from parley.v1 import voice_pb2_grpc
    from service.config import Settings
    from service.core.settings import SessionDefaults
    from service.server import start_server
    from service.servicer import StreamLimits
    from tests.fakes import FakeTTS

    settings = Settings(host=host)
    assert settings.host == "::1"
    assert Settings(host="::ffff:127.0.0.1").host == "::ffff:127.0.0.1"  # (loopback too: no keys needed)
    metrics_port = free_port()
    running = await start_server(
        FakeLLM(reply="Hi."),
        FakeTTS(),
        host=settings.host,
        port=0,
        defaults=SessionDefaults(),
        limits=StreamLimits(),
        metrics_port=metrics_port,
    )
    try:
        async with grpc.aio.insecure_channel(f"[::1]:{running.port}") as channel:
            responses = await converse_all(voice_pb2_grpc.VoiceServiceStub(channel), [start(), user("Hello?")])
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_COMPLETED
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=10).read()
        )
        assert b"parley_turns_total" in text
    finally:
        await running.stop(0)


async def test_a_stream_the_shutdowns_grace_ends_is_the_shutdowns_not_a_hang_up() -> None:
    # A review: when the grace ran out, gRPC's cancellation of a call still open (here its client
    # reads nothing, so its stream cannot end) was counted as the client's hang-up, its turn abandoned.
    from service.servicer import StreamLimits

    port = free_port()
    h = await start_harness(
        FakeLLM(reply="This reply is long enough to fill every buffer on the way. " * 40),
        FakeTTS(ms_per_char=300),  # (more audio than any flow-control window holds)
        limits=StreamLimits(send_timeout_s=60),
        metrics_port=port,
    )
    try:
        call = h.stub.Converse()
        await call.write(start())
        await call.write(user("Talk, while I do not listen."))
        await wait_for(lambda: h.running.servicer.active_streams == 1, timeout_s=20)
        await asyncio.sleep(1)  # (its writer waits for the client to read)
        await h.running.stop(1)
        samples = await asyncio.to_thread(scrape, port)
        call.cancel()
    finally:
        await stop_harness(h)
    assert samples["parley_stream_ends_total{reason=shutdown}"] == 1
    assert samples["parley_stream_ends_total{reason=hangup}"] == 0
    assert samples["parley_turns_total{reason=abandoned}"] == 0


def test_a_workers_page_cut_short_costs_only_that_worker() -> None:
    # A review: a worker killed as it answered sends a page cut short (prometheus-client's server
    # gives no length), whose parse error failed the supervisor's whole scrape (HTTP 500: up 0).
    import http.server

    from prometheus_client import generate_latest

    from service.worker_metrics import WorkerMetrics

    pages = {"/good": b"# TYPE parley_active_streams gauge\nparley_active_streams 3.0\n", "/cut": b'parley_act{x="1'}

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(pages[self.server.page])  # type: ignore[attr-defined]

        def log_message(self, *args: object) -> None:
            pass

    servers = []
    for page in ("/good", "/cut"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        server.page = page  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        metrics = WorkerMetrics(3, lambda: {0: servers[0].server_address[1], 1: servers[1].server_address[1]})
        text = generate_latest(metrics.registry).decode()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert 'parley_active_streams{worker="0"} 3.0' in text
    assert 'parley_worker_up{worker="0"} 1.0' in text
    assert 'parley_worker_up{worker="1"} 0.0' in text  # (its page did not parse)
    assert 'parley_worker_up{worker="2"} 0.0' in text  # (not serving: starting, or restarting)
