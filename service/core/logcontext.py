"""Which session and turn a log line belongs to: context variables the session's loop and each turn's
task set, inherited by the tasks they start (see :mod:`service.logs`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["LOG_SESSION", "LOG_TURN", "lines_of_turn"]

LOG_SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("parley_log_session", default="")
"""The session's id, shortened."""
LOG_TURN: contextvars.ContextVar[str] = contextvars.ContextVar("parley_log_turn", default="")
"""The turn's id."""


@contextlib.contextmanager
def lines_of_turn(turn_id: str) -> Iterator[None]:
    """Lines written inside name ``turn_id``: a line about a turn written outside the turn's task."""
    token = LOG_TURN.set(turn_id)
    try:
        yield
    finally:
        LOG_TURN.reset(token)
