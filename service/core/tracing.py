"""OpenTelemetry spans (optional: ``pip install '.[otel]'``; off unless an exporter is configured, see
:mod:`service.telemetry`). Without the package every span here is a no-op.

One span per turn (``parley.turn``), with child spans for the LLM stream (``parley.llm``), each
synthesis (``parley.tts``) and each transcription (``parley.transcription``); the turn span carries
its timings as attributes when it ends. Spans carry ids, counts and timings, never what was said.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # the optional extra is not installed
    _trace = None  # type: ignore[assignment]

__all__ = ["enable", "span"]

_enabled = False


def enable() -> None:
    """Make spans from now on (once a tracer provider is set up): without this call they cost nothing."""
    global _enabled
    _enabled = _trace is not None


@contextlib.contextmanager
def span(name: str, attributes: dict[str, Any] | None = None, *, current: bool = True) -> Iterator[Any]:
    """A span named ``name``, a child of the current span, ended on exit (an exception ends it with an
    error status). ``current``: it is the current span inside (tasks started there are its
    children); else the current span stays the parent's. Yields the span (None without tracing)."""
    if not _enabled or _trace is None:
        yield None
        return
    tracer = _trace.get_tracer("parley")
    attributes = {k: v for k, v in (attributes or {}).items() if v is not None}
    if current:
        with tracer.start_as_current_span(name, attributes=attributes) as opened:
            yield opened
        return
    opened = tracer.start_span(name, attributes=attributes)
    try:
        yield opened
    except BaseException as error:
        opened.record_exception(error)
        opened.set_status(_trace.Status(_trace.StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        opened.end()
