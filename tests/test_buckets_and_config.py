"""Bucketing, padding and configuration rules (pure functions; no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from serve_app.batching.buckets import bucket_for, pad_batch, slot_for
from serve_app.config import MODEL_ROLES, AppConfig, BatchingConfig, load_config
from serve_app.core.sequences import Encoded

BUCKETS = (32, 64, 128, 256)


def _seq(n: int) -> Encoded:
    return Encoded(np.arange(1, n + 1, dtype=np.int64), np.zeros(n, dtype=np.int64), False)


@given(st.integers(min_value=1, max_value=256))
def test_bucket_is_the_smallest_that_fits(n: int) -> None:
    b = bucket_for(n, BUCKETS)
    assert b >= n
    assert all(x < n for x in BUCKETS if x < b)


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=32))
def test_pad_batch_pads_to_bucket_and_masks_exactly(lengths: list[int]) -> None:
    seqs = [_seq(n) for n in lengths]
    bucket = bucket_for(max(lengths), BUCKETS)
    slot = slot_for(len(seqs), (1, 2, 4, 8, 16, 32))
    batch = pad_batch(seqs, bucket, slot)
    assert batch.shape == (slot, bucket)
    assert batch.rows == len(seqs)
    assert batch.attention_mask.sum(axis=1).tolist() == [*lengths, *[0] * (slot - len(seqs))]
    for s, row in zip(seqs, batch.input_ids, strict=False):
        assert row[: len(s)].tolist() == s.ids.tolist() and not row[len(s) :].any()


def test_over_long_and_oversized_are_refused() -> None:
    with pytest.raises(ValueError):
        bucket_for(257, BUCKETS)
    with pytest.raises(ValueError):
        pad_batch([_seq(40)], 32)
    with pytest.raises(ValueError):
        slot_for(33, (1, 2, 4, 8, 16, 32))


def test_default_config_loads_and_rejects_typos(tmp_path: Path) -> None:
    cfg = load_config()
    assert cfg.batching.buckets[-1] == 256 and cfg.model_for("rerank").source == "builtin"  # the model's max_seq_length
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "ranker: {name: r, task: rerank}\nintent: {name: i, task: classify}\nbatching: {max_batch_sise: 8}\n"
    )
    with pytest.raises(ValidationError, match="max_batch_sise"):
        load_config(bad)


@pytest.mark.parametrize(
    "batching",
    [
        {"buckets": [64, 32]},
        {"buckets": []},
        {"max_batch_size": 64, "batch_slots": [1, 8, 32]},
        {"max_batch_size": 0},
        {"max_batch_tokens": 128},  # cannot hold one sequence of the largest bucket (256)
    ],
)
def test_invalid_batching_is_refused(batching: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BatchingConfig.model_validate(batching)


def test_serving_config_resolves_artifacts_dir_absolutely() -> None:
    cfg = AppConfig.model_validate(
        {
            "models": [{"name": "r", "task": "rerank"}, {"name": "i", "task": "classify"}],
            "routes": {"rerank": {"model": "r", "version": 1}, "classify": {"model": "i", "version": "1"}},
        }
    )
    assert Path(cfg.serving("rerank").artifacts_dir).is_absolute()


def test_a_model_source_must_resolve_under_the_model_roots(tmp_path: Path) -> None:
    """No path from the config reaches outside the model roots, whether by ``..`` or by a link."""
    roots = tmp_path / "models"
    (roots / "mine").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (roots / "escape").symlink_to(outside)
    base = load_config().model_dump(mode="json")

    def with_source(source: str) -> AppConfig:
        ranker, intent = base["models"]
        data = {**base, "model_roots": [str(roots)], "models": [{**ranker, "source": source}, intent]}
        return AppConfig.model_validate(data)

    assert with_source(str(roots / "mine")).model_for("rerank").source == str(roots / "mine")
    for bad in (str(outside), str(roots / "mine" / ".." / ".." / "elsewhere"), str(roots / "escape"), "/etc"):
        with pytest.raises(ValidationError, match="outside model_roots"):
            with_source(bad)
    serving = with_source(str(roots / "mine")).serving("rerank")  # what a model replica validates again
    assert serving.model_roots == (str(roots.resolve()),)
    with pytest.raises(ValidationError, match="outside model_roots"):
        escaped = {**serving.model_dump(mode="json"), "model": {**base["models"][0], "source": "/etc"}}
        type(serving).model_validate(escaped)


def test_an_engine_manifest_names_a_file_of_its_own_folder_only(tmp_path: Path) -> None:
    from serve_app.engine.manifest import EngineRefused, Manifest, check_compatible

    fields = {
        "model": "m", "model_version": "v", "architecture": "bi_encoder", "precision": "fp16",
        "onnx_file": "model.onnx", "onnx_sha256": "0", "plan_file": "engine.plan", "plan_sha256": "0",
        "plan_bytes": 1, "flavor": "tensorrt", "tensorrt_version": "10", "compute_capabilities": ["SM90"],
        "build_gpu": None, "profiles": [], "io": [], "build_seconds": 0.0, "optimization_level": 3,
        "workspace_mib": 1024, "validation": {
            "passed": True, "runner": "engine", "reference": "fp32", "thresholds": {}, "buckets": {},
            "metric": "ndcg@10", "metric_reference": 0.7, "metric_candidate": 0.7, "metric_drop_pt": 0.0,
            "failures": [], "seconds": 1.0,
        },
    }  # fmt: skip
    for bad in ("../../etc/passwd", "/etc/passwd", "sub/engine.plan", ".hidden"):  # plan_file only
        with pytest.raises(ValidationError):
            Manifest.model_validate({**fields, "plan_file": bad})
    manifest = Manifest.model_validate(fields)
    engine = tmp_path / "trt-fp16"
    engine.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    (engine / "engine.plan").symlink_to(secret)
    with pytest.raises(EngineRefused, match="links outside"):
        check_compatible(manifest, engine / manifest.plan_file, "tensorrt", "10", "SM90")


def test_production_models_can_scale_out_with_the_ingress_at_its_minimum() -> None:
    """A model deployment sees the ingress's coalesced calls, at most ``calls_in_flight`` per ingress replica:
    its target must be reachable from the ingress's minimum (the intent's was 48 against 8 calls)."""
    cfg = load_config("production")
    calls = cfg.batching.calls_in_flight * cfg.scaling_for("ingress").min_replicas
    for role in MODEL_ROLES:
        s = cfg.scaling_for(role)
        assert s.max_replicas > s.min_replicas, role
        assert s.target_ongoing_requests * s.min_replicas < calls, (role, s.target_ongoing_requests, calls)


def test_an_unreachable_model_autoscaling_target_is_refused() -> None:
    base = load_config("production").model_dump(mode="json")
    base["scaling"]["intent"]["target_ongoing_requests"] = 4 * base["scaling"]["ingress"]["max_replicas"]
    with pytest.raises(ValidationError, match="could never scale out"):
        AppConfig.model_validate(base)
    base["model_placement"] = "ingress"  # no model deployments: nothing to scale
    AppConfig.model_validate(base)


def test_serve_takes_every_deployment_option_the_config_sets() -> None:
    """Serve validates deployment options: each deployment's options, from the production config, pass that
    validation and carry the health-check period (Serve starts a dead replica's replacement only after its
    next check; its own default is 10 s)."""
    from serve_app.config import DeploymentScaling
    from serve_app.graph import ROLES, Ingress, Intent, Ranker, deployment_options

    cfg = load_config("production")
    classes = {"Ingress": Ingress, "Ranker": Ranker, "Intent": Intent}
    for name, role in ROLES.items():
        opts = deployment_options(cfg.scaling_for(role), {})
        deployment = classes[name].options(**opts)
        config = deployment._deployment_config  # Ray keeps the validated options here
        assert config.health_check_period_s == cfg.scaling_for(role).health_check_period_s == 2.0
        assert config.health_check_timeout_s == 30.0
    with pytest.raises(ValidationError):
        DeploymentScaling(health_check_period_s=0)
