"""JSON log lines: one object per line, with the session and the turn a line belongs to."""

from __future__ import annotations

import io
import json
import logging

from parley.v1 import voice_pb2 as pb
from service.logs import JsonFormatter
from tests.conftest import converse_all, start, start_harness, stop_harness, user
from tests.fakes import FakeLLM, FakeTTS


async def test_a_turns_log_lines_name_its_session_and_turn() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
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
