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

from service.core.logcontext import LOG_SESSION, LOG_TURN
from service.workers import WORKER_INDEX

__all__ = ["JsonFormatter", "configure"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """The root logger's level and format (``text`` or ``json``), on stderr. In a worker (see
    :mod:`service.workers`) every line says which: ``[w1]`` in text, ``"worker": "1"`` in JSON."""
    worker = os.environ.get(WORKER_INDEX, "")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(
            logging.Formatter(TEXT_FORMAT.replace("%(name)s", f"[w{worker}] %(name)s", 1) if worker else TEXT_FORMAT)
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
