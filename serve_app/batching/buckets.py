"""Sequence-length buckets: every batch is padded to its bucket's length, never to a longer one."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """One tokenized sequence (a text, or a query/document pair for a cross-encoder)."""

    ids: np.ndarray  # int64 [n]
    type_ids: np.ndarray  # int64 [n]
    truncated: bool

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class PaddedBatch:
    """Model inputs of one bucket; ``rows`` real sequences, padded up to ``input_ids.shape[0]`` rows."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])

    def feeds(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``length`` tokens (the tokenizer already truncated to the largest)."""
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def slot_for(rows: int, slots: tuple[int, ...]) -> int:
    """The smallest fixed batch size that holds ``rows`` (for backends that run fixed shapes)."""
    i = bisect.bisect_left(slots, rows)
    if i == len(slots):
        raise ValueError(f"batch of {rows} exceeds the largest batch slot {slots[-1]}")
    return slots[i]


def pad_batch(seqs: list[Encoded], bucket_len: int, batch_rows: int | None = None) -> PaddedBatch:
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
