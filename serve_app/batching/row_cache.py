"""A bounded LRU of model output rows, keyed by a sequence's content, for one loaded model version.

Search and recommendation traffic sends the same candidates again and again (a popular item, the next page
of the same query). A bi-encoder's row is a document's embedding, whatever the query; a cross-encoder's
row is one (query, document) pair's logit, and the pair's tokens hold both. So the key is a hash of the
sequence's token and type ids, which is also exactly what decides the row: the same text cut or windowed
differently is another key. Each ``LoadedModel`` owns its cache and a swap starts an empty one, so a score
is never served by a version that did not compute it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from serve_app.core.sequences import Sequences


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0

    def as_dict(self, entries: int, max_entries: int) -> dict[str, float | int]:
        return {
            "max_entries": max_entries,
            "entries": entries,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
        }


def sequence_keys(seqs: Sequences) -> list[bytes]:
    """A 128-bit BLAKE2b digest of each sequence's token ids and type ids."""
    ids, types, offsets = seqs.ids, seqs.type_ids, seqs.offsets.tolist()
    keys = []
    for a, b in itertools.pairwise(offsets):
        h = hashlib.blake2b(ids[a:b].tobytes(), digest_size=16)
        h.update(types[a:b].tobytes())
        keys.append(h.digest())
    return keys


class RowCache:
    """Output rows by sequence key; the least recently used entry goes first once ``max_entries`` are held."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, keys: list[bytes]) -> list[np.ndarray | None]:
        rows = self._rows
        found: list[np.ndarray | None] = []
        for k in keys:
            row = rows.get(k)
            if row is not None:
                rows.move_to_end(k)
            found.append(row)
        self.stats.lookups += len(keys)
        self.stats.hits += sum(r is not None for r in found)
        return found

    def store(self, keys: list[bytes], rows: np.ndarray) -> None:
        for k, row in zip(keys, rows, strict=True):
            self._rows[k] = row.copy()  # not a view: it must not keep the whole batch's output alive
            self._rows.move_to_end(k)
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        while len(self._rows) > max_entries:
            self._rows.popitem(last=False)

    def as_dict(self) -> dict[str, float | int]:
        return self.stats.as_dict(len(self._rows), self.max_entries)
