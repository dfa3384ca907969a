"""The bridge's log lines: text (the default) or one JSON object per line (``PARLEY_LOG_FORMAT=json``,
shared with the service, whose lines have the same fields; the bridge has no sessions of its own)."""

from __future__ import annotations

import datetime
import logging

from service.logs import TextFormatter, json_line

__all__ = ["configure"]


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_line(entry)


def configure(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        _Json() if log_format == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
