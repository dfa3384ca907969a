"""OpenTelemetry spans (optional: ``pip install '.[otel]'``; off unless an exporter is configured, see
:mod:`service.telemetry`). Without the package every span here is a no-op.

One span per turn (``parley.turn``), with child spans for the LLM stream (``parley.llm``), each
synthesis (``parley.tts``) and each transcription (``parley.transcription``); the turn span ends when
the turn's end leaves for the client (or the turn is discarded), with the timings the client got as
attributes. A voice turn's span begins where the user's speech ended, and its transcriptions, made
before the turn existed, are recorded in it afterwards with the times they ran (:func:`record_span`).
Spans carry ids, counts and timings, never what was said: an engine's error is recorded with its
:attr:`~service.errors.EngineError.for_logs`, without the provider's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # the optional extra is not installed
    _trace = None  # type: ignore[assignment]

__all__ = ["as_current", "enable", "end_span", "fail_span", "open_span", "record_span", "span"]

_enabled = False


def enable() -> None:
    """Make spans from now on (once a tracer provider is set up): without this call they cost nothing."""
    global _enabled
    _enabled = _trace is not None


@contextlib.contextmanager
def span(name: str, attributes: dict[str, Any] | None = None, *, current: bool = True) -> Iterator[Any]:
    """A span named ``name``, a child of the current span, ended on exit: an exception ends it with an
    error status, a cancellation with ``parley.cancelled`` (not as an error). ``current``: it is the
    current span inside (tasks started there are its children); else the current span stays the
    parent's. Yields the span (None without tracing)."""
    opened = open_span(name, attributes)
    if opened is None or _trace is None:
        yield None
        return
    try:
        with as_current(opened) if current else contextlib.nullcontext():
            yield opened
    except asyncio.CancelledError:  # (a barge-in, a discarded reply, a stream gone: work stopped, not failed)
        opened.set_attribute("parley.cancelled", True)
        raise
    except BaseException as error:
        fail_span(opened, error)
        raise
    finally:
        opened.end()


def fail_span(opened: Any, error: BaseException | None) -> None:
    """Mark ``opened`` (or None) as failed by ``error`` (nothing if None): an error status and an
    ``exception`` event; an engine's error without the provider's own words."""
    if opened is None or error is None or _trace is None:
        return
    plain = getattr(error, "for_logs", None)  # (an EngineError's: its body may quote the user's text)
    if plain is None:
        opened.record_exception(error)
    else:
        opened.add_event("exception", {"exception.type": type(error).__name__, "exception.message": plain})
    opened.set_status(_trace.Status(_trace.StatusCode.ERROR, type(error).__name__))


def open_span(name: str, attributes: dict[str, Any] | None = None, *, start: float | None = None) -> Any:
    """A span named ``name``, a child of the current span, that stays open until :func:`end_span`
    (None without tracing). ``start``: when it began (``time.monotonic()``), if before now."""
    if not _enabled or _trace is None:
        return None
    attributes = {k: v for k, v in (attributes or {}).items() if v is not None}
    began = _epoch_ns(start) if start is not None else None
    return _trace.get_tracer("parley").start_span(name, attributes=attributes, start_time=began)


def record_span(
    name: str,
    parent: Any,
    start: float,
    end: float,
    attributes: dict[str, Any],
    error: BaseException | None = None,
) -> None:
    """A child of ``parent`` (from :func:`open_span`, or None: nothing) that ran from ``start`` to
    ``end`` (``time.monotonic()``), failed by ``error`` if given: work done before its parent existed."""
    if parent is None or _trace is None:
        return
    context = _trace.set_span_in_context(parent)
    attributes = {k: v for k, v in attributes.items() if v is not None}
    recorded = _trace.get_tracer("parley").start_span(
        name, context=context, attributes=attributes, start_time=_epoch_ns(start)
    )
    fail_span(recorded, error)
    recorded.end(end_time=_epoch_ns(end))


def _epoch_ns(moment: float) -> int:
    """A ``time.monotonic()`` moment in OpenTelemetry's time: nanoseconds since the epoch."""
    return time.time_ns() - round((time.monotonic() - moment) * 1e9)


@contextlib.contextmanager
def as_current(opened: Any) -> Iterator[None]:
    """Make ``opened`` (from :func:`open_span`, or None) the current span inside, without ending it:
    spans started there, in tasks started there too, are its children."""
    if opened is None or _trace is None:
        yield
        return
    with _trace.use_span(opened, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        yield


def end_span(opened: Any, attributes: dict[str, Any], error: str | None = None) -> None:
    """End ``opened`` (from :func:`open_span`, or None) with ``attributes``, and ``error`` as its
    status if given (never a provider's words: an engine error's ``for_logs``)."""
    if opened is None or _trace is None:
        return
    opened.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error is not None:
        opened.set_status(_trace.Status(_trace.StatusCode.ERROR, error))
    opened.end()
