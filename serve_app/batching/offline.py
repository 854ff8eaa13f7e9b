"""Bucketed batch inference outside Serve (scripts, the validation gate): the same buckets and padding."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from serve_app.backends.base import Backend
from serve_app.batching.buckets import Encoded, bucket_for, pad_batch, slot_for


def run_bucketed(
    backend: Backend,
    seqs: list[Encoded],
    buckets: tuple[int, ...],
    batch_size: int,
    batch_slots: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Outputs for ``seqs`` in input order; each model call holds one bucket's sequences only."""
    by_bucket: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        by_bucket[bucket_for(len(s), buckets)].append(i)
    out: np.ndarray | None = None
    for bucket_len, idx in sorted(by_bucket.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            rows = slot_for(len(chunk), batch_slots) if backend.info.fixed_shapes and batch_slots else None
            y = backend.infer(pad_batch([seqs[i] for i in chunk], bucket_len, rows))
            if out is None:
                out = np.zeros((len(seqs), y.shape[1]), dtype=np.float32)
            out[chunk] = y
    assert out is not None, "no sequences"
    return out
