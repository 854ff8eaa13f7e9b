"""What a re-ranking request carries through the ingress, whatever its client's shape (TEI, Cohere, search)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.api import schemas
from serve_app.core.sequences import Encoded
from serve_app.ranking.chunks import ChunkMap
from serve_app.rollout.agreement import rank_agreement


@dataclass(frozen=True)
class RerankInput:
    """What every re-ranking route asks."""

    query: str
    texts: list[str]
    truncate: bool
    raw_scores: bool
    chunking: bool | None  # None: the model's config decides
    first_stage: list[float] | None
    max_doc_tokens: int | None = None


@dataclass(frozen=True)
class RerankSequences:
    """A re-ranking request's sequences and which document each scored one belongs to."""

    encoded: list[Encoded]  # a bi-encoder's start with the query
    chunks: ChunkMap
    chunked: bool

    def documents_cut(self, pairs: bool) -> int:
        docs = self.encoded if pairs else self.encoded[1:]
        return len({int(d) for d, e in zip(self.chunks.owner.tolist(), docs, strict=True) if e.truncated})


@dataclass(frozen=True)
class Reranked:
    """One score per document (fused when first-stage scores were sent), and the model's own beside it."""

    scores: list[float]
    model_scores: list[float] | None
    usage: schemas.Usage

    def model(self, i: int) -> float | None:
        return None if self.model_scores is None else self.model_scores[i]

    def order(self, top_n: int | None = None) -> list[int]:
        """Document indices, best first (the first ``top_n``)."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])[:top_n]


def reranked_agreement(serving: Reranked, shadow: Reranked) -> float:
    """The model's own scores (before fusion, which both share) ranked alike?"""
    a = serving.model_scores if serving.model_scores is not None else serving.scores
    b = shadow.model_scores if shadow.model_scores is not None else shadow.scores
    return rank_agreement(np.asarray(a), np.asarray(b))
