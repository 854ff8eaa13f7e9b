"""The gate every replica runs on its own backend before a model version serves.

``probe_reference`` computes a version's FP32 reference once (``models.probe``); ``check_backend`` runs the
probe sequences through the backend that will serve, batched and padded as serving does, and compares them
row by row with the reference under the recipe's ``min_cosine`` for the backend's precision.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serve_app.batching.plan import run_bucketed
from serve_app.config import GateThresholds
from serve_app.core.backend import Backend, GateFailed
from serve_app.core.sequences import PaddedBatch, Sequences
from serve_app.models.artifacts import ModelArtifacts
from serve_app.models.probe import ProbeReference, probe_sequences, reference_path
from serve_app.models.tokenizer import TextEncoder


def one_at_a_time(backend: Backend, seqs: Sequences) -> np.ndarray:
    """Each sequence alone at its exact length: no padding or batch neighbour touches the reference."""
    rows = []
    for s in seqs:
        ids = s.ids.astype(np.int64)[None, :]
        rows.append(backend.infer(PaddedBatch(ids, np.ones_like(ids), s.type_ids.astype(np.int64)[None, :], 1)))
    return np.concatenate(rows).astype(np.float32)


def probe_reference(art: ModelArtifacts, artifacts_dir: str | Path, max_length: int) -> ProbeReference:
    """The stored reference of ``art``'s probe set, computed (FP32 graph, ONNX Runtime, CPU) if it is missing."""
    path = reference_path(art, artifacts_dir, max_length)
    if path.exists():
        return ProbeReference.load(path)
    from serve_app.backends.onnxruntime import OnnxRuntimeBackend

    encoder = TextEncoder(art.tokenizer_path, max_length)
    seqs = Sequences.pack(probe_sequences(encoder, art.architecture == "cross_encoder"))
    backend = OnnxRuntimeBackend(art.onnx_path, intra_op_threads=1, reason="probe reference")
    try:
        ref = ProbeReference(seqs, one_at_a_time(backend, seqs))
    finally:
        backend.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    ref.save(path)
    return ref


@dataclass(frozen=True)
class ProbeCheck:
    """What ``/v1/models`` shows of a version's gate on this replica."""

    passed: bool
    sequences: int
    min_cosine: float  # the worst sequence
    threshold: float  # the recipe's min_cosine for the backend's precision
    max_abs_diff: float
    precision: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape[1] == 1:  # one logit per sequence (a cross-encoder): compare the scores across the probe set
        a, b = (a - a.mean()).T, (b - b.mean()).T
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(axis=1) / np.maximum(na * nb, 1e-12))


def check_backend(
    backend: Backend,
    reference: ProbeReference,
    thresholds: GateThresholds,
    buckets: tuple[int, ...],
    slots: tuple[int, ...],
) -> ProbeCheck:
    """Run the probe set through ``backend`` as serving would; raise ``GateFailed`` below the threshold."""
    started = time.perf_counter()
    out = run_bucketed(backend, reference.sequences, buckets, max(slots), slots)
    if out.shape != reference.outputs.shape:
        raise GateFailed(f"probe outputs have shape {out.shape}, the reference {reference.outputs.shape}")
    cos = _row_cosine(out, reference.outputs)
    worst = float(np.nan_to_num(cos, nan=-1.0).min())
    check = ProbeCheck(
        passed=worst >= thresholds.min_cosine,
        sequences=len(reference.sequences),
        min_cosine=round(worst, 7),
        threshold=thresholds.min_cosine,
        max_abs_diff=float(np.abs(out - reference.outputs).max()),
        precision=backend.info.precision,
        seconds=round(time.perf_counter() - started, 3),
    )
    if not check.passed:
        raise GateFailed(
            f"{backend.info.name} ({backend.info.precision}) does not reproduce the version's FP32 probe outputs: "
            f"worst cosine {worst:.6f} < {thresholds.min_cosine} over {check.sequences} sequences "
            f"(max abs diff {check.max_abs_diff:.3g})"
        )
    return check
