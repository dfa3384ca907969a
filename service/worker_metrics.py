"""The supervisor's ``/metrics``: every worker's metrics on the one port (``PARLEY_METRICS_PORT``),
each series labelled with its ``worker``, and the supervisor's own (workers restarted, and whether
each answered the scrape). A pod, whatever its number of workers, is one scrape target, as its
annotations and a ServiceMonitor name one port.

Each worker serves its metrics on a loopback port of its own choosing, which it tells the supervisor
as it comes to serve (:func:`service.workers.tell_ready`); at each scrape the supervisor reads them
all at once, in threads (prometheus-client's HTTP server collects in its own thread, never the event
loop's), each within :data:`READ_TIMEOUT_S`."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["RESTART_REASONS", "READ_TIMEOUT_S", "WorkerMetrics"]

READ_TIMEOUT_S = 2.0
"""How long a scrape waits for a worker's metrics (a worker that does not answer is ``up`` 0)."""
RESTART_REASONS = ("crashed", "hung", "exited")
"""Why a worker was restarted: it died (a non-zero status, a signal: an out-of-memory kill), it stopped
answering and was killed (``PARLEY_WORKER_TIMEOUT_S``), or it exited 0 on a SIGTERM of its own."""


class WorkerMetrics(Collector):
    """The workers' metrics, gathered at each scrape, and the supervisor's record of them."""

    def __init__(self, count: int) -> None:
        self._count = count
        self.ports: dict[int, int] = {}
        """Each serving worker's metrics port, by its index (set and cleared on the event loop; read
        in the HTTP server's thread: a copy of a dict is taken whole under the GIL)."""
        self._restarts = {(index, reason): 0 for index in range(count) for reason in RESTART_REASONS}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def restarted(self, index: int, reason: str) -> None:
        self._restarts[(index, reason)] += 1

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (prometheus-client's thread); the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def collect(self) -> Iterator[Metric]:
        targets = sorted(self.ports.copy().items())
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            texts = list(pool.map(lambda target: _read(target[1]), targets))
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "parley_worker_up",
            "1 if the worker's metrics were read at this scrape, 0 if it is starting, restarting or did not answer.",
            labels=("worker",),
        )
        answered = {index: text for (index, _), text in zip(targets, texts, strict=True) if text is not None}
        for index in range(self._count):
            up.add_metric((str(index),), 1 if index in answered else 0)
        for index, text in answered.items():
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    into.samples.append(sample._replace(labels={**sample.labels, "worker": str(index)}))
        yield from merged.values()
        yield up
        restarts = CounterMetricFamily(
            "parley_worker_restarts",
            "Workers restarted by the supervisor, by why: crashed (a non-zero status or a signal: an "
            "out-of-memory kill), hung (killed for not answering), exited (0, on a SIGTERM of its own).",
            labels=("worker", "reason"),
        )
        for (index, reason), count in sorted(self._restarts.items()):
            restarts.add_metric((str(index), reason), count)
        yield restarts

    def describe(self) -> Iterator[Metric]:
        return iter(())  # (what the workers export is known only by reading it)


def _read(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=READ_TIMEOUT_S) as response:
            return str(response.read().decode())
    except (OSError, ValueError):
        return None
