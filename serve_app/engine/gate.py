"""The validation gate: a reduced-precision model serves only if it stays close to the FP32 reference.

Two checks on real dev text (shared/data): per length bucket, the cosine and max abs diff of the
outputs; and the task metric — NDCG@10 on SciFact dev (rankers) or accuracy on CLINC150 val
(classifiers) — whose drop must stay under the recipe's threshold. Where no GPU can run the engine,
the candidate is the recipe's ONNX graph on ONNX Runtime, so the precision recipe is still validated.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serve_app.batching.buckets import bucket_for
from serve_app.batching.plan import run_bucketed
from serve_app.config import GateThresholds
from serve_app.core.backend import Backend
from serve_app.core.sequences import Encoded, Sequences
from serve_app.engine.manifest import BucketCheck, Validation
from serve_app.evaluation.data import load_clinc150, load_scifact
from serve_app.evaluation.metrics import mean, ndcg_at_k, rerank
from serve_app.models.artifacts import ModelArtifacts
from serve_app.models.tokenizer import TextEncoder

Runner = Callable[[list[Encoded]], np.ndarray]


def runner_for(backend: Backend, buckets: tuple[int, ...], slots: tuple[int, ...]) -> Runner:
    return lambda seqs: run_bucketed(backend, seqs, buckets, max(slots), slots)


def remembered(run: Runner) -> Runner:
    """``run`` that computes the outputs for one list of sequences once: every recipe of a model is gated against
    the same FP32 outputs on the same dev text, which cost as much as the candidate's own."""
    outputs: dict[bytes, np.ndarray] = {}

    def run_once(seqs: list[Encoded]) -> np.ndarray:
        packed = Sequences.pack(seqs)
        digest = hashlib.blake2b(digest_size=16)
        for part in (packed.ids, packed.type_ids, packed.offsets):
            digest.update(part.tobytes())
        key = digest.digest()
        if key not in outputs:
            outputs[key] = run(seqs)
        return outputs[key]

    return run_once


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def bucket_samples(
    art: ModelArtifacts, enc: TextEncoder, buckets: tuple[int, ...], per_bucket: int, data_root: Path | None
) -> list[Encoded]:
    """Real SciFact text (queries, abstracts, query/abstract pairs for cross-encoders) filling every bucket."""
    sf = load_scifact(data_root, top_k=5)
    qids = sorted(q for q in sf.queries if q in sf.candidates)
    if art.architecture == "cross_encoder":
        pool = [
            s for q in qids[:200] for s in enc.encode_pairs(sf.queries[q], [sf.corpus[d] for d in sf.candidates[q]])
        ]
    else:
        pool = enc.encode([sf.queries[q] for q in qids[:200]]) + enc.encode(
            [sf.corpus[d] for q in qids[:200] for d in sf.candidates[q][:2]]
        )
    chosen: dict[int, list[Encoded]] = defaultdict(list)
    for s in pool:
        b = bucket_for(len(s), buckets)
        if len(chosen[b]) < per_bucket:
            chosen[b].append(s)
    return [s for b in buckets for s in chosen[b]]


def _ranking_metric(
    art: ModelArtifacts, enc: TextEncoder, queries: int, data_root: Path | None
) -> Callable[[Runner], float]:
    sf = load_scifact(data_root, top_k=30)
    qids = [q for q in sf.queries if q in sf.candidates and q in sf.qrels][:queries]

    if art.architecture == "cross_encoder":
        pairs = [enc.encode_pairs(sf.queries[q], [sf.corpus[d] for d in sf.candidates[q]]) for q in qids]

        def ndcg_cross(run: Runner) -> float:
            flat = run([s for p in pairs for s in p])
            out, start = [], 0
            for q, p in zip(qids, pairs, strict=True):
                scores = flat[start : start + len(p), -1]
                start += len(p)
                out.append(ndcg_at_k(rerank(sf.candidates[q], list(scores)), sf.qrels[q]))
            return mean(out)

        return ndcg_cross

    doc_ids = sorted({d for q in qids for d in sf.candidates[q]})
    seqs = enc.encode([sf.queries[q] for q in qids]) + enc.encode([sf.corpus[d] for d in doc_ids])
    row = {d: len(qids) + i for i, d in enumerate(doc_ids)}

    def ndcg_bi(run: Runner) -> float:
        emb = run(seqs)
        return mean(
            [
                ndcg_at_k(
                    rerank(sf.candidates[q], [float(emb[row[d]] @ emb[i]) for d in sf.candidates[q]]), sf.qrels[q]
                )
                for i, q in enumerate(qids)
            ]
        )

    return ndcg_bi


def _accuracy_metric(
    art: ModelArtifacts, enc: TextEncoder, utterances: int, data_root: Path | None
) -> Callable[[Runner], float]:
    val = load_clinc150(data_root)["val"]
    step = max(1, len(val) // utterances)
    rows = val[::step][:utterances]
    seqs = enc.encode([t for t, _ in rows])
    gold = np.array([art.labels.index(lab) for _, lab in rows])

    def accuracy(run: Runner) -> float:
        return float((run(seqs).argmax(axis=1) == gold).mean())

    return accuracy


def validate(
    art: ModelArtifacts,
    reference: Runner,
    candidate: Runner,
    candidate_name: str,
    thresholds: GateThresholds,
    buckets: tuple[int, ...],
    metric_size: int,
    data_root: Path | None = None,
    per_bucket: int = 16,
) -> Validation:
    t0 = time.perf_counter()
    enc = TextEncoder(art.tokenizer_path, min(art.max_length, buckets[-1]))
    samples = bucket_samples(art, enc, buckets, per_bucket, data_root)
    ref_out, cand_out = reference(samples), candidate(samples)
    failures: list[str] = []
    checks: dict[str, BucketCheck] = {}
    lengths = np.array([bucket_for(len(s), buckets) for s in samples])
    for b in buckets:
        idx = np.flatnonzero(lengths == b)
        if idx.size == 0:
            continue
        cos = _cosine(ref_out[idx], cand_out[idx])
        checks[str(b)] = BucketCheck(
            sequences=int(idx.size),
            min_cosine=float(cos.min()),
            mean_cosine=float(cos.mean()),
            max_abs_diff=float(np.abs(ref_out[idx] - cand_out[idx]).max()),
        )
        if cos.min() < thresholds.min_cosine:
            failures.append(f"bucket {b}: min cosine {cos.min():.5f} < {thresholds.min_cosine}")
        if not np.isfinite(cand_out[idx]).all():
            failures.append(f"bucket {b}: non-finite outputs")

    if art.architecture == "classifier":
        metric_name = f"accuracy (CLINC150 val, {metric_size} utterances)"
        metric = _accuracy_metric(art, enc, metric_size, data_root)
    else:
        metric_name = f"NDCG@10 (SciFact dev, {metric_size} queries x BM25 top-30)"
        metric = _ranking_metric(art, enc, metric_size, data_root)
    m_ref, m_cand = metric(reference), metric(candidate)
    drop_pt = (m_ref - m_cand) * 100
    if drop_pt > thresholds.max_metric_drop_pt:
        failures.append(f"{metric_name} drops {drop_pt:.2f} pt > {thresholds.max_metric_drop_pt} pt")
    return Validation(
        passed=not failures,
        runner=candidate_name,
        reference="onnxruntime fp32 (cpu)",
        thresholds=thresholds.model_dump(),
        buckets=checks,
        metric=metric_name,
        metric_reference=m_ref,
        metric_candidate=m_cand,
        metric_drop_pt=drop_pt,
        failures=failures,
        seconds=round(time.perf_counter() - t0, 1),
    )
