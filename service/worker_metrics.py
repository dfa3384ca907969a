"""The supervisor's ``/metrics``: every worker's metrics on the one port (``PARLEY_METRICS_PORT``),
each series labelled with its ``worker``, and the supervisor's own (workers restarted, and whether
each answered the scrape). A pod, whatever its number of workers, is one scrape target, as its
annotations and a ServiceMonitor name one port.

Each worker serves its metrics on a loopback port of its own choosing, which it tells the supervisor
as it comes to serve (:func:`service.workers.tell_ready`); at each scrape the supervisor reads them
all at once, in threads (prometheus-client's HTTP server collects in its own thread, never the event
loop's), each read (connecting, then each receipt of bytes) timing out after :data:`READ_TIMEOUT_S`."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
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

    def __init__(self, count: int, ports: Callable[[], dict[int, int]]) -> None:
        """``ports``: each serving worker's metrics port, by its index (called in the HTTP server's
        thread: it reads the supervisor's state without changing it)."""
        self._count = count
        self._ports = ports
        self._restarts = {(index, reason): 0 for index in range(count) for reason in RESTART_REASONS}
        self._readers = ThreadPoolExecutor(max_workers=count, thread_name_prefix="worker metrics")
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def restarted(self, index: int, reason: str) -> None:
        self._restarts[(index, reason)] += 1

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (prometheus-client's thread); the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def collect(self) -> Iterator[Metric]:
        targets = sorted(self._ports().items())
        read = list(self._readers.map(_read, [port for _, port in targets]))
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "parley_worker_up",
            "1 if the worker's metrics were read at this scrape, 0 if it is starting, restarting or did not answer.",
            labels=("worker",),
        )
        answered = {index: families for (index, _), families in zip(targets, read, strict=True) if families is not None}
        for index in range(self._count):
            up.add_metric((str(index),), 1 if index in answered else 0)
        for index, families in answered.items():
            for family in families:
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


def _read(port: int) -> list[Metric] | None:
    """A worker's metrics, or None if it did not answer, or answered what does not parse (a worker
    killed as it answered sends a page cut short): that worker is ``up`` 0, the others are read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=READ_TIMEOUT_S) as response:
            return list(text_string_to_metric_families(response.read().decode()))
    except Exception:  # noqa: BLE001 - whatever one worker's page holds, the scrape of the others goes on
        return None
