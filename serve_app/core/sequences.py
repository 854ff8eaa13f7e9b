"""Tokenized sequences: one at a time (``Encoded``), packed per request for the wire (``Sequences``),
and padded into a model batch (``PaddedBatch``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """One tokenized sequence (a text, or a query/document pair for a cross-encoder)."""

    ids: np.ndarray  # int [n]
    type_ids: np.ndarray  # int [n]
    truncated: bool

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class SequenceGroup(Protocol):
    """What batching reads from a request: a sized, iterable group of sequences (a list, or ``Sequences``)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Encoded]: ...


@dataclass(frozen=True)
class Sequences:
    """A request's sequences packed into four flat arrays.

    This is what crosses the actor hop from the ingress to a model replica: four numpy buffers
    pickle in microseconds, where a list of per-sequence objects costs one pickle frame each.
    """

    ids: np.ndarray  # int32 [total tokens], the sequences back to back
    type_ids: np.ndarray  # int8 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]: sequence i is ids[offsets[i]:offsets[i + 1]]
    truncated: np.ndarray  # bool [n]

    @classmethod
    def pack(cls, seqs: Sequence[Encoded]) -> Sequences:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if seqs:
            ids = np.concatenate([s.ids for s in seqs]).astype(np.int32, copy=False)
            types = np.concatenate([s.type_ids for s in seqs]).astype(np.int8, copy=False)
        else:
            ids, types = np.zeros(0, np.int32), np.zeros(0, np.int8)
        truncated = np.fromiter((s.truncated for s in seqs), dtype=bool, count=len(seqs))
        return cls(ids, types, offsets, truncated)

    @classmethod
    def concat(cls, groups: Sequence[Sequences]) -> Sequences:
        """Several requests' sequences as one group, in order (``split_rows`` undoes it on the outputs)."""
        if len(groups) == 1:
            return groups[0]
        starts = np.cumsum([0] + [g.total_tokens for g in groups[:-1]])
        offsets = np.concatenate([[0]] + [g.offsets[1:] + s for g, s in zip(groups, starts, strict=True)])
        return cls(
            np.concatenate([g.ids for g in groups]),
            np.concatenate([g.type_ids for g in groups]),
            offsets.astype(np.int64),
            np.concatenate([g.truncated for g in groups]),
        )

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> Encoded:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Encoded(self.ids[a:b], self.type_ids[a:b], bool(self.truncated[i]))

    def __iter__(self) -> Iterator[Encoded]:
        return (self[i] for i in range(len(self)))

    def select(self, start: int, stop: int) -> Sequences:
        """Sequences ``start..stop`` as their own packed request (used to split an over-budget request)."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return Sequences(
            self.ids[a:b], self.type_ids[a:b], self.offsets[start : stop + 1] - a, self.truncated[start:stop]
        )

    def take(self, rows: Sequence[int]) -> Sequences:
        """Sequences ``rows`` (in that order) as their own packed group (the cache misses of a batch item)."""
        return Sequences.pack([self[i] for i in rows])

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])


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

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def feeds(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


def split_rows(rows: np.ndarray, groups: Sequence[Sequences]) -> list[np.ndarray]:
    """Output rows of ``Sequences.concat(groups)`` back into one array per group."""
    if len(groups) == 1:
        return [rows]
    return np.split(rows, np.cumsum([len(g) for g in groups[:-1]]))
