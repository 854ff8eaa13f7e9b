"""Sequence-length buckets: every batch is padded to its bucket's length, never to a longer one."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from serve_app.core.sequences import Encoded, PaddedBatch


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``length`` tokens (the tokenizer already truncated to the largest)."""
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def bucket_lengths(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """``bucket_for`` of many lengths at once: what each sequence costs once padded (the token budget's unit)."""
    edges = np.asarray(buckets)
    idx = np.searchsorted(edges, lengths, side="left")
    if len(idx) and int(idx.max()) >= len(edges):
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds the largest bucket {buckets[-1]}")
    return edges[idx]


def slot_for(rows: int, slots: tuple[int, ...]) -> int:
    """The smallest fixed batch size that holds ``rows`` (for backends that run fixed shapes)."""
    i = bisect.bisect_left(slots, rows)
    if i == len(slots):
        raise ValueError(f"batch of {rows} exceeds the largest batch slot {slots[-1]}")
    return slots[i]


def pad_batch(seqs: Sequence[Encoded], bucket_len: int, batch_rows: int | None = None) -> PaddedBatch:
    """Right-pad ``seqs`` to ``bucket_len`` tokens; add all-padding rows up to ``batch_rows``.

    A padded row has attention_mask 0 everywhere; the model's output for it is discarded.
    """
    rows = len(seqs)
    total = rows if batch_rows is None else batch_rows
    if total < rows:
        raise ValueError("batch_rows is smaller than the number of sequences")
    ids = np.zeros((total, bucket_len), dtype=np.int64)
    mask = np.zeros((total, bucket_len), dtype=np.int64)
    types = np.zeros((total, bucket_len), dtype=np.int64)
    for r, s in enumerate(seqs):
        n = len(s)
        if n > bucket_len:
            raise ValueError(f"sequence of {n} tokens does not fit bucket {bucket_len}")
        ids[r, :n] = s.ids
        mask[r, :n] = 1
        types[r, :n] = s.type_ids
    return PaddedBatch(ids, mask, types, rows)
