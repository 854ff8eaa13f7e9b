"""Model rollout on a real Ray Serve app over HTTP (CPU, model deployments of their own), under bounded
loopback load: v1 -> v2 -> v1 with no failed request, a broken v2 refused while v1 answers, a 90/10 canary
over 1,000 callers, and shadow agreement on an identical copy and on a different model."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from conftest import HTTP_PORT
from loadgen import Load, closed_loop
from polling import wait_until

from serve_app.config import AppConfig, DeploymentScaling
from serve_app.rollout import commands

pytestmark = pytest.mark.slow
APP, PREFIX = "rollout", "/rollout"
URL = f"http://127.0.0.1:{HTTP_PORT}{PREFIX}"
RANKER, INTENT = "all-MiniLM-L6-v2", "minilm-clinc150-intent"
RERANK = {
    "query": "does vitamin d reduce respiratory infections",
    "documents": ["Vitamin D supplementation reduced acute respiratory infections.", "Sunny today.", "Pasta."],
}


def _with(cfg: AppConfig, *models: dict[str, Any], root: Path | None = None) -> AppConfig:
    """``cfg`` with more registered versions (whose sources may lie under ``root``)."""
    data = cfg.model_dump(mode="json")
    data["models"] += list(models)
    if root is not None:
        data["model_roots"] = [*data["model_roots"], str(root)]
    return AppConfig.model_validate(data)


def _deploy(cfg: AppConfig) -> None:
    from ray import serve

    from serve_app.graph import build_app

    light = DeploymentScaling(num_cpus=0.25, max_ongoing_requests=256, max_queued_requests=512)
    scaling = {"ingress": light, "ranker": DeploymentScaling(num_cpus=0.5), "intent": DeploymentScaling(num_cpus=0.5)}
    batching = cfg.batching.model_copy(update={"max_queue_wait_s": 0.0})  # every request answered, none refused
    full = cfg.model_copy(update={"scaling": scaling, "batching": batching, "model_placement": "deployments"})
    serve.run(build_app(full), name=APP, route_prefix=PREFIX, blocking=False)


def _versions(task: str) -> dict[str, dict[str, Any]]:
    models = httpx.get(f"{URL}/v1/models", timeout=30).json()["models"]
    return {m["version"]: m for m in models if m["task"] == task}


def _switched(task: str, serving: str) -> bool:
    """The switch is complete: the model replicas serve the new version, the ingress routes to it."""
    from ray import serve

    status = serve.status().applications[APP]
    if str(status.status.value if hasattr(status.status, "value") else status.status) != "RUNNING":
        return False
    v = _versions(task).get(serving)
    return v is not None and v["state"] == "ready" and v["role"] == "serving"


async def _load_while(during: Any, callers: int = 4) -> Load:
    return await closed_loop(URL, "/v1/rerank", RERANK, callers, during)


def _ranker_versions(load: Load) -> Counter[str | None]:
    return Counter(a.model_version for a in load.answers)


@pytest.fixture(scope="module")
def v1(ray_session: None, app_config: AppConfig) -> Iterator[AppConfig]:
    _deploy(app_config)
    from serve_app.api.readiness import wait_ready

    wait_ready(URL)
    yield app_config
    from ray import serve

    serve.delete(APP)


def test_v1_v2_v1_under_load_fails_nothing(v1: AppConfig) -> None:
    serving = v1.model_for("rerank").model_dump(mode="json")
    both = _with(v1, {**serving, "version": "2"})  # the same weights under a new label: a real load + warm-up
    to_v2 = commands.promote(commands.canary(both, "rerank", "2", 100), "rerank")
    back = commands.rollback(to_v2, "rerank")
    timeline: dict[str, float] = {}

    async def switches() -> None:
        await asyncio.sleep(1)
        for name, cfg, version in (("v2", to_v2, "2"), ("v1", back, "1")):
            timeline[f"{name}_deploy"] = time.monotonic()
            await asyncio.to_thread(_deploy, cfg)
            switched = functools.partial(_switched, "rerank", version)
            await asyncio.to_thread(wait_until, switched, 180, f"serving {version}")
            await asyncio.sleep(1.5)  # a redirect learnt while the replica loaded lapses (router.redirect_s)
            timeline[f"{name}_done"] = time.monotonic()
            await asyncio.sleep(3)

    load = asyncio.run(_load_while(switches))
    print(f"v1 -> v2 -> v1: {load.summary()}; versions {dict(_ranker_versions(load))}")
    assert load.failed() == {}, load.summary()
    assert len(load.answers) >= 100
    assert all(a.model_version in (f"{RANKER}/1", f"{RANKER}/2") for a in load.answers)  # exactly one version each
    for name, version, until in (("v2", "2", timeline["v1_deploy"]), ("v1", "1", float("inf"))):
        done = timeline[f"{name}_done"]
        settled = [a for a in load.answers if done <= a.sent_at and a.sent_at + a.seconds < until]
        assert settled and {a.model_version for a in settled} == {f"{RANKER}/{version}"}, (name, Counter(
            a.model_version for a in settled))  # fmt: skip


def test_a_broken_v2_is_refused_while_v1_answers(v1: AppConfig, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("models")
    bad = root / "not-a-model"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"this is not an ONNX graph" * 100)
    from serve_app.models.artifacts import resolve

    (bad / "tokenizer.json").write_bytes(resolve(v1.model_for("rerank"), v1.artifacts_dir).tokenizer_path.read_bytes())
    serving = v1.model_for("rerank").model_dump(mode="json")
    broken = _with(v1, {**serving, "version": "2", "source": str(bad / "model.onnx")}, root=root)
    to_broken = commands.promote(commands.canary(broken, "rerank", "2", 100), "rerank")

    async def switch() -> None:
        await asyncio.sleep(1)
        await asyncio.to_thread(_deploy, to_broken)
        await asyncio.to_thread(
            wait_until, lambda: _versions("rerank").get("2", {}).get("state") == "failed", 180, "v2 refused"
        )
        await asyncio.sleep(3)

    try:
        load = asyncio.run(_load_while(switch))
        report = _versions("rerank")
    finally:
        _deploy(v1)
        wait_until(lambda: _switched("rerank", "1"), 180, "back on v1")
    print(f"broken v2: {load.summary()}; versions {dict(_ranker_versions(load))}; v2 error: {report['2']['error']}")
    assert load.failed() == {}, load.summary()
    assert set(_ranker_versions(load)) == {f"{RANKER}/1"}
    assert report["2"]["role"] == "serving" and report["2"]["state"] == "failed"
    assert report["1"]["state"] == "ready"


def _calls_over(transport: str) -> bool:
    """The ingress calls the models over ``transport`` (``ingress.model_calls`` in ``/v1/models``)."""
    return bool(httpx.get(f"{URL}/v1/models", timeout=30).json()["models"][0]["ingress"]["model_calls"] == transport)


def test_a_new_transport_between_deployments_takes_over_under_load(v1: AppConfig) -> None:
    """``ray_serve.grpc_between_deployments`` changed by a redeploy: the ingress's next calls go over Ray actor
    calls, then back over gRPC, with no restart and no failed request."""
    assert _calls_over("grpc")
    data = v1.model_dump(mode="json")
    data["ray_serve"]["grpc_between_deployments"] = False
    actor = AppConfig.model_validate(data)
    seen: list[str] = []

    async def switches() -> None:
        for cfg, transport in ((actor, "actor"), (v1, "grpc")):
            await asyncio.sleep(1.5)
            await asyncio.to_thread(_deploy, cfg)
            calls_over = functools.partial(_calls_over, transport)
            await asyncio.to_thread(wait_until, calls_over, 60, transport)
            seen.append(transport)

    try:
        load = asyncio.run(_load_while(switches))
    finally:
        _deploy(v1)
    print(f"grpc -> actor -> grpc: {load.summary()}")
    assert seen == ["actor", "grpc"]
    assert load.failed() == {}, load.summary()
    assert len(load.answers) >= 20 and all(a.model_version == f"{RANKER}/1" for a in load.answers)


def _intent_variant(v1: AppConfig, root: Path) -> str:
    """A different intent model: the shipped one with noise on its classification head (an .onnx source)."""
    from serve_app.models.artifacts import resolve

    art = resolve(v1.model_for("classify"), v1.artifacts_dir)
    model = onnx.load(str(art.onnx_path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.ndim == 2 and 151 in w.shape:  # the head: 384 x 151
            init.CopyFrom(onnx.numpy_helper.from_array((w + rng.normal(0, 2 * w.std(), w.shape)).astype(w.dtype),
                                                       init.name))  # fmt: skip
    out = root / "intent-noisy"
    out.mkdir()
    onnx.save(model, str(out / "model.onnx"))
    for f in ("tokenizer.json", "labels.json"):
        (out / f).write_bytes((art.directory / f).read_bytes())
    return str(out / "model.onnx")


def test_canary_90_10_and_shadow_agreement(v1: AppConfig, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("models")
    serving = v1.model_for("classify").model_dump(mode="json")
    noisy = {**serving, "version": "3", "source": _intent_variant(v1, root)}
    registry = _with(v1, {**serving, "version": "2"}, noisy, root=root)
    canary = commands.shadow(commands.canary(registry, "classify", "2", 10), "classify", "2", 1.0)
    _deploy(canary)
    wait_until(lambda: all(_versions("classify").get(v, {}).get("state") == "ready" for v in "123"), 240, "3 ready")

    async def send(callers: list[str]) -> list[str]:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=URL, timeout=60) as client:

            async def one(i: int, caller: str) -> str:
                async with sem:
                    body = {"inputs": [f"what is my balance, request {i}", "transfer money to savings"]}
                    r = await client.post("/v1/classify", json=body, headers={"X-Caller-Id": caller})
                    assert r.status_code == 200, r.text
                    return r.headers["x-model-version"]

            return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(callers))))

    callers = [f"caller-{i}" for i in range(1000)]
    first = asyncio.run(send(callers))
    share = 100 * sum(v == f"{INTENT}/2" for v in first) / len(first)
    again = asyncio.run(send(callers[:200]))
    report = _versions("classify")
    print(f"canary 90/10 over 1,000 callers: {share:.1f} % on v2; shadow v2: {report['2'].get('shadow')}")
    assert set(first) == {f"{INTENT}/1", f"{INTENT}/2"}
    assert abs(share - 10) <= 3
    assert again == first[:200]  # the same caller key always gets the same version
    # identical copy shadowing every request of v1 (the canary's requests are v2's own: not shadowed)
    wait_until(lambda: (_versions("classify")["2"].get("shadow") or {}).get("compared", 0) >= 800, 60, "compared")
    shadow = _versions("classify")["2"]["shadow"]
    assert shadow["mean_agreement"] == 1.0 and shadow["lowest_agreement"] == 1.0

    different = commands.shadow(commands.rollback(canary, "classify"), "classify", "3", 1.0)
    _deploy(different)
    wait_until(lambda: _versions("classify").get("3", {}).get("role") == "shadow", 120, "v3 shadows")
    asyncio.run(send([f"other-{i}" for i in range(200)]))
    wait_until(lambda: (_versions("classify")["3"].get("shadow") or {}).get("compared", 0) >= 150, 60, "compared")
    noisy = _versions("classify")["3"]["shadow"]
    print(f"shadow of a different model (noisy head): {noisy}")
    assert noisy["mean_agreement"] < 0.95
