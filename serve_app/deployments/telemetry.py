"""The service's own metrics, through ``ray.serve.metrics``.

Ray exports them on each node's metrics port with a ``ray_`` prefix and the replica's deployment,
replica and application as extra tags (``ray_serve_app_request_latency_ms_bucket{route=...}``).
``scripts/observability/`` has the Grafana dashboard and a Prometheus scrape config.

The ingress records one latency per request. A model replica adds its figures up in plain Python and
hands the sums to Ray once a second (``ModelObserver.flush``): on an H100 the intent replica's Python,
not the GPU, limits throughput, and a Ray metric call per forward and per batch item measured 5-14 %
slower there (side by side, same machine).
"""

from __future__ import annotations

import enum
import functools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ray.serve import metrics

from serve_app.core.versions import ModelKey

if TYPE_CHECKING:
    from serve_app.batching.plan import ForwardStats

LATENCY_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000]


class RefusalReason(enum.Enum):
    """Why a request got a 503 instead of an answer."""

    QUEUE_WAIT = "queue_wait"  # admission control: the expected wait is over max_queue_wait_s
    STARTED_LATE = "started_late"  # overload: admitted, but not started within overload_start_within_s
    QUEUE_FULL = "queue_full"  # Serve's max_queued_requests toward a model deployment
    REPLICA_FAILED = "replica_failed"  # a model replica died under the request
    NOT_READY = "not_ready"  # the models did not answer in time


# name (as Prometheus shows it, without Ray's ``ray_`` prefix) -> what it measures; the README and the
# metrics test read this table
METRICS: dict[str, str] = {
    "serve_app_request_latency_ms": "ingress: request latency by route, HTTP status, model and model version",
    "serve_app_refusals_total": "ingress: 503 answers by route and reason (queue_wait, queue_full, ...)",
    "serve_app_shadow_comparisons_total": "ingress: requests also scored by a shadow version and compared",
    "serve_app_shadow_agreement_total": "ingress: shadow agreement, summed (/ comparisons = mean)",
    "serve_app_batch_items_total": "model: batch items (a request, or several coalesced) that entered a batch",
    "serve_app_queue_wait_seconds_total": "model: seconds batch items waited for their batch (/ items = mean)",
    "serve_app_forwards_total": "model: forwards run, by bucket",
    "serve_app_forward_rows_total": "model: real sequences computed, by bucket (/ forwards = mean batch size)",
    "serve_app_forward_seconds_total": "model: the backend's own time in forwards, by bucket (/ forwards = mean)",
    "serve_app_tokens_total": "model: tokens computed by bucket, kind=real|padded (real / padded = padding efficiency)",
    "serve_app_score_cache_lookups_total": "model: sequences looked up in the score cache",
    "serve_app_score_cache_hits_total": "model: sequences answered from the score cache (/ lookups = hit rate)",
    "serve_app_active_backend": "model: 1 for the backend (and precision) that serves each model version",
}


class IngressMetrics:
    def __init__(self) -> None:
        self._latency = metrics.Histogram(
            "serve_app_request_latency_ms",
            description=METRICS["serve_app_request_latency_ms"],
            boundaries=LATENCY_MS,
            tag_keys=("route", "status", "model", "version"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self._refusals = metrics.Counter(
            "serve_app_refusals_total",
            description=METRICS["serve_app_refusals_total"],
            tag_keys=("route", "reason"),  # type: ignore[arg-type]
        )
        shadow_tags = ("model", "version", "serving_version")
        self._shadow_compared = metrics.Counter(
            "serve_app_shadow_comparisons_total",
            description=METRICS["serve_app_shadow_comparisons_total"],
            tag_keys=shadow_tags,  # type: ignore[arg-type]
        )
        self._shadow_agreement = metrics.Counter(
            "serve_app_shadow_agreement_total",
            description=METRICS["serve_app_shadow_agreement_total"],
            tag_keys=shadow_tags,  # type: ignore[arg-type]
        )

    def request(self, route: str, status: int, model: str, version: str, seconds: float) -> None:
        tags = {"route": route, "status": str(status), "model": model, "version": version}
        self._latency.observe(seconds * 1e3, tags=tags)

    def refused(self, route: str, reason: RefusalReason) -> None:
        self._refusals.inc(1, tags={"route": route, "reason": reason.value})

    def shadow(self, serving: ModelKey, shadow: ModelKey, agreement: float) -> None:
        tags = {"model": shadow.name, "version": shadow.version, "serving_version": serving.version}
        self._shadow_compared.inc(1, tags=tags)
        self._shadow_agreement.inc(agreement, tags=tags)


@dataclass(frozen=True)
class ServedModel:
    """The tags every model metric carries."""

    name: str
    version: str
    backend: str
    precision: str


@functools.cache
def model_metrics() -> ModelMetrics:
    """One set per process (the ingress placement runs both models in one)."""
    return ModelMetrics()


@functools.cache
def ingress_metrics() -> IngressMetrics:
    return IngressMetrics()


class ModelMetrics:
    """``observer`` binds them to the model version being served."""

    def __init__(self) -> None:
        def counter(name: str, tags: tuple[str, ...]) -> metrics.Counter:
            return metrics.Counter(name, description=METRICS[name], tag_keys=tags)  # type: ignore[arg-type]

        self.items = counter("serve_app_batch_items_total", ("model", "version"))
        self.queue_wait = counter("serve_app_queue_wait_seconds_total", ("model", "version"))
        self.forwards = counter("serve_app_forwards_total", ("model", "version", "bucket"))
        self.rows = counter("serve_app_forward_rows_total", ("model", "version", "bucket"))
        self.forward_seconds = counter("serve_app_forward_seconds_total", ("model", "version", "backend", "bucket"))
        self.tokens = counter("serve_app_tokens_total", ("model", "version", "bucket", "kind"))
        self.cache_lookups = counter("serve_app_score_cache_lookups_total", ("model", "version"))
        self.cache_hits = counter("serve_app_score_cache_hits_total", ("model", "version"))
        self.active_backend = metrics.Gauge(
            "serve_app_active_backend",
            description=METRICS["serve_app_active_backend"],
            tag_keys=("model", "version", "backend", "precision"),  # type: ignore[arg-type]
        )

    def observer(self, served: ServedModel) -> ModelObserver:
        return ModelObserver(self, served)

    def set_active(self, served: ServedModel, active: bool) -> None:
        tags = {"model": served.name, "version": served.version, "backend": served.backend}
        self.active_backend.set(1 if active else 0, tags={**tags, "precision": served.precision})


@dataclass
class _BucketSums:
    forwards: int = 0
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Sums:
    items: int = 0
    wait_s: float = 0.0
    cache_lookups: int = 0
    cache_hits: int = 0
    buckets: dict[int, _BucketSums] = field(default_factory=dict)


class ModelObserver:
    """What a ``RequestBatcher`` reports to (``batching.batcher.BatchObserver``), for one model version.

    ``queued`` runs on the event loop and ``forward`` on the worker thread; both only add to sums under a
    lock, and ``flush`` (once a second, from ``EncoderServer``) turns the sums into a few counter calls.
    """

    def __init__(self, m: ModelMetrics, served: ServedModel) -> None:
        self._m = m
        self._served = served
        self._lock = threading.Lock()
        self._sums = _Sums()

    def queued(self, wait_s: float) -> None:
        with self._lock:
            self._sums.items += 1
            self._sums.wait_s += wait_s

    def cached(self, lookups: int, hits: int) -> None:
        with self._lock:
            self._sums.cache_lookups += lookups
            self._sums.cache_hits += hits

    def forward(self, stats: ForwardStats) -> None:
        with self._lock:
            b = self._sums.buckets.get(stats.bucket)
            if b is None:
                b = self._sums.buckets[stats.bucket] = _BucketSums()
            b.forwards += 1
            b.rows += stats.rows
            b.real_tokens += stats.real_tokens
            b.padded_tokens += stats.padded_tokens
            b.seconds += stats.seconds

    def flush(self) -> None:
        with self._lock:
            sums, self._sums = self._sums, _Sums()
        m, tags = self._m, {"model": self._served.name, "version": self._served.version}
        if sums.items:
            m.items.inc(sums.items, tags=tags)
            if sums.wait_s > 0:
                m.queue_wait.inc(sums.wait_s, tags=tags)
        if sums.cache_lookups:
            m.cache_lookups.inc(sums.cache_lookups, tags=tags)
            if sums.cache_hits:
                m.cache_hits.inc(sums.cache_hits, tags=tags)
        for bucket, b in sums.buckets.items():
            by_bucket = {**tags, "bucket": str(bucket)}
            m.forwards.inc(b.forwards, tags=by_bucket)
            m.rows.inc(b.rows, tags=by_bucket)
            if b.seconds > 0:
                m.forward_seconds.inc(b.seconds, tags={**by_bucket, "backend": self._served.backend})
            m.tokens.inc(b.real_tokens, tags={**by_bucket, "kind": "real"})
            m.tokens.inc(b.padded_tokens, tags={**by_bucket, "kind": "padded"})
