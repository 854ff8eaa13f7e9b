"""The service's own metrics, through ``ray.serve.metrics``.

Ray exports them on each node's metrics port with a ``ray_`` prefix and the replica's deployment,
replica and application as extra tags (``ray_serve_app_request_latency_ms_bucket{route=...}``).
``scripts/observability/`` has the Grafana dashboard and a Prometheus scrape config.

Costs are kept off the per-sequence path: the ingress records one latency per request; a model
replica records per batch item (queue wait) and per forward (everything else).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray.serve import metrics

if TYPE_CHECKING:
    from serve_app.batching.plan import ForwardStats

LATENCY_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000]
RATIO: list[float] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
ROWS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class RefusalReason(enum.Enum):
    """Why a request got a 503 instead of an answer."""

    QUEUE_WAIT = "queue_wait"  # admission control: the expected wait is over max_queue_wait_s
    QUEUE_FULL = "queue_full"  # Serve's max_queued_requests toward a model deployment
    REPLICA_FAILED = "replica_failed"  # a model replica died under the request
    NOT_READY = "not_ready"  # the models did not answer in time


# name (as Prometheus shows it, without Ray's ``ray_`` prefix) -> what it measures; the README and the
# metrics test read this table
METRICS: dict[str, str] = {
    "serve_app_request_latency_ms": "ingress: request latency by route, HTTP status, model and model version",
    "serve_app_refusals_total": "ingress: 503 answers by route and reason (queue_wait, queue_full, ...)",
    "serve_app_queue_wait_ms": "model: time a batch item waited for its batch to start",
    "serve_app_batch_size": "model: real sequences per forward, by bucket",
    "serve_app_padding_efficiency": "model: real / padded tokens of each forward, by bucket",
    "serve_app_forward_latency_ms": "model: the backend's own time per forward, by bucket",
    "serve_app_tokens_total": "model: tokens computed, kind=real|padded (rate() = tokens/s)",
    "serve_app_active_backend": "model: 1 for the backend (and precision) that serves each model version",
}


def _histogram(name: str, boundaries: list[float], tags: tuple[str, ...]) -> metrics.Histogram:
    return metrics.Histogram(name, description=METRICS[name], boundaries=boundaries, tag_keys=tags)  # type: ignore[arg-type]  # Ray annotates tag_keys as tuple[str]


class IngressMetrics:
    def __init__(self) -> None:
        self._latency = _histogram("serve_app_request_latency_ms", LATENCY_MS, ("route", "status", "model", "version"))
        self._refusals = metrics.Counter(
            "serve_app_refusals_total",
            description=METRICS["serve_app_refusals_total"],
            tag_keys=("route", "reason"),  # type: ignore[arg-type]
        )

    def request(self, route: str, status: int, model: str, version: str, seconds: float) -> None:
        tags = {"route": route, "status": str(status), "model": model, "version": version}
        self._latency.observe(seconds * 1e3, tags=tags)

    def refused(self, route: str, reason: RefusalReason) -> None:
        self._refusals.inc(1, tags={"route": route, "reason": reason.value})


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
        self.queue_wait = _histogram("serve_app_queue_wait_ms", LATENCY_MS, ("model", "version"))
        self.batch_size = _histogram("serve_app_batch_size", ROWS, ("model", "version", "bucket"))
        self.padding = _histogram("serve_app_padding_efficiency", RATIO, ("model", "version", "bucket"))
        self.forward_ms = _histogram(
            "serve_app_forward_latency_ms", LATENCY_MS, ("model", "version", "backend", "bucket")
        )
        self.tokens = metrics.Counter(
            "serve_app_tokens_total",
            description=METRICS["serve_app_tokens_total"],
            tag_keys=("model", "version", "kind"),  # type: ignore[arg-type]
        )
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


class ModelObserver:
    """What a ``RequestBatcher`` reports to (``batching.batcher.BatchObserver``), tagged with one model version."""

    def __init__(self, m: ModelMetrics, served: ServedModel) -> None:
        self._m = m
        self._served = served
        self._tags = {"model": served.name, "version": served.version}
        self._real = {**self._tags, "kind": "real"}
        self._padded = {**self._tags, "kind": "padded"}

    def queued(self, wait_s: float) -> None:
        self._m.queue_wait.observe(wait_s * 1e3, tags=self._tags)

    def forward(self, stats: ForwardStats) -> None:
        m, bucket = self._m, {**self._tags, "bucket": str(stats.bucket)}
        m.batch_size.observe(stats.rows, tags=bucket)
        m.padding.observe(stats.real_tokens / max(1, stats.padded_tokens), tags=bucket)
        m.forward_ms.observe(stats.seconds * 1e3, tags={**bucket, "backend": self._served.backend})
        m.tokens.inc(stats.real_tokens, tags=self._real)
        m.tokens.inc(stats.padded_tokens, tags=self._padded)
