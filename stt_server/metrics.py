"""Prometheus metrics, one registry per server (no process-global state).

Two kinds: events counted as they happen (audio in, finals, errors, latencies, inference time),
kept in prometheus-client objects that sessions update; and state read at scrape time from the
server's ``statistics()`` snapshot (sessions, refusals, queues, breakers, GPU memory), so the
exporter never reaches into internals and never goes stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .admission import RefusalReason
from .engine import CALL_KINDS
from .errors import ErrorCode

if TYPE_CHECKING:
    from .engine import Transcript
    from .stats import ServerStatistics

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
#: A file request runs from a fraction of a second (a short clip on a GPU) to minutes (an hour
#: of audio on a CPU).
_FILE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

#: The file API's routes, as the ``endpoint`` label names them.
FILE_ENDPOINTS = ("transcriptions", "translations")

#: Breaker states as numbers, so a dashboard can colour them and an alert can compare.
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_resident_memory_bytes, CPU seconds, open fds: what a soak and an alert watch.
        ProcessCollector(registry=r)
        self.audio_seconds = Counter(
            "stt_audio_received_seconds", "Seconds of audio received from clients", registry=r
        )
        self.utterances = Counter(
            "stt_utterances_finalized", "Utterances that got a completed message", registry=r
        )
        self.errors = Counter(
            "stt_errors", "Error messages sent to clients, by code", ["code"], registry=r
        )
        self.speculative_finals = Counter(
            "stt_speculative_finals",
            "Finals decoded while an endpoint's silence was still being waited for, by outcome "
            "(used; discarded because speech resumed; failed and decoded again; shown: of the "
            "discarded, those whose text was shown as a partial of the utterance going on)",
            ["outcome"],
            registry=r,
        )
        self.partial_latency = Histogram(
            "stt_partial_latency_seconds",
            "From a partial being due to its realtime message being queued",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.partial_gap = Histogram(
            "stt_partial_gap_seconds",
            "Between two partials of one utterance, as the client sees them (the cadence)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.final_latency = Histogram(
            "stt_final_latency_seconds",
            "From the endpoint of an utterance to its completed message being queued",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "stt_inference_seconds",
            "Model time per transcription",
            ["kind"],
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "stt_engine_queue_wait_seconds",
            "Time a transcription waited for a worker",
            ["kind"],
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        # The OpenAI-compatible file API (POST /v1/audio/...), counted apart from sessions.
        self.file_requests = Counter(
            "stt_file_requests",
            "File API requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.file_audio_seconds = Counter(
            "stt_file_audio_seconds",
            "Seconds of audio in files transcribed by the file API",
            registry=r,
        )
        self.file_duration = Histogram(
            "stt_file_request_seconds",
            "From a file request's head being read to its answer (receiving the body, decoding, "
            "queueing behind live sessions, inference)",
            buckets=_FILE_BUCKETS,
            registry=r,
        )
        self.files_active = Gauge(
            "stt_file_requests_active",
            "File API requests being received, decoded or transcribed now",
            registry=r,
        )

        # Every known label value exists from the start, so dashboards and rate() see zeros
        # instead of missing series before the first event.
        for code in ErrorCode:
            self.errors.labels(code.value)
        for kind in ("partial", "final", "upload"):
            self.inference.labels(kind)
            self.queue_wait.labels(kind)
        for endpoint in FILE_ENDPOINTS:
            self.file_requests.labels(endpoint, "200")

    def observe_transcription(
        self, transcript: Transcript | None, *, final: bool, upload: bool = False
    ) -> None:
        """Record a finished transcription (None: it was superseded or failed; nothing to add).
        ``upload``: a chunk of a file sent to the file API."""
        if transcript is None:
            return
        kind = "upload" if upload else "final" if final else "partial"
        self.queue_wait.labels(kind).observe(transcript.queued)
        self.inference.labels(kind).observe(transcript.inference)

    def attach(self, statistics: Callable[[], ServerStatistics]) -> None:
        """Export the server's state, read from ``statistics()`` at each scrape."""
        self.registry.register(_StateCollector(statistics))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    def __init__(self, statistics: Callable[[], ServerStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> list[Metric]:
        return []  # the families below depend on the devices present; describe lazily

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        yield GaugeMetricFamily(
            "stt_sessions_active", "Sessions connected now", value=len(stats.sessions)
        )
        yield GaugeMetricFamily(
            "stt_max_connections", "Current session limit", value=stats.max_connections
        )
        yield GaugeMetricFamily(
            "stt_draining", "1 while the server refuses new sessions", value=int(stats.draining)
        )
        yield CounterMetricFamily(
            "stt_sessions_accepted", "Sessions accepted", value=stats.accepted
        )
        refused = CounterMetricFamily(
            "stt_sessions_refused", "Sessions refused, by reason", labels=["reason"]
        )
        for reason in RefusalReason:
            refused.add_metric([reason.value], stats.refused.get(reason.value, 0))
        yield refused
        yield CounterMetricFamily(
            "stt_sessions_kicked", "Sessions kicked by an operator", value=stats.kicked_total
        )

        queue = GaugeMetricFamily(
            "stt_engine_queue_depth", "Transcriptions waiting", labels=["device", "kind"]
        )
        busy = GaugeMetricFamily("stt_engine_busy", "Transcriptions running", labels=["device"])
        workers = GaugeMetricFamily(
            "stt_engine_workers", "Concurrent transcriptions allowed", labels=["device"]
        )
        batches = CounterMetricFamily(
            "stt_engine_batches",
            "Model calls made (each carries one request or a batch)",
            labels=["device"],
        )
        batched = CounterMetricFamily(
            "stt_engine_batched_requests",
            "Requests carried by those calls (divided by batches: the mean batch size)",
            labels=["device"],
        )
        busy_seconds = CounterMetricFamily(
            "stt_engine_busy_seconds",
            "Worker seconds in model calls, each call once, by what it carried (final; guess: "
            "a final decoded before its endpoint was confirmed; partial; upload)",
            labels=["device", "kind"],
        )
        unused_seconds = CounterMetricFamily(
            "stt_engine_unused_seconds",
            "Of those worker seconds, calls whose every caller had stopped waiting before they "
            "ended (a guess dropped while it ran, as speech resumed): work thrown away, at least",
            labels=["device", "kind"],
        )
        sessions = GaugeMetricFamily(
            "stt_device_sessions", "Sessions placed on a device", labels=["device"]
        )
        breaker = GaugeMetricFamily(
            "stt_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=["device"]
        )
        opened = CounterMetricFamily(
            "stt_breaker_opened", "Times a breaker opened", labels=["device"]
        )
        used = GaugeMetricFamily(
            "stt_gpu_memory_used_bytes", "GPU memory in use", labels=["device"]
        )
        total = GaugeMetricFamily(
            "stt_gpu_memory_total_bytes", "GPU memory in all", labels=["device"]
        )
        util = GaugeMetricFamily(
            "stt_gpu_utilization_percent", "GPU utilization", labels=["device"]
        )
        for device in stats.devices:
            label = [device.label]
            queue.add_metric([device.label, "final"], device.engine.queued_finals)
            queue.add_metric([device.label, "partial"], device.engine.queued_partials)
            queue.add_metric([device.label, "upload"], device.engine.queued_uploads)
            busy.add_metric(label, device.engine.busy)
            workers.add_metric(label, device.engine.workers)
            batches.add_metric(label, device.engine.batches)
            batched.add_metric(label, device.engine.batched_requests)
            for kind in CALL_KINDS:
                seconds = device.engine.busy_seconds.get(kind, 0.0)
                busy_seconds.add_metric([device.label, kind], seconds)
                unused = device.engine.unused_seconds.get(kind, 0.0)
                unused_seconds.add_metric([device.label, kind], unused)
            sessions.add_metric(label, device.sessions)
            if device.breaker is not None:
                breaker.add_metric(label, BREAKER_VALUES[device.breaker.state.value])
                opened.add_metric(label, device.breaker.opened)
            if device.reading is not None:
                used.add_metric(label, device.reading.used_mb * 1024 * 1024)
                total.add_metric(label, device.reading.total_mb * 1024 * 1024)
                if device.reading.utilization is not None:
                    util.add_metric(label, device.reading.utilization)
        yield from (queue, busy, workers, batches, batched, busy_seconds, unused_seconds, sessions)
        yield from (breaker, opened, used, total, util)
