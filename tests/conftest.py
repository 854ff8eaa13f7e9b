"""Shared fixtures: one real Ray + Serve for the whole session, and the evaluation data from shared/data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.api.readiness import wait_ready
from serve_app.config import AppConfig, ScoreCacheConfig, load_config
from serve_app.evaluation.data import data_root

HTTP_PORT = int(os.environ.get("SERVE_APP_TEST_PORT", "8123"))
METRICS_PORT = HTTP_PORT + 3  # Ray's Prometheus endpoint for this node (HAProxy's two ports sit between)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that need no session cluster run first: once ``ray_session`` starts, its idle processes share
    CI's 2 cores with every later test (back-to-back clean-clone runs on 2 cores: 15:02 before, 14:01 after).
    ``gpu`` tests run only where a CUDA device is visible (the device machine)."""

    def module(item: pytest.Item) -> object:
        return getattr(item, "module", None)

    on_cluster = {module(item) for item in items if "ray_session" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: module(item) in on_cluster)  # stable: file order within each group

    from serve_app.backends.select import cuda_device_count

    if cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not root.exists():
        pytest.skip(f"evaluation data not found at {root} (set SERVE_APP_DATA)")
    return root


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Artifacts built once per session (ONNX graphs, engines), outside the checkout."""
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def app_config(artifacts_dir: Path) -> AppConfig:
    """The packaged default without the ranker's score cache: load, deadline and drain tests send one heavy
    request again and again to keep a replica busy, which a cache would answer at once. The cache's own
    tests (test_ranking.py, test_metrics.py) turn it on."""
    cfg = load_config()
    ranker = cfg.model_for("rerank").model_copy(update={"score_cache": ScoreCacheConfig(max_entries=0)})
    return cfg.with_serving(ranker).model_copy(update={"artifacts_dir": str(artifacts_dir)})


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray
    from ray import serve

    # a loaded 2-core machine can take longer than Serve's 5 s to start the HTTP proxy
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    # an ingress replica behind HAProxy stays reachable 30 s after it is told to stop (so load balancers can
    # deregister it): every app a test deletes waited that long. One HAProxy on loopback needs seconds
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "3")
    from serve_app.deployments.ray_runtime import apply_ray_env

    apply_ray_env(load_config().ray_serve)  # Ray Serve's throughput mode and HAProxy, as `serve run` gets them
    # HAProxy's own metrics and stats ports are fixed (9101, 8404): beside the test port instead, so the tests
    # run while a `serve run` of the same machine holds those
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(HTTP_PORT + 1))
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(HTTP_PORT + 2))
    # 2-core CI: logical CPUs let the four deployments schedule; fractions in the config keep them light
    # metrics: a known export port, reported every second instead of every 10 s (tests/test_metrics.py)
    ray.init(
        num_cpus=8,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session: None, app_config: AppConfig) -> str:
    """The real default graph, served over HTTP on loopback."""
    from ray import serve

    from serve_app.graph import build_app

    serve.run(build_app(app_config), name="default", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}"
    wait_ready(url)
    return url


@pytest.fixture(scope="session")
def reference_model():  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 run by sentence-transformers (PyTorch): what the service's numbers must equal."""
    from sentence_transformers import SentenceTransformer

    from serve_app.models.artifacts import builtin_model_dir

    model = SentenceTransformer(str(builtin_model_dir()), device="cpu")
    assert model.max_seq_length == 256
    return model


@pytest.fixture()
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=120) as c:
        yield c


@pytest.fixture()
def outside_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """``@serve.batch`` asks the replica context for ``max_ongoing_requests`` (for a warning), and a model's
    report names its replica; a unit test runs the real batching without a replica, so this answers for Serve
    at that boundary."""
    from types import SimpleNamespace

    import ray.serve.batching

    context = SimpleNamespace(
        _deployment_config=SimpleNamespace(max_ongoing_requests=10_000),
        replica_id=SimpleNamespace(unique_id="unit-test"),
    )
    monkeypatch.setattr(ray.serve.batching.serve, "get_replica_context", lambda: context)
