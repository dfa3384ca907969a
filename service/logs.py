"""Log lines: text for a terminal (the default), or one JSON object per line (``PARLEY_LOG_FORMAT=json``)
for a log pipeline, each with the session (its id shortened) and the turn it belongs to.

The session and the turn are context variables: the session's loop sets the session once it is
known, each turn's task sets its turn, and every task created from them inherits both, so a log
line written anywhere during a turn says which. Log lines never hold what the user said or typed
at INFO or above (only at DEBUG).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence

from service.core.logcontext import LOG_SESSION, LOG_TURN
from service.workers import WORKER_INDEX

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "Throttled",
    "configure",
    "json_line",
    "refusal",
    "shorten_session_ids",
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_ONE_LINE = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, 0x85) if code != 0x09}
_ONE_LINE |= {0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


_PLAIN_TURN_ID = re.compile(r"[A-Za-z0-9_.:-]+")

# "session <id>" or "session '<id>'" as the service's messages name one (an id is 24 URL-safe characters).
_SESSION_ID = re.compile(r"(\bsession '?)([A-Za-z0-9_-]{8})[A-Za-z0-9_-]{4,}")


def shorten_session_ids(text: str) -> str:
    """``text`` with the session ids it names cut to the 8 characters every log line uses: a status
    message gives the client the whole id (it needs it to resume), but whoever holds a session's id
    may resume it, and a log is read by more people than the client."""
    return _SESSION_ID.sub(r"\1\2…", text)


class TextFormatter(logging.Formatter):
    """Text lines whose message stays on its line: control characters and line breaks in it (a
    client's turn id, say) are escaped, so that no client can write a line of its own, a forged
    ERROR say. (A traceback still takes the lines it needs.) A line of a session starts its message
    with the session (shortened) and the turn, in brackets, as the JSON lines carry them: turn ids
    repeat in every session."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # (logging's name)
        record.message = record.message.translate(_ONE_LINE)
        if session := LOG_SESSION.get():
            turn = LOG_TURN.get()
            if turn and not _PLAIN_TURN_ID.fullmatch(turn):
                turn = repr(turn)  # (a client's id, quoted: "] [" in it cannot pass for another session's)
            record.message = f"[{session}{f' {turn}' if turn else ''}] {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and worker (its
    index, in a worker), session, turn and exception when there are."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker:
            entry["worker"] = self._worker
        if session := LOG_SESSION.get():
            entry["session"] = session
        if turn := LOG_TURN.get():
            entry["turn"] = turn
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_line(entry)


def json_line(entry: dict[str, str]) -> str:
    """``entry`` as one line of JSON, whatever its text holds: the characters JSON leaves as they are
    but that some readers take for a line break (U+0085, U+2028, U+2029) are escaped too."""
    return json.dumps(entry, ensure_ascii=False).translate(_LINE_BREAKS)


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class Throttled:
    """A line that anyone may cause at will (a refused call, a malformed request): written at most once
    per ``interval_s``, each saying how many like it were left out before it, so that a flood of them
    costs neither the log nor the event loop more than a line now and then (the metrics count all)."""

    _every: list[Throttled] = []  # (for tests, which start each afresh: reset_all)

    def __init__(self, logger: logging.Logger, level: int, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._interval_s = interval_s
        self._next = 0.0
        self._left_out = 0
        Throttled._every.append(self)

    @classmethod
    def reset_all(cls) -> None:
        """Let every throttled line be written at once again, none left out."""
        for line in cls._every:
            line._next, line._left_out = 0.0, 0

    def __call__(self, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(self._level):
            return
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            message += f" (and {self._left_out} more like it left out of the log before)"
        self._logger.log(self._level, message, *args)
        self._next, self._left_out = now + self._interval_s, 0


def configure(level: str, log_format: str) -> None:
    """The root logger's level and format (``text`` or ``json``), on stderr. In a worker (see
    :mod:`service.workers`) every line says which: ``[w1]`` in text, ``"worker": "1"`` in JSON."""
    worker = os.environ.get(WORKER_INDEX, "")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(
            TextFormatter(TEXT_FORMAT.replace("%(name)s", f"[w{worker}] %(name)s", 1) if worker else TEXT_FORMAT)
        )
    handler.addFilter(OncePerInterval("opentelemetry"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class OncePerInterval(logging.Filter):
    """A handler's filter for the lines of the loggers under ``prefix``: at most one per logger and
    level each ``interval_s``, the next saying how many like it were left out. OpenTelemetry's
    exporter writes three lines per failed export (a collector that is down: every 5 s, in every
    process), which would bury the service's own."""

    def __init__(self, prefix: str, interval_s: float = 60.0) -> None:
        super().__init__()
        self._prefix = prefix
        self._interval_s = interval_s
        self._state: dict[tuple[str, int], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        key = (record.name, record.levelno)
        now = time.monotonic()
        next_at, left_out = self._state.get(key, (0.0, 0))
        if now < next_at:
            self._state[key] = (next_at, left_out + 1)
            return False
        if left_out:
            record.msg = f"{record.getMessage()} (and {left_out} more like it left out of the log before)"
            record.args = None
        self._state[key] = (now + self._interval_s, 0)
        return True


def refusal(
    logger: str, message: str, argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> str:
    """What a program prints of settings it cannot run with, before its log is set up (its settings
    did not parse): ``logger: message`` as text, or the JSON line its log would have written when the
    flags (``--log-format json``, the last one given) or ``PARLEY_LOG_FORMAT`` ask for JSON, so that a
    log pipeline reads a pod's last words too."""
    argv = sys.argv[1:] if argv is None else argv
    log_format = next((value for name, value in environ.items() if name.upper() == "PARLEY_LOG_FORMAT"), "")
    for i, arg in enumerate(argv):
        if arg in ("--log-format", "--log_format") and i + 1 < len(argv):
            log_format = argv[i + 1]
        elif arg.startswith(("--log-format=", "--log_format=")):
            log_format = arg.partition("=")[2]
    if log_format.strip().casefold() != "json":  # (as the settings take it: in any case)
        return f"python -m {logger}: {message}"
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "level": "ERROR",
        "logger": logger,
        "message": message,
    }
    if worker := environ.get(WORKER_INDEX, ""):
        entry["worker"] = worker
    return json_line(entry)
