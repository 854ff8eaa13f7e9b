"""One ``@serve.batch`` queue per length bucket, so a batch never mixes (or pads to) other lengths.

``serve.batch`` keeps one queue per decorated function, so each bucket gets its own closure; the
queues are created inside the replica (they hold asyncio state) and retuned in place by
``reconfigure``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from serve_app.backends.base import Backend
from serve_app.batching.buckets import Encoded, bucket_for, pad_batch, slot_for
from serve_app.config import BatchingConfig

BatchObserver = Callable[[int, int], None]  # (bucket length, real rows in the batch)


@dataclass
class BucketStats:
    batches: int = 0
    sequences: int = 0
    max_rows: int = 0

    def as_dict(self) -> dict[str, float]:
        mean = self.sequences / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "sequences": self.sequences,
            "mean_batch_size": mean,
            "max_batch_size": self.max_rows,
        }


@dataclass
class BucketQueues:
    """Routes each sequence to its bucket's batch queue and returns that sequence's output row."""

    backend: Backend
    config: BatchingConfig
    observe: BatchObserver | None = None
    stats: dict[int, BucketStats] = field(default_factory=dict)
    _submit: dict[int, Callable[[Encoded], Awaitable[np.ndarray]]] = field(default_factory=dict)
    _device_lock: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def __post_init__(self) -> None:
        for length in self.config.buckets:
            self.stats[length] = BucketStats()
            self._submit[length] = self._make_queue(length)

    def _make_queue(self, length: int) -> Callable[[Encoded], Awaitable[np.ndarray]]:
        @serve.batch(max_batch_size=self.config.max_batch_size, batch_wait_timeout_s=self.config.batch_wait_timeout_s)
        async def submit(seqs: list[Encoded]) -> list[np.ndarray]:
            rows = slot_for(len(seqs), self.config.batch_slots) if self.backend.info.fixed_shapes else None
            batch = pad_batch(seqs, length, rows)
            # one forward at a time per replica: the runtime already uses every thread/SM it was given
            async with self._device_lock:
                out = await asyncio.to_thread(self.backend.infer, batch)
            s = self.stats[length]
            s.batches += 1
            s.sequences += len(seqs)
            s.max_rows = max(s.max_rows, len(seqs))
            if self.observe is not None:
                self.observe(length, len(seqs))
            return list(out)

        return submit

    def retune(self, config: BatchingConfig) -> None:
        """Apply new batch size / wait time without dropping queued sequences (same buckets only)."""
        for submit in self._submit.values():
            submit.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
            submit.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.config = config

    async def run(self, seqs: list[Encoded]) -> np.ndarray:
        buckets = self.config.buckets
        rows = await asyncio.gather(*(self._submit[bucket_for(len(s), buckets)](s) for s in seqs))
        return np.stack(rows)

    def shapes(self) -> list[tuple[int, int]]:
        """Every shape the backend can see: (slot, bucket) for fixed-shape backends, else one per bucket."""
        rows = self.config.batch_slots if self.backend.info.fixed_shapes else (1, self.config.max_batch_size)
        return [(r, length) for length in self.config.buckets for r in rows]
