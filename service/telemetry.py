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
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracing.enable()
    log.info("traces: exported over OTLP")
    return True
