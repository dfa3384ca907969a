"""Tracing set-up: OpenTelemetry's SDK with an OTLP exporter, when one is configured
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, OpenTelemetry's own
variables) and the optional extra is installed (``pip install '.[otel]'``). Otherwise nothing: the
spans of :mod:`service.core.tracing` cost nothing."""

from __future__ import annotations

import logging
import os

from service.core import tracing

__all__ = ["configure_tracing"]

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 5.0
"""How long an export waits for the collector unless ``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`` says."""


def configure_tracing(service_name: str = "parley") -> bool:
    """Install a tracer provider exporting over OTLP/HTTP when an endpoint is configured; whether it did."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
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
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    # An export waits at most this long for the collector (OpenTelemetry's variables win), so that a
    # collector that is down delays the process's exit by no more than that (OpenTelemetry's own
    # default is 10 s, which a pod's grace period would not allow for: see deploy/kubernetes.yaml).
    told = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=None if told else EXPORT_TIMEOUT_S)))
    trace.set_tracer_provider(provider)
    tracing.enable()
    log.info("traces: exported over OTLP")
    return True
