"""Prometheus metrics (prometheus-client), served on their own port (``PARLEY_METRICS_PORT``, off by
default). Labels are of low cardinality only (engine, encoding, reason, status): never a session,
a turn or a principal.

- Histograms, in seconds, with buckets for what users feel (tens of milliseconds to seconds):
  ``parley_first_llm_token_seconds``, ``parley_first_audio_seconds`` (both from the turn's start),
  ``parley_speech_end_to_first_audio_seconds`` and ``parley_transcription_seconds`` (voice turns),
  ``parley_turn_seconds`` (the whole turn).
- Counters: ``parley_turns_total{reason}`` (``abandoned``: the client went away before the turn's end
  reached it), ``parley_turns_unheard_total{reason}`` (turns that ended before any of their audio
  was sent: they are not in ``parley_first_audio_seconds``), ``parley_engine_errors_total{engine,kind}``,
  ``parley_engine_retries_total{engine}`` (provider requests tried again, before anything of them was
  used), ``parley_barge_ins_total`` (a reply interrupted by the user's voice),
  ``parley_stream_ends_total{reason}`` (every stream's end: see :data:`STREAM_END_REASONS`) and
  ``parley_rejected_streams_total{status}`` (the streams refused or failed, by status: what an alert
  on errors watches, with no idle timeout, shutdown, takeover or hang-up in it).
- ``parley_gc_pause_seconds{generation}``: how long each of Python's garbage collections held the
  process (its event loop with it), by generation (0 young, 2 full).
- Gauges: ``parley_active_streams`` and ``parley_stream_limit`` (how close a replica is to its limit),
  ``parley_held_sessions`` (sessions this process's streams hold) and ``parley_stored_sessions``
  (sessions kept in this process, held or idle: the memory store only), and
  ``parley_worker_threads_busy{pool}`` beside ``parley_worker_threads_limit{pool}`` (the embedded engines'
  and the codecs' thread pools: a pool whose threads are all busy is where turns wait), and the counter
  ``parley_worker_busy_seconds_total{pool}`` (its rate: threads busy on average, between scrapes).

Retries and the pools are counted per process, and read at each scrape.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.core.events import TurnEnded
from service.core.store import SessionStore
from service.core.workpool import pools
from service.engines.retry import retries

__all__ = ["FAILING_ENGINES", "REJECTION_STATUSES", "STREAM_END_REASONS", "TURN_REASONS", "Metrics"]

FAILING_ENGINES = ("llm", "tts", "stt", "internal")
"""What may fail a turn (:class:`service.core.events.Failure`), the ``engine`` of ``parley_engine_errors_total``."""
REJECTION_STATUSES = (
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
)
"""The statuses of ``parley_rejected_streams_total``: those of a stream refused or failed (a client
that reads nothing is DEADLINE_EXCEEDED, a session store that is down UNAVAILABLE)."""
STREAM_END_REASONS = ("closed", "hangup", "idle", "shutdown", "takeover", "error")
"""Why a stream ended (``parley_stream_ends_total{reason}``): ``closed`` by its client, everything it
sent answered; ``hangup``: the client cancelled or its connection went; ``idle``: the idle timeout;
``shutdown``: the server's (UNAVAILABLE, saying where to resume); ``takeover``: another stream resumed
its session (ABORTED); ``error``: refused or failed, by status in ``parley_rejected_streams_total``.
A rolling update's drain or an idle user is no error for an alert to fire on."""
TURN_REASONS = ("completed", "interrupted", "failed", "abandoned")
"""``parley_turns_total{reason}``: a turn's end reason, or ``abandoned`` when the client went away
before the turn's end reached it (a hang-up is not the user's own interrupt)."""

# No "_created" series beside each counter and histogram: they doubled the exposition's size, and
# Prometheus reads a counter's reset from its value (an SRE's pass).
disable_created_metrics()

_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_TURN_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


class _CollectorPauses:
    """How long each garbage collection took, by generation, counted from ``gc.callbacks`` (once per
    process: every server's metrics read the same counts). Not prometheus-client's ``Histogram``: its
    ``observe`` takes a lock, and a collection that starts inside another ``observe`` on the same thread
    (any allocation may start one) would call back into it and wait on that lock for ever; here the
    callback only adds to lists, under the GIL the collector holds."""

    def __init__(self) -> None:
        self.counts = [[0] * (len(_PAUSE_BUCKETS) + 1) for _ in range(3)]  # per bucket, the last +Inf
        self.sums = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        generation = info["generation"]
        self.sums[generation] += took
        self.counts[generation][bisect.bisect_left(_PAUSE_BUCKETS, took)] += 1

    def metric(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "parley_gc_pause_seconds",
            "Python's garbage collections, by generation (0 young, 2 full): how long each held the process.",
            labels=("generation",),
        )
        for generation, counts in enumerate(self.counts):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, _PAUSE_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric((str(generation),), buckets, self.sums[generation])
        return family


_PAUSES = _CollectorPauses()


class Metrics:
    """One server's metrics, in their own registry."""

    def __init__(self, llm_engine: str, tts_engine: str, stream_limit: int, store: SessionStore | None = None) -> None:
        self.registry = CollectorRegistry()
        # The process's own (process_resident_memory_bytes, process_cpu_seconds_total,
        # process_start_time_seconds: a worker restarted shows a new start; python_gc_*).
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(GC_COLLECTOR)
        names = ("llm", "tts", "encoding")
        self._llm, self._tts = llm_engine, tts_engine
        self.first_llm_token = Histogram(
            "parley_first_llm_token_seconds",
            "From a turn's start to the LLM's first token.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_audio = Histogram(
            "parley_first_audio_seconds",
            "From a turn's start to its first audio message sent.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.speech_end_to_first_audio = Histogram(
            "parley_speech_end_to_first_audio_seconds",
            "Voice turns: from the end of the user's speech arriving to the reply's first audio sent.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.transcription = Histogram(
            "parley_transcription_seconds",
            "Voice turns: the transcription of the user's utterance.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.turn = Histogram(
            "parley_turn_seconds", "A turn, start to end.", names, buckets=_TURN_BUCKETS, registry=self.registry
        )
        self.turns = Counter("parley_turns", "Turns ended, by reason.", ("reason",), registry=self.registry)
        self.unheard = Counter(
            "parley_turns_unheard",
            "Turns that ended before any of their audio was sent (not in parley_first_audio_seconds), by reason.",
            ("reason",),
            registry=self.registry,
        )
        self.barge_ins = Counter(
            "parley_barge_ins",
            "The user's voice starting while a reply could be heard (which stops it).",
            registry=self.registry,
        )
        self.engine_errors = Counter(
            "parley_engine_errors",
            "Turns failed by an engine: which (llm, tts, stt, internal) and whether retrying may help.",
            ("engine", "kind"),
            registry=self.registry,
        )
        self.rejected = Counter(
            "parley_rejected_streams", "Streams refused or failed, by status.", ("status",), registry=self.registry
        )
        self.stream_ends = Counter(
            "parley_stream_ends",
            "Streams ended: closed by the client, hangup, idle (timeout), shutdown (the server's), takeover (its "
            "session resumed elsewhere) or error (by status in parley_rejected_streams_total).",
            ("reason",),
            registry=self.registry,
        )
        self.active_streams = Gauge("parley_active_streams", "Converse streams open.", registry=self.registry)
        self.stream_limit = Gauge("parley_stream_limit", "The most streams this server holds.", registry=self.registry)
        self.stream_limit.set(stream_limit)
        # Every series exists from the start, at 0: a rate() over a series that appears only with its
        # first event misses that event, and a dashboard shows nothing rather than 0.
        for reason in TURN_REASONS:
            self.turns.labels(reason)
            self.unheard.labels(reason)
        for reason in STREAM_END_REASONS:
            self.stream_ends.labels(reason)
        for engine in FAILING_ENGINES:
            for kind in ("retryable", "permanent"):
                self.engine_errors.labels(engine, kind)
        for status in REJECTION_STATUSES:
            self.rejected.labels(status)
        self.store_up = Gauge(
            "parley_session_store_up",
            "1 while the session store answers (checked every few seconds), 0 while it does not: then no "
            "stream can start, and the replica reports NOT_SERVING to readiness checks.",
            registry=self.registry,
        )
        self.store_up.set(1)
        if store is not None:
            Gauge(
                "parley_held_sessions", "Sessions held by this process's streams.", registry=self.registry
            ).set_function(lambda: store.counts()[0])
            if store.counts()[1] is not None:
                Gauge(
                    "parley_stored_sessions",
                    "Sessions kept in this process (the memory store), held or idle.",
                    registry=self.registry,
                ).set_function(lambda: store.counts()[1] or 0)
        self.registry.register(_ProcessCollector())
        if _PAUSES not in gc.callbacks:
            gc.callbacks.append(_PAUSES)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (a thread of prometheus-client's); the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def stream_ended(self, reason: str, status: str = "") -> None:
        """A stream's end (one of :data:`STREAM_END_REASONS`; ``error`` with its status)."""
        self.stream_ends.labels(reason).inc()
        if reason == "error":
            self.rejected.labels(status).inc()

    def turn_ended(self, ended: TurnEnded, encoding: str, *, abandoned: bool = False) -> None:
        """A turn's end; ``abandoned``: the client went away before it reached it."""
        timings = ended.timings
        labels = (self._llm, self._tts, encoding)
        reason = "abandoned" if abandoned else ended.reason.value
        self.turns.labels(reason).inc()
        if not timings.first_audio_ms:
            self.unheard.labels(reason).inc()
        if ended.failure is not None:
            kind = "retryable" if ended.failure.retryable else "permanent"
            self.engine_errors.labels(ended.failure.engine, kind).inc()
        self.turn.labels(*labels).observe(timings.total_ms / 1000)
        if timings.first_llm_token_ms:
            self.first_llm_token.labels(*labels).observe(timings.first_llm_token_ms / 1000)
        if timings.first_audio_ms:
            self.first_audio.labels(*labels).observe(timings.first_audio_ms / 1000)
        if timings.speech_end_to_first_audio_ms:
            self.speech_end_to_first_audio.labels(*labels).observe(timings.speech_end_to_first_audio_ms / 1000)
        if timings.transcription_ms:
            self.transcription.observe(timings.transcription_ms / 1000)


class _ProcessCollector(Collector):
    """What the process counts outside any one server: engine retries, its thread pools, and the
    garbage collector's pauses."""

    def collect(self) -> Iterator[Metric]:
        retried = CounterMetricFamily(
            "parley_engine_retries",
            "Provider requests tried again after a retryable error, before anything of them was used.",
            labels=("engine",),
        )
        counts = retries()
        for engine in ("llm", "tts", "stt"):
            retried.add_metric((engine,), counts.get(engine, 0))
        yield retried
        busy = GaugeMetricFamily("parley_worker_threads_busy", "Threads of a pool running a job now.", labels=("pool",))
        size = GaugeMetricFamily("parley_worker_threads_limit", "Threads a pool may run.", labels=("pool",))
        busy_seconds = CounterMetricFamily(
            "parley_worker_busy_seconds",
            "Thread-seconds a pool spent on jobs that ended (its rate: threads busy on average).",
            labels=("pool",),
        )
        by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        for pool in pools():
            by_name[pool.name][0] += pool.busy
            by_name[pool.name][1] += pool.size
            by_name[pool.name][2] += pool.busy_s
        for name, (running, threads, seconds) in sorted(by_name.items()):
            busy.add_metric((name,), running)
            size.add_metric((name,), threads)
            busy_seconds.add_metric((name,), seconds)
        yield busy
        yield size
        yield busy_seconds
        yield _PAUSES.metric()

    def describe(self) -> Iterator[Metric]:
        # (Names only: the values are read at each scrape, the pools come and go.)
        yield CounterMetricFamily("parley_engine_retries", "", labels=("engine",))
        yield GaugeMetricFamily("parley_worker_threads_busy", "", labels=("pool",))
        yield GaugeMetricFamily("parley_worker_threads_limit", "", labels=("pool",))
        yield CounterMetricFamily("parley_worker_busy_seconds", "", labels=("pool",))
        yield HistogramMetricFamily("parley_gc_pause_seconds", "", labels=("generation",))
