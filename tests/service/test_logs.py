"""Log lines: JSON, one object per line, with the session and the turn a line belongs to; text, where
nothing a client sends can start a line of its own."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from service.logs import TEXT_FORMAT, JsonFormatter, TextFormatter, Throttled, shorten_session_ids
from service.servicer import StreamLimits
from tests.conftest import converse_all, rejection, start, start_harness, stop_harness, user, wait_for
from tests.fakes import FakeLLM, FakeTTS
from ws_bridge.logs import _Json as BridgeJson


@pytest.mark.parametrize("text", [False, True], ids=["json", "text"])
async def test_a_turns_log_lines_name_its_session_and_turn(text: bool) -> None:
    # In text, "turn turn-1 failed" said no session, and every session has a turn-1 (a QA pass).
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT) if text else JsonFormatter())
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (setLevel, not an assignment: it clears the loggers' level caches)
    h = await start_harness(FakeLLM(), FakeTTS(fail_on="second"))
    try:
        responses = await converse_all(h.stub, [start(), user("Hi?")])
        session_id = responses[0].session_started.session_id
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_FAILED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        await stop_harness(h)
    if text:
        failed_line = next(line for line in stream.getvalue().splitlines() if "WARNING" in line and "failed" in line)
        assert f"service.core.session: [{session_id[:8]} turn-1] turn turn-1 failed" in failed_line
        return
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = next(line for line in lines if "failed" in line["message"] and line["level"] == "WARNING")
    assert failed["session"] == session_id[:8] and failed["turn"] == "turn-1"
    assert {"time", "level", "logger", "message"} <= set(failed)
    ended = next(line for line in lines if line["logger"] == "service.servicer" and "turn turn-1" in line["message"])
    assert ended["session"] == session_id[:8] and ended["turn"] == "turn-1"  # (written by the stream's writer)
    assert "Hi?" not in stream.getvalue()  # never what the user said


def test_a_workers_lines_say_which_worker() -> None:
    import json
    import logging

    record = logging.LogRecord("service", logging.INFO, __file__, 1, "Parley listening", None, None)
    assert json.loads(JsonFormatter("1").format(record))["worker"] == "1"
    assert "worker" not in json.loads(JsonFormatter().format(record))  # (a lone service)


async def test_the_end_of_a_turn_that_never_reached_the_client_names_its_turn() -> None:
    # Found in QA: the line of a turn whose end was never sent (the client stopped reading) lacked
    # the turn's id in JSON: it is written after the stream's writer, outside the turn's context.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    h = await start_harness(
        FakeLLM(reply="A long answer. " * 400, token_s=0.0),
        FakeTTS(chunk_s=0.0),
        limits=StreamLimits(send_timeout_s=0.5),
    )
    try:
        call = h.stub.Converse()
        await call.write(start())
        await call.write(user("Hi?", turn_id="unread"))
        await wait_for(lambda: "turn unread interrupted" in stream.getvalue(), 20)  # (it reads nothing)
        call.cancel()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        await stop_harness(h)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (ended,) = [line for line in lines if "turn unread interrupted" in line["message"]]
    assert ended["turn"] == "unread" and ended["session"], ended


async def test_a_client_cannot_write_a_text_line_of_its_own() -> None:
    # The turn id is the client's (up to 128 characters): with a line break in it, a text log showed a
    # forged line, "... ERROR service: cannot start: forged", after the turn's own.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    forged = "t1\n2026-11-27 05:00:00,000 ERROR service: cannot start: forged\r\x1b[2K\u2028"
    h = await start_harness(FakeLLM(), FakeTTS())
    try:
        responses = await converse_all(h.stub, [start(), user("Hi?", turn_id=forged)])
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_COMPLETED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        await stop_harness(h)
    lines = stream.getvalue().splitlines()
    assert not any(line.startswith("2026-11-27 05:00:00,000") for line in lines)
    turn = [line for line in lines if "cannot start: forged" in line]
    assert len(turn) == 1 and "turn t1\\n2026-11-27" in turn[0] and "\\r\\x1b[2K\\u2028" in turn[0], lines
    # The turn id in the line's [session turn] is quoted: one holding "] [" cannot pass for another's.
    assert turn[0].split("] ", 1)[0].endswith(f" {forged!r}"), turn[0]


def test_a_traceback_keeps_its_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("service", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info())
    text = TextFormatter(TEXT_FORMAT).format(record)
    assert "failed: a\\nb" in text and "Traceback (most recent call last):\n" in text


async def test_a_session_id_is_logged_only_shortened(caplog: pytest.LogCaptureFixture) -> None:
    # Whoever has a session's id may resume it (with no API keys, anyone): the client's status names
    # it whole, the log only as every line does, by its first 8 characters.
    unknown = "pTxXEFU6P0zLtq5NUSBZKL20"
    h = await start_harness(FakeLLM(), FakeTTS())
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            error = await rejection(h.stub, [start(session_id=unknown)])
            responses = await converse_all(h.stub, [start()])
            session_id = responses[0].session_started.session_id
            call = h.stub.Converse()
            await call.write(start(session_id=session_id))
            await call.read()
            await h.running.stop(grace_s=1)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
    finally:
        await stop_harness(h)
    assert unknown in error.details() and session_id in ended.value.details()  # (the client's)
    assert f"no session '{unknown[:8]}…'" in caplog.text and f"resume session {session_id[:8]}… on" in caplog.text
    assert unknown not in caplog.text and session_id not in caplog.text


def test_session_ids_in_a_message_are_shortened() -> None:
    assert shorten_session_ids("session -TxXEFU6P0zLtq5NUSBZKL20 was resumed") == "session -TxXEFU6… was resumed"
    assert shorten_session_ids("no session 'abc': no session store") == "no session 'abc': no session store"


async def test_a_stage_that_never_happened_is_logged_as_none(caplog: pytest.LogCaptureFixture) -> None:
    h = await start_harness(FakeLLM(fail_after_tokens=0), FakeTTS())
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            responses = await converse_all(h.stub, [start(), user("Hi?")])
    finally:
        await stop_harness(h)
    assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_FAILED
    [line] = [m for r in caplog.records if r.name == "service.servicer" and "turn turn-1" in (m := r.getMessage())]
    assert "first token none, first audio none, total " in line and "0.0 s of audio" in line


def test_a_json_line_is_one_line_to_every_reader() -> None:
    # Found in QA: a message with U+2028 or U+0085 (valid as they are in JSON) was 5 lines to Python's
    # splitlines, and to readers that split as it does.
    message = "a\x85b\u2028c\u2029d\x0be\x1cf\nend"
    record = logging.LogRecord("service", logging.INFO, __file__, 1, message, None, None)
    for formatter in (JsonFormatter(), BridgeJson()):
        line = formatter.format(record)
        assert len(line.splitlines()) == 1 and json.loads(line)["message"] == message


def test_a_line_anyone_may_cause_is_written_once_in_a_while_and_says_how_many_were_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found in QA: every call without a key wrote a line, so a scanner could fill the log at will.
    line = Throttled(logging.getLogger("service.test"), logging.INFO, interval_s=0.2)
    with caplog.at_level(logging.INFO):
        for attempt in range(1000):
            line("refused %s", attempt)
        time.sleep(0.25)
        line("refused %s", "later")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused later (and 999 more like it left out of the log before)",
    ]


async def test_ends_a_client_causes_at_will_are_logged_once_in_a_while_and_a_failing_store_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found in a QA pass: each stream ended for a bad request (or over the stream limit) wrote its
    # "stream ended" line, so a client could fill the log at will though the README says such lines
    # are written at most once per 10 s; and the session store out of reach was logged at INFO.
    from service.errors import StoreUnavailable
    from service.stores.memory import MemoryStore

    class Unreachable(MemoryStore):
        async def create(self, session: object) -> object:  # type: ignore[override]
            raise StoreUnavailable("the session store is unavailable: Timeout reading from redis")

    h = await start_harness(FakeLLM(), FakeTTS(), store=Unreachable(ttl_s=60))
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            for _ in range(20):
                error = await rejection(h.stub, [user("Hi?")])  # (no start first)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            error = await rejection(h.stub, [start()])
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_harness(h)
    ended = [r for r in caplog.records if r.getMessage().startswith("stream ended")]
    assert [(r.levelno, r.getMessage()) for r in ended] == [
        (logging.INFO, "stream ended: send `start` before `user_text`: the first message of a stream must be `start`"),
        (logging.WARNING, "stream ended: the session store is unavailable: Timeout reading from redis"),
    ]


def test_the_services_choices_are_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    # An SRE's pass: PARLEY_LOG_LEVEL=debug (as most services take it) stopped the service with exit 2.
    from pydantic import ValidationError

    from service.config import Settings

    choices = {"LOG_LEVEL": "debug", "LLM": "Scripted", "STT": "NONE", "WORKERS": "Auto", "SESSION_STORE": "Redis"}
    for name, value in choices.items():
        monkeypatch.setenv(f"PARLEY_{name}", value)
    chosen = Settings(_cli_parse_args=False)  # type: ignore[call-arg]
    assert (chosen.log_level, chosen.llm, chosen.stt, chosen.workers) == ("DEBUG", "scripted", "none", "auto")
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError, match="log_level"):
        Settings(_cli_parse_args=False)  # type: ignore[call-arg]


def test_opentelemetrys_lines_are_written_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    # An SRE's pass: with the collector down, each process wrote three lines per export (every 5 s).
    import logging
    import time

    from service.logs import OncePerInterval

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    kept = OncePerInterval("opentelemetry")

    def record(name: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "Failed to export batch code: %s", ("503",), None)

    exporter = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    assert [kept.filter(record(exporter)) for _ in range(4)] == [True, False, False, False]
    assert kept.filter(record(exporter, logging.ERROR))  # (another level: a line of its own)
    assert kept.filter(record("service.servicer"))  # (the service's own lines are not held back)
    now[0] += 61
    later = record(exporter)
    assert kept.filter(later)
    assert later.getMessage() == "Failed to export batch code: 503 (and 3 more like it left out of the log before)"
