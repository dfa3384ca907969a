"""The bridge's Prometheus metrics (``PARLEY_BRIDGE_METRICS_PORT``, off by default): sockets open,
sockets closed by close code, and what it refused (by reason: an origin, the socket limit, credentials
in a URL, a bad frame, a bad Twilio signature)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["BridgeMetrics"]


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sockets = Gauge(
            "parley_bridge_sockets", "WebSockets open (the page's and phone calls).", registry=self.registry
        )
        self.closes = Counter(
            "parley_bridge_socket_closes", "WebSockets closed, by close code.", ("code",), registry=self.registry
        )
        self.refused = Counter(
            "parley_bridge_refused", "Upgrades and frames refused, by reason.", ("reason",), registry=self.registry
        )

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
