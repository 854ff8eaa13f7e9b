"""Model rollout without a cluster: the registry's validation, version routing (canary weights, stickiness,
shadow sampling, redirects), agreement measures, the rollout steps, the probe gate on a real backend, and
a real in-process ingress serving two versions side by side (one refused by its gate)."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, BackendConfig, GateThresholds, RouteConfig, load_config
from serve_app.core.backend import GateFailed
from serve_app.core.versions import ModelKey
from serve_app.rollout import commands
from serve_app.rollout.agreement import AgreementStats, rank_agreement, top1_agreement
from serve_app.rollout.router import VersionRouter, caller_point


def _two_versions(base: AppConfig | None = None, task: str = "classify", **v2: Any) -> AppConfig:
    """``base`` with a second version "2" of ``task``'s serving model (the same source unless given)."""
    cfg = base or load_config()
    serving = cfg.model_for(task)  # type: ignore[arg-type]
    data = cfg.model_dump(mode="json")
    data["models"].append({**serving.model_dump(mode="json"), "version": "2", **v2})
    return AppConfig.model_validate(data)


# -- the registry -----------------------------------------------------------------------------------------


def test_routes_must_name_registered_versions_of_their_task() -> None:
    data = _two_versions().model_dump(mode="json")
    ok = AppConfig.model_validate({**data, "routes": {**data["routes"], "classify": {**data["routes"]["classify"],
                                   "canary": {"version": 2, "weight": 10}}}})  # fmt: skip
    assert ok.routes.classify.canary is not None and ok.routes.classify.canary.version == "2"  # YAML ints: labels
    assert ok.routes.classify.weights() == {"1": 90.0, "2": 10.0}
    with pytest.raises(ValidationError, match="minilm-clinc150-intent/3 is not in models"):
        AppConfig.model_validate({**data, "routes": {**data["routes"], "classify": {**data["routes"]["classify"],
                                  "shadow": {"version": "3"}}}})  # fmt: skip
    with pytest.raises(ValidationError, match="is a classify model"):
        AppConfig.model_validate({**data, "routes": {**data["routes"], "rerank": data["routes"]["classify"]}})
    with pytest.raises(ValidationError, match="listed twice"):
        AppConfig.model_validate({**data, "models": [*data["models"], data["models"][0]]})
    with pytest.raises(ValidationError):
        RouteConfig.model_validate({"model": "m", "version": "1", "canary": {"version": "2", "weight": 101}})


def test_each_model_deployment_gets_every_version_of_its_task_serving_first() -> None:
    cfg = _two_versions()
    cfg = commands.canary(cfg, "classify", "2", 10)
    served = cfg.task_serving("classify")
    assert [v.model.key for v in served.versions] == [
        ModelKey("minilm-clinc150-intent", "1"), ModelKey("minilm-clinc150-intent", "2")
    ]  # fmt: skip
    assert served.serving == ModelKey("minilm-clinc150-intent", "1")
    assert [v.model.task for v in cfg.task_serving("rerank").versions] == ["rerank"]


# -- routing ----------------------------------------------------------------------------------------------


def _route(weight: float, shadow: float | None = None) -> RouteConfig:
    route: dict[str, Any] = {"model": "m", "version": "1", "canary": {"version": "2", "weight": weight}}
    if shadow is not None:
        route["shadow"] = {"version": "3", "share": shadow}
    return RouteConfig.model_validate(route)


@pytest.mark.parametrize("weight", [0, 5, 10, 50, 100])
def test_canary_share_follows_the_weight_for_distinct_callers(weight: float) -> None:
    router = VersionRouter(_route(weight), random.Random(0))
    got = Counter(router.choose(f"caller-{i}").model.version for i in range(20_000))
    assert abs(100 * got["2"] / 20_000 - weight) <= 1.0, got
    anonymous = Counter(router.choose(None).model.version for _ in range(20_000))
    assert abs(100 * anonymous["2"] / 20_000 - weight) <= 1.0, anonymous


def test_a_caller_keeps_its_version_and_every_replica_agrees() -> None:
    callers = [f"user-{i}" for i in range(500)]
    a, b = VersionRouter(_route(30), random.Random(1)), VersionRouter(_route(30), random.Random(2))
    first = {c: a.choose(c).model for c in callers}
    assert all(a.choose(c).model == first[c] for c in callers for _ in range(3))
    assert all(b.choose(c).model == first[c] for c in callers)  # another ingress replica: no shared state
    # raising the weight only moves callers to the canary, never back (the point is fixed per canary)
    c = VersionRouter(_route(60), random.Random(3))
    assert all(c.choose(k).model.version == "2" for k, v in first.items() if v.version == "2")
    assert 0 <= caller_point("m", "2", "x") < 100


def test_shadow_is_sampled_at_its_share_and_never_shadows_itself() -> None:
    router = VersionRouter(_route(0, shadow=0.25), random.Random(4))
    shadows = sum(router.choose(None).shadow is not None for _ in range(10_000))
    assert 2_200 <= shadows <= 2_800
    full = VersionRouter(_route(0, shadow=1.0))
    assert all(full.choose(None).shadow == ModelKey("m", "3") for _ in range(100))
    on_canary = VersionRouter(RouteConfig.model_validate(
        {"model": "m", "version": "1", "canary": {"version": "3", "weight": 100}, "shadow": {"version": "3"}}
    ))  # fmt: skip
    assert on_canary.choose(None) == on_canary.choose("x") and on_canary.choose(None).shadow is None


def test_a_version_a_replica_did_not_serve_is_redirected_for_a_while() -> None:
    router = VersionRouter(_route(100), random.Random(5))
    v1, v2 = ModelKey("m", "1"), ModelKey("m", "2")
    assert router.choose(None).model == v2
    assert router.instead_of(v2, ready=(v1,), known={v1, v2}) == v1
    assert router.choose(None).model == v1  # no second round trip to learn the same
    router.redirect_s = 0.0
    router.instead_of(v2, ready=(v1,), known={v1, v2})
    assert router.choose(None).model == v2  # asked again once the redirect lapsed
    assert router.instead_of(v2, ready=(ModelKey("m", "9"),), known={v1, v2}) is None  # nothing both sides know


# -- agreement --------------------------------------------------------------------------------------------


def test_rank_and_top1_agreement() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3])
    assert rank_agreement(scores, scores * 2 + 1) == pytest.approx(1.0)  # same order, other scale
    assert rank_agreement(scores, -scores) == pytest.approx(-1.0)
    assert rank_agreement(np.array([0.5]), np.array([0.1])) == 1.0
    assert rank_agreement(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 1.0
    assert 0 < rank_agreement(scores, np.array([0.9, 0.1, 0.3, 0.5])) < 1
    assert top1_agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    stats = AgreementStats()
    for v in (1.0, 0.5):
        stats.add(v)
    assert stats.as_dict() == {"compared": 2, "mean_agreement": 0.75, "lowest_agreement": 0.5, "skipped": 0}


# -- rollout steps ----------------------------------------------------------------------------------------


def test_canary_promote_rollback_round_trip() -> None:
    v1 = _two_versions(task="rerank")
    step = commands.canary(v1, "rerank", "2", 5)
    assert step.routes.rerank.weights() == {"1": 95.0, "2": 5.0}
    assert commands.rollback(step, "rerank").routes.rerank == v1.routes.rerank  # abort: the canary goes
    done = commands.promote(commands.canary(step, "rerank", "2", 100), "rerank")
    assert (done.routes.rerank.version, done.routes.rerank.previous, done.routes.rerank.canary) == ("2", "1", None)
    back = commands.rollback(done, "rerank")
    assert (back.routes.rerank.version, back.routes.rerank.previous) == ("1", "2")
    with pytest.raises(commands.RolloutError, match="not registered"):
        commands.canary(v1, "rerank", "7", 5)
    with pytest.raises(commands.RolloutError, match="no canary"):
        commands.promote(v1, "rerank")
    with pytest.raises(commands.RolloutError, match="no canary and no previous"):
        commands.rollback(v1, "rerank")
    assert commands.shadow(v1, "rerank", "2", 0.5).routes.rerank.shadow.share == 0.5  # type: ignore[union-attr]


def test_the_rollout_command_writes_config_and_serve_file(tmp_path: Path) -> None:
    import yaml

    from serve_app.rollout.__main__ import main

    path = tmp_path / "app.yaml"
    cfg = _two_versions().model_copy(update={"model_placement": "deployments"})
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["canary", "--config", str(path), "--task", "classify", "--version", "2", "--weight", "10"]) == 0
    assert load_config(path).routes.classify.weights() == {"1": 90.0, "2": 10.0}
    deploy = yaml.safe_load(path.with_suffix(".serve.yaml").read_text())
    (intent,) = [d for d in deploy["applications"][0]["deployments"] if d["name"] == "Intent"]
    assert [v["model"]["version"] for v in intent["user_config"]["versions"]] == ["1", "2"]
    assert main(["rollback", "--config", str(path), "--task", "classify"]) == 0
    assert load_config(path).routes.classify.canary is None
    assert main(["promote", "--config", str(path), "--task", "classify"]) == 2  # nothing to promote: refused


# -- the probe gate, on a real backend --------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[AppConfig, Path]:
    """A second ranker checkpoint (the packaged weights, slightly changed: its own version digest), its
    artifacts built and its probe reference recorded."""
    from safetensors.numpy import load_file, save_file

    from serve_app.engine.probe_check import probe_reference
    from serve_app.models.artifacts import builtin_model_dir, resolve

    root = tmp_path_factory.mktemp("models")
    src, dst = builtin_model_dir(), root / "ranker-v2"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino", "*.bin", "*.h5", "*.ot"))
    weights = load_file(str(dst / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, w in weights.items():
        if name.endswith("intermediate.dense.weight"):
            weights[name] = (w + rng.normal(0, 0.02, w.shape)).astype(w.dtype)
    save_file(weights, str(dst / "model.safetensors"))
    artifacts = tmp_path_factory.mktemp("engines")
    # ONNX Runtime pinned: the replaced graph below is what it runs (torch on a GPU builds from the weights)
    base = load_config().model_copy(
        update={
            "artifacts_dir": str(artifacts),
            "model_roots": (str(root),),
            "backend": BackendConfig(kind="onnxruntime"),
        }
    )
    cfg = _two_versions(base, task="rerank", source=str(dst), score_cache={"max_entries": 0})
    v2 = cfg.find(ModelKey("all-MiniLM-L6-v2", "2"))
    assert v2 is not None
    art = resolve(v2, artifacts)
    probe_reference(art, artifacts, 256)
    return cfg, art.onnx_path


def test_the_gate_passes_a_faithful_backend_and_refuses_a_replaced_graph(built_v2: tuple[AppConfig, Path]) -> None:
    from serve_app.backends.onnxruntime import OnnxRuntimeBackend
    from serve_app.engine.probe_check import check_backend, probe_reference
    from serve_app.models.artifacts import resolve

    cfg, v2_onnx = built_v2
    v1 = resolve(cfg.model_for("rerank"), cfg.artifacts_dir)
    art = resolve(cfg.find(ModelKey("all-MiniLM-L6-v2", "2")), cfg.artifacts_dir)  # type: ignore[arg-type]
    ref = probe_reference(art, cfg.artifacts_dir, 256)
    assert len(ref.sequences) == 11 and max(ref.sequences.lengths()) == 256  # every bucket, the longest cut
    b = cfg.batching
    fp32 = GateThresholds(min_cosine=0.99999, max_metric_drop_pt=0.1)
    check = check_backend(OnnxRuntimeBackend(v2_onnx, 1), ref, fp32, b.buckets, b.batch_slots)
    assert check.passed and check.min_cosine >= 0.99999 and check.max_abs_diff < 1e-4
    with pytest.raises(GateFailed, match="does not reproduce"):  # v1's graph where v2's should be
        check_backend(OnnxRuntimeBackend(v1.onnx_path, 1), ref, fp32, b.buckets, b.batch_slots)


@pytest.mark.usefixtures("outside_replica")
def test_two_versions_side_by_side_and_a_gate_refusal_in_a_real_ingress(built_v2: tuple[AppConfig, Path]) -> None:
    """The real in-process models: v2 as a 50 % canary answers its share with its own scores; then v2's graph
    is replaced on disk (it no longer matches its probe reference): the reloaded v2 is refused, v1 answers all."""
    from test_ingress import acall

    from serve_app.deployments.ingress import Ingress
    from serve_app.models.artifacts import resolve

    cfg, v2_onnx = built_v2
    v1_onnx = resolve(cfg.model_for("rerank"), cfg.artifacts_dir).onnx_path
    canary = commands.canary(cfg, "rerank", "2", 50)
    body = {"query": "how do I reset my password", "documents": ["Open Settings, choose Reset.", "Sunny today."]}

    async def scenario() -> dict[str, Any]:
        ing = Ingress()
        await ing.reconfigure(canary.model_dump(mode="json"))
        answers: dict[str, set[tuple[float, ...]]] = {}
        for i in range(60):
            status, headers, out = await acall(ing, "POST", "/v1/rerank", body, {"X-Caller-Id": f"c{i}"})
            assert status == 200, out
            scores = tuple(round(r["relevance_score"], 6) for r in sorted(out["results"], key=lambda r: r["index"]))
            answers.setdefault(headers["x-model-version"], set()).add(scores)
        shutil.copyfile(v1_onnx, v2_onnx)  # v1's graph where v2's should be: a damaged artifact
        fresh = Ingress()  # a replica starting now, with every request sent to v2
        await fresh.reconfigure(commands.canary(canary, "rerank", "2", 100).model_dump(mode="json"))
        after: Counter[str] = Counter()
        for i in range(20):
            status, headers, out = await acall(fresh, "POST", "/v1/rerank", body, {"X-Caller-Id": f"c{i}"})
            assert status == 200, out
            after[headers["x-model-version"]] += 1
        _, _, models = await acall(fresh, "GET", "/v1/models")
        return {"answers": answers, "after": after, "models": models["models"]}

    out = asyncio.run(scenario())
    answers = out["answers"]
    assert set(answers) == {"all-MiniLM-L6-v2/1", "all-MiniLM-L6-v2/2"}
    assert all(len(s) == 1 for s in answers.values())  # each version always gives its own scores
    assert answers["all-MiniLM-L6-v2/1"] != answers["all-MiniLM-L6-v2/2"]
    assert out["after"] == {"all-MiniLM-L6-v2/1": 20}  # the refused v2 takes nothing, nothing fails
    v2 = next(m for m in out["models"] if m["version"] == "2" and m["task"] == "rerank")
    assert v2["state"] == "failed" and "GateFailed" in v2["error"] and v2["traffic_share"] == 100.0
    v1 = next(m for m in out["models"] if m["version"] == "1" and m["task"] == "rerank")
    assert v1["state"] == "ready" and v1["gate"]["passed"] and v1["answered"] >= 20


def test_the_ingress_sends_a_request_to_a_version_the_replica_serves() -> None:
    """At the actor boundary (a fake handle): a replica still loading v2 answers ``VersionNotReady``; the request
    is answered by v1, and a replica that serves nothing the ingress knows gives a 503, never a 500."""
    from test_ingress import FakeHandle, call, top_labels

    from serve_app.core.backend import VersionNotReady
    from serve_app.deployments.encoder import Ranked
    from serve_app.deployments.ingress import Ingress

    v1, v2 = ModelKey("all-MiniLM-L6-v2", "1"), ModelKey("all-MiniLM-L6-v2", "2")
    serves = {v1}

    def score_many(calls: list[Any]) -> list[Any]:
        return [
            Ranked(np.zeros(len(c.seqs) - 1, np.float32), c.model.version)
            if c.model in serves
            else VersionNotReady(c.model, tuple(serves))
            for c in calls
        ]

    ranker = FakeHandle(score_many=score_many)
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = commands.canary(_two_versions(task="rerank"), "rerank", "2", 100)
    asyncio.run(ing.reconfigure(cfg.model_copy(update={"model_placement": "deployments"}).model_dump(mode="json")))
    body = {"query": "q", "documents": ["a", "b"]}
    status, headers, _ = call(ing, "POST", "/v1/rerank", body)
    assert status == 200 and headers["x-model-version"] == "all-MiniLM-L6-v2/1"
    asked = [c.model for (calls,) in ranker.calls for c in calls]
    assert asked == [v2, v1]
    call(ing, "POST", "/v1/rerank", body)  # redirected at once: no second round trip to v2
    assert [c.model for (calls,) in ranker.calls[2:] for c in calls] == [v1]
    serves.clear()
    status, _, answer = call(ing, "POST", "/v1/rerank", body)
    assert status == 503 and answer["error_type"] == "unavailable"


def test_an_ingress_learns_a_version_only_the_replica_knows() -> None:
    """A rolling update: a new ingress replica routes to a renamed model while an old model replica serves only
    the old one. The replica's refusal carries its versions' configs; the ingress tokenizes for one and sends
    the request there (its response names the version that answered) instead of answering 503."""
    from test_ingress import FakeHandle, call, top_labels

    from serve_app.core.backend import VersionNotReady
    from serve_app.deployments.encoder import Ranked
    from serve_app.deployments.ingress import Ingress

    old_cfg = load_config()
    old = old_cfg.model_for("rerank")

    def score_many(calls: list[Any]) -> list[Any]:
        return [
            Ranked(np.zeros(len(c.seqs) - 1, np.float32), old.version)
            if c.model == old.key
            else VersionNotReady(c.model, (old.key,), (old.model_dump(mode="json"),))
            for c in calls
        ]

    ing = Ingress(FakeHandle(score_many=score_many), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    renamed = old_cfg.with_serving(old.model_copy(update={"name": "all-MiniLM-L6-v2-next"}))
    asyncio.run(ing.reconfigure(renamed.model_copy(update={"model_placement": "deployments"}).model_dump(mode="json")))
    status, headers, _ = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert status == 200 and headers["x-model-version"] == "all-MiniLM-L6-v2/1"
