"""Which session and turn a log line belongs to: context variables the session's loop and each turn's
task set, inherited by the tasks they start (see :mod:`service.logs`)."""

from __future__ import annotations

import contextvars

__all__ = ["LOG_SESSION", "LOG_TURN"]

LOG_SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("parley_log_session", default="")
"""The session's id, shortened."""
LOG_TURN: contextvars.ContextVar[str] = contextvars.ContextVar("parley_log_turn", default="")
"""The turn's id."""
