"""Long documents as overlapping windows: where each window starts, and how a document's window scores
become one score.

A document longer than the largest bucket is otherwise cut there (71 % of SciFact abstracts are), and
whatever follows the cut is never seen. Chunking scores every window through the same bucketed batching
and aggregates per document (``max``: the best passage; ``mean``; ``first``: the truncated score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.config import ChunkAggregation


def window_spans(length: int, width: int, overlap: int, max_windows: int) -> tuple[list[tuple[int, int]], bool]:
    """``[start, end)`` spans of ``width`` tokens over ``length`` content tokens, each sharing ``overlap``
    tokens with the one before; at most ``max_windows``. Also whether the spans stop short of the end."""
    if width <= overlap:
        raise ValueError(f"a window of {width} tokens cannot overlap the previous one by {overlap}")
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + width, length)
        spans.append((start, end))
        if end >= length:
            return spans, False
        if len(spans) == max_windows:
            return spans, True
        start = end - overlap


@dataclass(frozen=True)
class ChunkMap:
    """Which document each scored sequence belongs to (``owner[i]``), for ``documents`` documents."""

    owner: np.ndarray  # int64 [sequences], non-decreasing
    documents: int

    @property
    def chunks(self) -> int:
        return int(self.owner.shape[0])

    @classmethod
    def one_each(cls, documents: int) -> ChunkMap:
        return cls(np.arange(documents, dtype=np.int64), documents)


def aggregate(scores: np.ndarray, chunks: ChunkMap, how: ChunkAggregation) -> np.ndarray:
    """One score per document from its windows' scores (float64, document order)."""
    s = np.asarray(scores, dtype=np.float64)
    if chunks.chunks == chunks.documents:
        return s
    if how == "first":
        first = np.searchsorted(chunks.owner, np.arange(chunks.documents), side="left")
        return s[first]
    if how == "mean":
        sums = np.bincount(chunks.owner, weights=s, minlength=chunks.documents)
        return sums / np.bincount(chunks.owner, minlength=chunks.documents)
    out = np.full(chunks.documents, -np.inf)
    np.maximum.at(out, chunks.owner, s)
    return out
