"""Tracing set-up: OpenTelemetry's SDK with an OTLP exporter, when one is configured
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, OpenTelemetry's own
variables) and the optional extra is installed (``pip install '.[otel]'``). Otherwise nothing: the
spans of :mod:`service.core.tracing` cost nothing."""

from __future__ import annotations

import logging
import math
import os
from typing import Any
from urllib.parse import urlsplit

from service.core import tracing
from service.setting_errors import without_credentials

__all__ = ["configure_tracing", "tracing_settings_problem"]

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TIMEOUTS = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 5.0
"""How long an export waits for the collector unless ``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`` says."""
MAX_EXPORT_TIMEOUT_S = 60.0
"""The longest export timeout taken: a value in milliseconds, as the specification has it, is refused."""


def tracing_settings_problem() -> str | None:
    """What is wrong with OpenTelemetry's exporter variables the service reads, or None. Checked at
    start-up: an endpoint that is not a URL was accepted, and every export then failed."""
    for name in _ENDPOINTS:
        if not (value := os.environ.get(name)):
            continue
        try:
            parts = urlsplit(value)  # (raises ValueError for a bracketed host that does not close)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError as error:
            return f"{name} is {without_credentials(value)!r}, which is not a URL ({error})"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return (
                f"{name} is {without_credentials(value)!r}, not an http:// or https:// URL of the collector "
                "(OTLP over HTTP), e.g. http://otel-collector:4318"
            )
    for name in _TIMEOUTS:
        if not (value := os.environ.get(name)):
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not seconds > 0 or math.isinf(seconds):
            return f"{name} is {value!r}, not a number of seconds above 0"
        if seconds > MAX_EXPORT_TIMEOUT_S:
            return (
                f"{name} is {value!r}: OpenTelemetry's Python exporter reads it in seconds (the specification "
                f"says milliseconds), and more than {MAX_EXPORT_TIMEOUT_S:g} s would hold the service's exit on a "
                "collector that hangs"
            )
    return None


def configure_tracing(service_name: str = "parley") -> bool:
    """Install a tracer provider exporting over OTLP/HTTP when an endpoint is configured; whether it did."""
    endpoint = next((os.environ[name] for name in _ENDPOINTS if os.environ.get(name)), None)
    if endpoint is None:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but OpenTelemetry is not installed: pip install '.[otel]'; no traces")
        return False
    provider = TracerProvider(resource=_resource(Resource, service_name))
    # An export waits at most this long for the collector (OpenTelemetry's variables win), so that a
    # collector that is down delays the process's exit by no more than that (OpenTelemetry's own
    # default is 10 s, which a pod's grace period would not allow for: see deploy/kubernetes.yaml).
    told = any(os.environ.get(name) for name in _TIMEOUTS)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=None if told else EXPORT_TIMEOUT_S)))
    trace.set_tracer_provider(provider)
    tracing.enable()
    log.info("traces: exported over OTLP/HTTP to %s", without_credentials(endpoint))
    return True


def _resource(resource: Any, service_name: str) -> Any:
    """The traces' resource: OpenTelemetry's own variables first (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``: staging and production, or two deployments, told apart), then
    ``service_name`` where they name no service. (The SDK gives each process, each worker, a
    ``service.instance.id`` of its own.)"""
    found = resource.create()
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        return found.merge(resource.create({"service.name": service_name}))
    return found
