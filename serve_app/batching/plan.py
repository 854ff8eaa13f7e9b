"""From requests to forwards: group every sequence by length bucket, cut each bucket into batches of at
most ``max_rows`` rows, pad, run, and scatter the output rows back to their requests.

The same code serves online batches (many requests per ``@serve.batch`` call) and offline runs
(scripts, the validation gate), so both pad and bucket identically.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from serve_app.batching.buckets import bucket_for, pad_batch, slot_for
from serve_app.core.backend import Backend
from serve_app.core.sequences import Encoded, SequenceGroup


@dataclass
class RunStats:
    """What one run cost: the figures behind mean batch size and padding efficiency."""

    forwards: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # rows x bucket length actually computed, slot padding rows included

    def add(self, other: RunStats) -> None:
        self.forwards += other.forwards
        self.sequences += other.sequences
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens


@dataclass(frozen=True)
class ForwardStats:
    """One forward, as metrics see it."""

    bucket: int
    rows: int  # real sequences
    real_tokens: int
    padded_tokens: int  # rows x length actually computed, slot padding rows included
    seconds: float  # the backend's own time (inside the device lock)


def run_forwards(
    backend: Backend,
    requests: Sequence[SequenceGroup],
    buckets: tuple[int, ...],
    max_rows: int,
    batch_slots: tuple[int, ...] | None = None,
    device_lock: threading.Semaphore | None = None,
    on_forward: Callable[[ForwardStats], None] | None = None,
) -> tuple[list[np.ndarray], RunStats]:
    """Outputs for every request (``[len(request), width]``, input order), and what the run cost.

    Each forward holds one bucket's sequences only, from any number of requests, and is padded to that
    bucket (fixed shapes) or to its longest sequence within the bucket (dynamic shapes); ``device_lock`` is
    held around each forward only, so padding the next batch overlaps the current forward.
    ``on_forward`` is called after each forward with what it cost (metrics).
    """
    by_bucket: dict[int, list[tuple[int, int, Encoded]]] = defaultdict(list)
    for r, request in enumerate(requests):
        for i, seq in enumerate(request):
            by_bucket[bucket_for(len(seq), buckets)].append((r, i, seq))
    outputs: list[np.ndarray | None] = [None] * len(requests)
    stats = RunStats()
    slots = batch_slots if backend.info.fixed_shapes else None
    lock: AbstractContextManager[object] = device_lock if device_lock is not None else nullcontext()
    for bucket, entries in sorted(by_bucket.items()):
        if not slots:
            entries.sort(key=lambda e: len(e[2]))  # similar lengths share a forward
        for start in range(0, len(entries), max_rows):
            chunk = entries[start : start + max_rows]
            # fixed shapes: the bucket; dynamic shapes (ONNX Runtime): the longest sequence of the forward, which
            # measured faster on the CPU than rounding it up to a multiple of 8
            length = bucket if slots else max(len(e[2]) for e in chunk)
            batch = pad_batch([seq for _, _, seq in chunk], length, slot_for(len(chunk), slots) if slots else None)
            with lock:
                started = time.perf_counter()
                y = backend.infer(batch)
                seconds = time.perf_counter() - started
            for (r, i, _), row in zip(chunk, y, strict=True):
                out = outputs[r]
                if out is None:
                    out = outputs[r] = np.empty((len(requests[r]), y.shape[1]), dtype=np.float32)
                out[i] = row
            real, padded = batch.real_tokens, batch.shape[0] * batch.shape[1]
            stats.forwards += 1
            stats.sequences += len(chunk)
            stats.real_tokens += real
            stats.padded_tokens += padded
            if on_forward is not None:
                on_forward(ForwardStats(bucket, len(chunk), real, padded, seconds))
    return [o if o is not None else np.zeros((0, 0), np.float32) for o in outputs], stats


def run_bucketed(
    backend: Backend,
    seqs: SequenceGroup,
    buckets: tuple[int, ...],
    batch_size: int,
    batch_slots: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Offline: outputs for ``seqs`` in input order, batched and padded exactly as the service does."""
    if not seqs:
        raise ValueError("no sequences")
    (out,), _ = run_forwards(backend, [seqs], buckets, batch_size, batch_slots)
    return out
