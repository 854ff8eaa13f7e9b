"""Metrics: Ray's Prometheus endpoint scraped after real traffic (every metric of ``telemetry.METRICS`` with
values that fit the traffic sent), the dashboard's queries, and the model replica's per-second sums."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import HTTP_PORT, METRICS_PORT
from prometheus_client.parser import text_string_to_metric_families

from serve_app.config import AppConfig, BatchingConfig, ScoreCacheConfig
from serve_app.deployments.telemetry import METRICS

DOCS = ["Click 'forgot password' to reset it.", "The weather is nice today.", "Passwords are changed in settings."]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def heavy(k: int) -> dict[str, object]:
    """A query and 60 documents no other request sends (the score cache has none of them)."""
    return {
        "query": f"reset password {k}",
        "documents": [f"{d} (request {k}, copy {i})" for i in range(20) for d in DOCS],
    }


def scrape() -> Samples:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    return samples


APP = "metrics"  # this test's Serve application: other tests' apps export the same metrics to the same port


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over this test's application and the given labels."""
    want = {"application": APP, **labels}
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in want.items()))


def wait_for(names: list[str], timeout_s: float = 60.0) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape()
        missing = [n for n in names if not any(lab.get("application") == APP for lab, _ in samples.get(n, []))]
        if not missing or time.monotonic() > deadline:
            assert not missing, f"not exported after {timeout_s:.0f} s: {missing}"
            return samples
        time.sleep(1.0)


def test_dashboard_and_scrape_config_name_only_exported_metrics() -> None:
    """The Grafana dashboard queries only metrics this service (or Ray Serve) exports, by the names Prometheus
    shows; a renamed metric fails here instead of as an empty panel."""
    root = Path(__file__).parents[1] / "scripts" / "observability"
    dashboard = json.loads((root / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(ray_[a-z_]+?)(?:_bucket|_count|_sum)?\b(?=[{\[])", e)}
    exported = {f"ray_{n}" for n in METRICS} | {"ray_serve_deployment_replica_healthy"}
    assert used and used <= exported, used - exported
    assert {f"ray_{n}" for n in METRICS} <= used  # every metric has a panel
    scrape = yaml.safe_load((root / "prometheus.yml").read_text())
    assert {j["job_name"] for j in scrape["scrape_configs"]} == {"ray-local", "ray-cluster"}


@pytest.mark.slow
def test_metrics_after_traffic(ray_session: None, app_config: AppConfig) -> None:
    from ray import serve

    from serve_app.api.readiness import wait_ready
    from serve_app.graph import build_app

    # a tiny queue-wait budget so that a burst gets some refusals (refusals_total) besides answers; it covers the
    # queues only, not the wait before the ingress (HAProxy's stamp): at 5 ms a moment's wait there on a busy
    # 2-core machine refused one of the lone requests below (CI, 2026-11-25)
    # the score cache on, as shipped: the light requests below repeat documents (hits); the heavy ones differ
    ranker = app_config.model_for("rerank").model_copy(update={"score_cache": ScoreCacheConfig(max_entries=1000)})
    batching = {**app_config.batching.model_dump(), "max_queue_wait_s": 0.005, "count_wait_before_ingress": False}
    cfg = app_config.with_serving(ranker).model_copy(update={"batching": BatchingConfig(**batching)})
    # an identical second intent version shadowing every classify request (the shadow metrics)
    data = cfg.model_dump(mode="json")
    data["models"].append({**next(m for m in data["models"] if m["task"] == "classify"), "version": "2"})
    data["routes"]["classify"]["shadow"] = {"version": "2", "share": 1.0}
    cfg = AppConfig.model_validate(data)
    serve.run(build_app(cfg), name=APP, route_prefix="/metrics-app", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/metrics-app"
    try:
        wait_ready(url)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/rerank", json={"query": "reset password", "documents": DOCS}).status_code == 200
            assert c.post("/v1/classify", json={"inputs": "what is my balance"}).status_code == 200
            assert c.post("/v1/embeddings", json={"input": DOCS}).status_code == 200
            assert c.post("/v1/rerank", json={"query": 3}).status_code == 422
            for k in range(3):  # admission control learns the ranker's rate (it admits everything until then)
                assert c.post("/v1/rerank", json=heavy(k)).status_code == 200

        async def burst() -> list[tuple[int, str | None]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                rs = await asyncio.gather(*(c.post("/v1/rerank", json=heavy(3 + k)) for k in range(24)))
                return [(r.status_code, r.headers.get("x-overloaded")) for r in rs]

        answers = asyncio.run(burst())
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        # who refused: the ingress, which counts its refusals, or HAProxy once the ingress had refused some
        assert {who for status, who in answers if status == 503} <= {"ingress", "haproxy"}, answers
        ok = 4 + statuses.count(200)

        names = [f"ray_{n}" for n in METRICS]
        samples = wait_for([*(f"{n}_count" if n.endswith("_ms") else n for n in names)])
        # the exporter keeps the last value it got: wait until it has this test's whole burst, from the ingress
        # and from the model replica (which hands its sums to Ray once a second, so they arrive later)
        deadline = time.monotonic() + 30
        while (
            total(samples, "ray_serve_app_request_latency_ms_count", route="/v1/rerank", status="200") < ok
            or total(samples, "ray_serve_app_batch_items_total", model="all-MiniLM-L6-v2") < ok
        ):
            assert time.monotonic() < deadline, "the burst's request latencies or batch items never arrived"
            time.sleep(1.0)
            samples = scrape()
    finally:
        serve.delete(APP)

    lat = "ray_serve_app_request_latency_ms"
    rerank_200 = [
        lab
        for lab, _ in samples[f"{lat}_count"]
        if lab.get("application") == APP and lab["route"] == "/v1/rerank" and lab["status"] == "200"
    ]
    assert rerank_200 and all(lab["model"] == "all-MiniLM-L6-v2" and lab["version"] == "1" for lab in rerank_200)
    assert total(samples, f"{lat}_count", route="/v1/rerank", status="422") >= 1
    assert total(samples, f"{lat}_sum", route="/v1/classify", status="200") > 0
    refused = total(samples, "ray_serve_app_refusals_total", route="/v1/rerank", reason="queue_wait")
    assert refused >= answers.count((503, "ingress"))

    items = total(samples, "ray_serve_app_batch_items_total", model="all-MiniLM-L6-v2")
    assert items >= ok  # one batch item per accepted request (at least)
    assert 0 < total(samples, "ray_serve_app_queue_wait_seconds_total", model="all-MiniLM-L6-v2") < 60 * items
    forwards = total(samples, "ray_serve_app_forwards_total")
    rows = total(samples, "ray_serve_app_forward_rows_total")
    assert forwards >= 1 and rows >= forwards
    assert total(samples, "ray_serve_app_forward_seconds_total", backend="onnxruntime") > 0
    real = total(samples, "ray_serve_app_tokens_total", kind="real")
    padded = total(samples, "ray_serve_app_tokens_total", kind="padded")
    assert 0 < real <= padded and real / padded > 0.2
    lookups = total(samples, "ray_serve_app_score_cache_lookups_total", model="all-MiniLM-L6-v2")
    hits = total(samples, "ray_serve_app_score_cache_hits_total", model="all-MiniLM-L6-v2")
    # the embeddings request repeats the first re-rank's 3 documents; every other sequence was new
    assert hits == 3 and lookups == 4 + 3 + 61 * (3 + statuses.count(200)), (hits, lookups)
    active = [(lab, v) for lab, v in samples["ray_serve_app_active_backend"] if lab.get("application") == APP]
    assert any(v == 1.0 and lab["backend"] == "onnxruntime" for lab, v in active)
    print(
        f"metrics: {forwards:.0f} forwards, {rows / forwards:.1f} rows each, padding efficiency {real / padded:.2f}, "
        f"{real:.0f} real / {padded:.0f} padded tokens, {refused:.0f} refusals, "
        f"score cache {hits:.0f} hits / {lookups:.0f} lookups"
    )


class RecordingCounter:
    """Stands in for a Ray counter (the boundary): remembers every increment."""

    def __init__(self) -> None:
        self.incs: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.incs.append((value, tags))


def test_model_observer_hands_ray_per_second_sums_not_a_call_per_forward() -> None:
    from serve_app.batching.plan import ForwardStats
    from serve_app.deployments.telemetry import ModelMetrics, ServedModel

    m = ModelMetrics()
    for name in ("items", "queue_wait", "forwards", "rows", "forward_seconds", "tokens"):
        setattr(m, name, RecordingCounter())
    obs = m.observer(ServedModel("ranker", "abc123", "onnxruntime", "fp32"))
    for _ in range(50):  # 50 forwards of bucket 32 and 10 of bucket 64, 60 batch items
        obs.forward(ForwardStats(bucket=32, rows=8, real_tokens=200, padded_tokens=256, seconds=0.002))
        obs.queued(0.001)
    for _ in range(10):
        obs.forward(ForwardStats(bucket=64, rows=4, real_tokens=180, padded_tokens=256, seconds=0.004))
        obs.queued(0.003)
    obs.flush()
    assert m.forwards.incs == [  # type: ignore[attr-defined]
        (50, {"model": "ranker", "version": "abc123", "bucket": "32"}),
        (10, {"model": "ranker", "version": "abc123", "bucket": "64"}),
    ]
    assert [v for v, _ in m.rows.incs] == [400, 40]  # type: ignore[attr-defined]
    tokens = {(t["bucket"], t["kind"]): v for v, t in m.tokens.incs}  # type: ignore[attr-defined]
    assert tokens == {("32", "real"): 10_000, ("32", "padded"): 12_800, ("64", "real"): 1_800, ("64", "padded"): 2_560}
    ((seconds, tags), _) = m.forward_seconds.incs  # type: ignore[attr-defined]
    assert seconds == pytest.approx(0.1) and tags["backend"] == "onnxruntime"
    assert m.items.incs == [(60, {"model": "ranker", "version": "abc123"})]  # type: ignore[attr-defined]
    assert m.queue_wait.incs[0][0] == pytest.approx(0.08)  # type: ignore[attr-defined]

    def recorded(*names: str) -> int:
        return sum(len(getattr(m, name).incs) for name in names)

    calls = recorded("items", "queue_wait", "forwards", "rows", "forward_seconds", "tokens")
    assert calls == 12  # for 60 forwards and 60 batch items
    obs.flush()  # nothing new: no calls, no zero increments
    assert recorded("items", "forwards", "tokens") == 1 + 2 + 4
