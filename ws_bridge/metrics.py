"""The bridge's Prometheus metrics (``PARLEY_BRIDGE_METRICS_PORT``, off by default): sockets open,
sockets closed by close code, and what it refused (by reason: an origin, the socket limit, credentials
in a URL, a malformed HTTP request, a bad frame, a frame too large, a client that does not read what
it is sent, a bad Twilio signature, a phone call no signature can check on a bridge beyond loopback)."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    start_http_server,
)

__all__ = ["REFUSALS", "BridgeMetrics", "close_label"]

REFUSALS = (
    "origin",
    "socket limit",
    "credentials in URL",
    "bad request",
    "bad frame",
    "frame too large",
    "not reading",
    "twilio signature",
    "twilio unchecked",
)
"""The reasons of ``parley_bridge_refused_total``: each series exists, at 0, from the start."""

_STANDARD_CLOSE_CODES = frozenset(range(1000, 1016)) - {1004}

disable_created_metrics()  # (as the service's: no "_created" series doubling the exposition)


def close_label(sent: int | None, received: int | None, received_first: bool | None) -> str:
    """The ``code`` label of a closed socket: the code of the side that closed first (the bridge's own
    when it did, not the client's echo), 1006 when neither did. A standard code as it is; codes an
    application chooses freely (3000 to 4999) as ``3xxx`` or ``4xxx``, anything else as ``other``, so
    that no client can make a series of its own."""
    if sent is not None and (received is None or not received_first):
        code = sent
    elif received is not None:
        code = received
    else:
        code = 1006
    if code in _STANDARD_CLOSE_CODES:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(PROCESS_COLLECTOR)  # (process_resident_memory_bytes, process_cpu_seconds_total, ...)
        self.registry.register(GC_COLLECTOR)
        self.sockets = Gauge(
            "parley_bridge_sockets", "WebSockets open (the page's and phone calls).", registry=self.registry
        )
        self.closes = Counter(
            "parley_bridge_socket_closes", "WebSockets closed, by close code.", ("code",), registry=self.registry
        )
        self.refused = Counter(
            "parley_bridge_refused", "Upgrades and frames refused, by reason.", ("reason",), registry=self.registry
        )
        for reason in REFUSALS:
            self.refused.labels(reason)

    def serve(self, host: str, port: int) -> int:
        """Serve the metrics on ``host:port`` (0: a free port); the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
