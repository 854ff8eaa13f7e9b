"""Real TensorRT-RTX engines built on the CPU: profiles, manifest, refusals, the validation gate, fallback.

TensorRT-RTX builds ahead of time without a GPU; nothing here executes an engine (no GPU in CI, and
TensorRT-RTX refuses the Hopper GPUs we can borrow). The gate's candidate is therefore the recipe's
ONNX graph on ONNX Runtime, exactly as on any machine without a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from serve_app.backends.onnxruntime import OnnxRuntimeBackend
from serve_app.backends.select import select_backend
from serve_app.config import AppConfig, BackendConfig, EngineConfig, Precision, Task
from serve_app.core.backend import BackendUnavailable
from serve_app.core.sequences import Encoded
from serve_app.core.timing import Processor
from serve_app.engine import gate
from serve_app.engine.build import build_and_validate, reference_runner
from serve_app.engine.manifest import EngineRefused, Manifest, check_compatible, engine_dir, sha256_file
from serve_app.engine.trt_shim import import_tensorrt
from serve_app.models.artifacts import ModelArtifacts, resolve

pytestmark = pytest.mark.slow
# every precision once, both models' heads, and a real recipe that fails its gate (the classifier's INT8 on
# this slice), in four builds: each recipe costs CI 7-25 s on 2 cores (build, INT8 calibration, gate)
RECIPES: tuple[tuple[Task, Precision], ...] = (
    ("rerank", "fp32"),
    ("rerank", "fp16"),
    ("classify", "fp16"),
    ("classify", "int8"),
)


@pytest.fixture(scope="module")
def trt():  # type: ignore[no-untyped-def]
    return import_tensorrt("tensorrt_rtx")


@pytest.fixture(scope="module")
def small_engine_cfg(app_config: AppConfig) -> EngineConfig:
    # the same thresholds as production, on a smaller slice of the dev sets and a quarter of the INT8
    # calibration text, to fit CI's budget (no assertion here needs an INT8 recipe to pass its gate)
    return app_config.engine.model_copy(update={"gate_queries": 6, "gate_utterances": 150, "calibration_sequences": 64})


@pytest.fixture(scope="module")
def built(app_config: AppConfig, small_engine_cfg: EngineConfig, trt, shared_data: Path):  # type: ignore[no-untyped-def]
    """``RECIPES``, built and gated once for the module."""
    out: dict[tuple[str, str], tuple[ModelArtifacts, Manifest]] = {}
    for role, precision in RECIPES:
        art = resolve(app_config.model_for(role), app_config.artifacts_dir)
        out[(role, precision)] = (art, build_and_validate(art, precision, app_config.batching, small_engine_cfg, trt))
    return out


def test_engines_have_one_profile_per_bucket(built, app_config: AppConfig) -> None:  # type: ignore[no-untyped-def]
    for (role, precision), (art, m) in built.items():
        assert m.flavor == "tensorrt_rtx" and m.compute_capabilities == ["SM86", "SM89"]
        assert [p.bucket for p in m.profiles] == list(app_config.batching.buckets)
        buckets = list(app_config.batching.buckets)
        assert [(p.min[1], p.max[1]) for p in m.profiles] == list(
            zip([1] + [b + 1 for b in buckets[:-1]], buckets, strict=True)
        )
        assert all(p.min[0] == 1 and p.max[0] == app_config.batching.batch_slots[-1] for p in m.profiles)
        inputs = {t.name: t.dtype for t in m.io if t.mode == "input"}
        assert inputs == {"input_ids": "INT64", "attention_mask": "INT64", "token_type_ids": "INT64"}
        (out,) = [t for t in m.io if t.mode == "output"]
        assert out.name == art.output_name and out.shape[-1] == (384 if role == "rerank" else 151)
        plan = engine_dir(art.directory, precision) / m.plan_file
        assert plan.stat().st_size == m.plan_bytes > 10_000_000
        assert sha256_file(plan) == m.plan_sha256
        assert m.onnx_sha256 == sha256_file((plan.parent / m.onnx_file).resolve())
        assert m.build_seconds > 0
        print(f"{role} {precision}: built in {m.build_seconds:.1f}s, {m.plan_bytes / 2**20:.0f} MiB")


def test_gate_figures_recorded_and_consistent(built, small_engine_cfg: EngineConfig, app_config: AppConfig) -> None:  # type: ignore[no-untyped-def]
    for (role, precision), (_, m) in built.items():
        v = m.validation
        assert v is not None and set(v.buckets) == {str(b) for b in app_config.batching.buckets}
        thr = small_engine_cfg.gate[precision]
        worst = min(b.min_cosine for b in v.buckets.values())
        expected = worst >= thr.min_cosine and v.metric_drop_pt <= thr.max_metric_drop_pt
        assert v.passed == expected, v.failures
        print(
            f"{role} {precision}: gate {'pass' if v.passed else 'FAIL'}, min cosine {worst:.5f}, "
            f"{v.metric} {v.metric_reference:.4f} -> {v.metric_candidate:.4f} ({v.metric_drop_pt:+.2f} pt drop)"
        )
    assert built[("rerank", "fp32")][1].validation.passed
    for role in ("rerank", "classify"):
        assert built[(role, "fp16")][1].validation.passed
        assert min(b.min_cosine for b in built[(role, "fp16")][1].validation.buckets.values()) >= 0.9995


def test_damaged_recipe_is_rejected(
    built: Any, small_engine_cfg: EngineConfig, app_config: AppConfig, tmp_path: Path
) -> None:
    art, _ = built[("rerank", "fp16")]
    model = onnx.load(str(art.onnx_path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:  # one layer's FFN weights corrupted by 30% noise
        if init.name.startswith("l2_ff1_w"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array((w * (1 + 0.3 * rng.standard_normal(w.shape))).astype(w.dtype), init.name)
            )
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    buckets, slots = app_config.batching.buckets, app_config.batching.batch_slots
    v = gate.validate(
        art,
        reference_runner(art.onnx_path, buckets, slots),  # the one the module's builds were gated against
        gate.runner_for(OnnxRuntimeBackend(damaged, 2), buckets, slots),
        "damaged",
        small_engine_cfg.gate["fp16"],
        buckets,
        small_engine_cfg.gate_queries,
    )
    assert not v.passed
    assert any("min cosine" in f for f in v.failures)


def test_loader_refuses_tampered_foreign_and_unvalidated_plans(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    art, m = built[("rerank", "fp16")]
    plan = engine_dir(art.directory, "fp16") / m.plan_file
    ok = dict(flavor="tensorrt_rtx", tensorrt_version=m.tensorrt_version, compute_capability="SM89")
    check_compatible(m, plan, **ok)  # the genuine article passes

    tampered = tmp_path / "engine.plan"
    shutil.copyfile(plan, tampered)
    with tampered.open("r+b") as f:
        f.seek(m.plan_bytes // 2)
        byte = f.read(1)
        f.seek(m.plan_bytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EngineRefused, match="sha256"):
        check_compatible(m, tampered, **ok)
    with pytest.raises(EngineRefused, match="this GPU is SM90"):
        check_compatible(m, plan, **{**ok, "compute_capability": "SM90"})
    with pytest.raises(EngineRefused, match="this node runs tensorrt"):
        check_compatible(m, plan, **{**ok, "flavor": "tensorrt"})
    with pytest.raises(EngineRefused, match=r"this node has 1\.0"):
        check_compatible(m, plan, **{**ok, "tensorrt_version": "1.0"})
    unvalidated = m.model_copy(update={"validation": None})
    with pytest.raises(EngineRefused, match="validation gate"):
        check_compatible(unvalidated, plan, **ok)


def test_auto_falls_back_to_onnxruntime_without_gpu(built, app_config: AppConfig) -> None:  # type: ignore[no-untyped-def]
    art, _ = built[("rerank", "fp16")]
    backend = select_backend(art, app_config.serving("rerank"))
    assert backend.info.name == "onnxruntime" and backend.info.device == "cpu"
    assert backend.info.processor is Processor.CPU  # its answers turn the ingress's overload budgets off
    assert "no CUDA GPU visible" in backend.info.reason
    explicit = app_config.serving("rerank").model_copy(update={"backend": BackendConfig(kind="tensorrt")})
    with pytest.raises(BackendUnavailable, match="no CUDA GPU visible"):
        select_backend(art, explicit)


def test_the_reference_runs_once_per_list_of_sequences() -> None:
    calls: list[int] = []

    def count(seqs: list[Encoded]) -> np.ndarray:  # a fake model at the backend boundary: one row per sequence
        calls.append(len(seqs))
        return np.array([[float(s.ids.sum())] for s in seqs])

    def seq(*ids: int) -> Encoded:
        return Encoded(np.array(ids), np.zeros(len(ids), dtype=np.int64), False)

    run = gate.remembered(count)
    first = run([seq(1, 2), seq(3)])
    again = run([seq(1, 2), seq(3)])
    assert again is first and calls == [2]
    run([seq(1), seq(2, 3)])  # the same tokens split otherwise: other sequences
    run([seq(1, 2), Encoded(np.array([3]), np.ones(1, dtype=np.int64), False)])  # other token types
    assert calls == [2, 2, 2]
