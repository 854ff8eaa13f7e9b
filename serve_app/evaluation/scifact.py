"""SciFact re-ranking, offline: the same tokenization, windows, batching, aggregation and fusion code the
service runs, on a backend in this process, so a subset through the service must give the same figures.

Documents are embedded once per (document, window) and scored against every query that retrieved them,
which makes all 809 dev queries x BM25 top-100 a couple of minutes on two cores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from serve_app.batching.plan import run_bucketed
from serve_app.config import AppConfig, ChunkAggregation, FusionConfig
from serve_app.core.backend import Backend
from serve_app.evaluation.data import SciFact
from serve_app.evaluation.metrics import mean, mrr_at_k, ndcg_at_k, rerank
from serve_app.models.tokenizer import TextEncoder
from serve_app.ranking.chunks import ChunkMap, aggregate
from serve_app.ranking.fusion import fuse


@dataclass(frozen=True)
class WindowScores:
    """Per query, each candidate's window scores (cosine with the query), candidates in BM25 order."""

    scores: dict[str, list[np.ndarray]]
    sequences: int  # document sequences embedded (windows, or one per document)
    documents: int

    def per_document(self, how: ChunkAggregation) -> dict[str, list[float]]:
        out = {}
        for q, windows in self.scores.items():
            owner = np.repeat(np.arange(len(windows)), [len(w) for w in windows])
            flat = np.concatenate(windows) if windows else np.zeros(0)
            out[q] = aggregate(flat, ChunkMap(owner, len(windows)), how).tolist()
        return out


def bi_encoder_scores(
    sf: SciFact,
    qids: Sequence[str],
    backend: Backend,
    encoder: TextEncoder,
    cfg: AppConfig,
    windows: bool,
) -> WindowScores:
    """Cosine of each query with each of its candidates (one truncated sequence, or every window)."""
    b = cfg.batching
    chunking = cfg.model_for("rerank").chunking
    doc_ids = sorted({d for q in qids for d in sf.candidates[q]})
    if windows:
        seqs, chunks = encoder.encode_windows(
            [sf.corpus[d] for d in doc_ids], chunking.overlap_tokens, chunking.max_chunks_per_document
        )
    else:
        seqs, chunks = encoder.encode([sf.corpus[d] for d in doc_ids]), ChunkMap.one_each(len(doc_ids))
    emb_d = run_bucketed(backend, seqs, b.buckets, b.max_batch_size, b.batch_slots)
    queries = encoder.encode([sf.queries[q] for q in qids])
    emb_q = run_bucketed(backend, queries, b.buckets, b.max_batch_size, b.batch_slots)
    bounds = np.searchsorted(chunks.owner, np.arange(len(doc_ids) + 1))
    rows = {d: (int(bounds[i]), int(bounds[i + 1])) for i, d in enumerate(doc_ids)}
    out = {}
    for i, q in enumerate(qids):
        out[q] = [(emb_d[slice(*rows[d])] @ emb_q[i]).astype(np.float64) for d in sf.candidates[q]]
    return WindowScores(out, len(seqs), len(doc_ids))


def offline_ranker(cfg: AppConfig, threads: int | None = None) -> tuple[Backend, TextEncoder]:
    """The configured ranker on ONNX Runtime (FP32) in this process, and its tokenizer as the service sets it."""
    from serve_app.backends.onnxruntime import OnnxRuntimeBackend, available_cores
    from serve_app.models.artifacts import resolve

    art = resolve(cfg.model_for("rerank"), cfg.artifacts_dir)
    encoder = TextEncoder(art.tokenizer_path, min(art.max_length, cfg.batching.buckets[-1]))
    # one forward at a time here (run_bucketed): it gets every core
    return OnnxRuntimeBackend(art.onnx_path, threads or available_cores()), encoder


def fused(sf: SciFact, model: dict[str, list[float]], fusion: FusionConfig | None) -> dict[str, list[float]]:
    """Each query's final scores: the model's, or fused with BM25's."""
    if fusion is None:
        return model
    return {q: fuse(s, sf.candidate_scores[q], fusion).tolist() for q, s in model.items()}


def quality(sf: SciFact, scores: dict[str, list[float]], qids: Iterable[str] | None = None) -> dict[str, float]:
    """NDCG@10 and MRR@10 of re-ranking each query's candidates by ``scores``."""
    qs = list(qids if qids is not None else scores)
    ranked = {q: rerank(sf.candidates[q], scores[q]) for q in qs}
    return {
        "ndcg@10": mean([ndcg_at_k(ranked[q], sf.qrels[q]) for q in qs]),
        "mrr@10": mean([mrr_at_k(ranked[q], sf.qrels[q]) for q in qs]),
    }


def bm25_scores(sf: SciFact, qids: Iterable[str]) -> dict[str, list[float]]:
    return {q: sf.candidate_scores[q] for q in qids}
