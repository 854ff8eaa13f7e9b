"""ONNX → TensorRT plan, one optimization profile per length bucket (x concurrency slot), plus its manifest."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from pathlib import Path

from serve_app.backends.onnxruntime import OnnxRuntimeBackend
from serve_app.config import BatchingConfig, EngineConfig, Precision
from serve_app.core.sequences import Encoded
from serve_app.engine import gate
from serve_app.engine.manifest import Manifest, Profile, TensorIO, Validation, engine_dir, sha256_file
from serve_app.engine.recipes import recipe_onnx
from serve_app.engine.trt_shim import TRT, compute_capability_name, import_tensorrt
from serve_app.evaluation.data import load_clinc150, load_scifact
from serve_app.models.artifacts import ModelArtifacts
from serve_app.models.tokenizer import TextEncoder

log = logging.getLogger(__name__)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EngineBuildError(RuntimeError):
    pass


def profiles_for(batching: BatchingConfig, slots: int) -> list[Profile]:
    """Bucket b covers lengths (previous bucket, b]; batch 1..max_batch_size, tuned for half a batch."""
    out: list[Profile] = []
    max_b = batching.batch_slots[-1]
    opt_b = max(1, batching.max_batch_size // 2)
    for slot in range(slots):
        lower = 1
        for bucket in batching.buckets:
            out.append(
                Profile(
                    index=len(out), bucket=bucket, slot=slot, min=(1, lower), opt=(opt_b, bucket), max=(max_b, bucket)
                )
            )
            lower = bucket + 1
    return out


def calibration_sequences(art: ModelArtifacts, enc: TextEncoder, count: int = 256) -> list[Encoded]:
    """Real text from the model's own domain, spread over lengths (rankers) or labels (classifiers)."""
    if art.architecture == "classifier":
        train = load_clinc150()["train"]
        step = max(1, len(train) // count)
        return enc.encode([t for t, _ in train[::step][:count]])
    sf = load_scifact(top_k=3)
    qids = sorted(sf.queries)[::3][: count // 2]
    if art.architecture == "cross_encoder":
        return [
            s
            for q in qids
            for s in enc.encode_pairs(sf.queries[q], [sf.corpus[d] for d in sf.candidates.get(q, [])[:2]])
        ]
    docs = [sf.corpus[d] for q in qids for d in sf.candidates.get(q, [])[:1]]
    return enc.encode([sf.queries[q] for q in qids]) + enc.encode(docs)


def _current_gpu() -> tuple[str, str] | None:
    """(compute capability name, device name) of GPU 0, through cuda-python; None without a GPU."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    return compute_capability_name(props.major, props.minor), props.name.decode(errors="replace").strip("\x00")


def build_engine(
    art: ModelArtifacts,
    precision: Precision,
    batching: BatchingConfig,
    engine: EngineConfig,
    trt: TRT | None = None,
    calibration: list[Encoded] | None = None,
) -> tuple[Manifest, Path]:
    trt = trt or import_tensorrt()
    enc = TextEncoder(art.tokenizer_path, min(art.max_length, batching.buckets[-1]))
    if precision == "int8" and calibration is None:
        calibration = calibration_sequences(art, enc, engine.calibration_sequences)
    onnx_path = recipe_onnx(art, precision, calibration, batching.buckets)
    mod = trt.module
    logger = trt.logger()
    t0 = time.perf_counter()
    builder = mod.Builder(logger)
    network = builder.create_network(trt.network_flags())
    parser = mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path.name}: ONNX parse failed: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, engine.workspace_mib << 20)
    config.builder_optimization_level = engine.optimization_level
    if not trt.strongly_typed_only and not (trt.network_flags()):  # TensorRT < 10.12: precision by flags
        if precision in ("fp16", "int8"):
            config.set_flag(mod.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(mod.BuilderFlag.INT8)
    profiles = profiles_for(batching, engine.contexts_per_bucket)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name in INPUTS:
            prof.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(prof)
    targets = trt.set_targets(config, list(engine.targets))
    gpu = None
    if trt.flavor == "tensorrt":
        gpu = _current_gpu()
        if gpu is None:
            raise EngineBuildError("datacenter TensorRT builds for the GPU it runs on, and none is visible")
        targets = [gpu[0]]
    cache_path = art.directory.parent / "timing.cache"
    if trt.supports_timing_cache():
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{art.name} {precision}: build_serialized_network returned None (see TensorRT log)")
    seconds = time.perf_counter() - t0
    if trt.supports_timing_cache():
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    out_dir = engine_dir(art.directory, precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / "engine.plan"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, plan_path)
    io = [
        TensorIO(name=t.name, mode="input", dtype=str(t.dtype).split(".")[-1], shape=tuple(t.shape))
        for t in (network.get_input(i) for i in range(network.num_inputs))
    ] + [
        TensorIO(name=t.name, mode="output", dtype=str(t.dtype).split(".")[-1], shape=tuple(t.shape))
        for t in (network.get_output(i) for i in range(network.num_outputs))
    ]
    manifest = Manifest(
        model=art.name,
        model_version=art.version,
        architecture=art.architecture,
        precision=precision,
        onnx_file=os.path.relpath(onnx_path, out_dir),
        onnx_sha256=sha256_file(onnx_path),
        plan_file=plan_path.name,
        plan_sha256=sha256_file(plan_path),
        plan_bytes=plan_path.stat().st_size,
        flavor=trt.flavor,
        tensorrt_version=trt.version,
        compute_capabilities=targets,
        build_gpu=gpu[1] if gpu else None,
        profiles=profiles,
        io=io,
        build_seconds=round(seconds, 2),
        optimization_level=engine.optimization_level,
        workspace_mib=engine.workspace_mib,
    )
    manifest.write(out_dir / "manifest.json")
    log.info("built %s %s in %.1fs (%d profiles)", art.name, precision, seconds, len(profiles))
    return manifest, out_dir


@functools.lru_cache(maxsize=4)
def _reference(
    onnx_path: Path, stamp: tuple[int, int], threads: int, buckets: tuple[int, ...], slots: tuple[int, ...]
) -> gate.Runner:
    return gate.remembered(gate.runner_for(OnnxRuntimeBackend(onnx_path, threads), buckets, slots))


def reference_runner(
    onnx_path: Path, buckets: tuple[int, ...], slots: tuple[int, ...], threads: int = 2
) -> gate.Runner:
    """The FP32 graph on ONNX Runtime, shared by every recipe gated against it (and its outputs with it); a graph
    written again to the same path (a new export) gets a new one."""
    st = onnx_path.stat()
    return _reference(onnx_path, (st.st_mtime_ns, st.st_size), threads, buckets, slots)


def validate_recipe(
    art: ModelArtifacts,
    precision: Precision,
    batching: BatchingConfig,
    engine: EngineConfig,
    candidate_backend: object | None = None,
    threads: int = 2,
) -> Validation:
    """Gate a recipe: the engine itself when it can run here, else its ONNX graph on ONNX Runtime."""
    onnx_path = recipe_onnx(art, precision, None, batching.buckets)
    reference = reference_runner(art.onnx_path, batching.buckets, batching.batch_slots, threads)
    if candidate_backend is not None:
        cand = gate.runner_for(candidate_backend, batching.buckets, batching.batch_slots)  # type: ignore[arg-type]
        name = f"{candidate_backend.info.name} {precision}"  # type: ignore[attr-defined]
    elif onnx_path == art.onnx_path:  # the FP32 recipe's graph is the reference itself: its outputs, not a rerun
        cand = reference
        name = f"onnxruntime cpu on {onnx_path.name}, the reference graph (no GPU to run the engine here)"
    else:
        cand = gate.runner_for(OnnxRuntimeBackend(onnx_path, threads), batching.buckets, batching.batch_slots)
        name = f"onnxruntime cpu on {onnx_path.name} (no GPU to run the engine here)"
    size = engine.gate_utterances if art.architecture == "classifier" else engine.gate_queries
    return gate.validate(art, reference, cand, name, engine.gate[precision], batching.buckets, size)


def build_and_validate(
    art: ModelArtifacts, precision: Precision, batching: BatchingConfig, engine: EngineConfig, trt: TRT | None = None
) -> Manifest:
    manifest, out_dir = build_engine(art, precision, batching, engine, trt)
    manifest.validation = validate_recipe(art, precision, batching, engine)
    manifest.write(out_dir / "manifest.json")
    return manifest
