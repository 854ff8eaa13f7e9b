"""Ranking metrics with binary or graded relevance (BEIR / pytrec_eval definitions)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def rerank(doc_ids: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Sort by score, highest first; ties keep the candidate order (stable), as the service does."""
    order = sorted(range(len(doc_ids)), key=lambda i: -scores[i])
    return [doc_ids[i] for i in order]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
