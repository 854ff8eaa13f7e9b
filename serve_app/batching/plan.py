"""From requests to forwards: group every sequence by length bucket, cut each bucket into batches of at
most ``max_rows`` rows, pad, run, and scatter the output rows back to their requests.

A dynamic-shape backend (ONNX Runtime) pads a forward to its longest sequence, so a forward of mixed lengths
is cut once more where the padded tokens saved outweigh what one more forward costs (``length_groups``;
the cost is the backend's figure, ``BackendInfo.forward_cost_tokens``, which ``measure_forward_cost`` checks).

The same code serves online batches (many requests per ``@serve.batch`` call) and offline runs
(scripts, the validation gate), so both pad and bucket identically.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from serve_app.batching.buckets import bucket_for, pad_batch, slot_for
from serve_app.core.backend import Backend
from serve_app.core.sequences import Encoded, PaddedBatch, SequenceGroup


@dataclass
class RunStats:
    """What one run cost: the figures behind mean batch size and padding efficiency."""

    forwards: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # rows x bucket length actually computed, slot padding rows included
    backend_s: float = 0.0  # the backend's own time in the forwards (inside the device lock), summed

    def add(self, other: RunStats) -> None:
        self.forwards += other.forwards
        self.sequences += other.sequences
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.backend_s += other.backend_s


@dataclass(frozen=True)
class ForwardStats:
    """One forward, as metrics see it."""

    bucket: int
    rows: int  # real sequences
    real_tokens: int
    padded_tokens: int  # rows x length actually computed, slot padding rows included
    seconds: float  # the backend's own time (inside the device lock)


def length_groups(lengths: Sequence[int], forward_cost: int) -> list[tuple[int, int]]:
    """``[start, end)`` groups of an ascending list of lengths, each to be padded to its own longest.

    A group is cut in two where that saves more padded tokens than ``forward_cost`` (what one more forward
    costs, in tokens), and each half is considered again. Cuts fall only between different lengths.
    """

    def split(lo: int, hi: int) -> list[tuple[int, int]]:
        longest = lengths[hi - 1]
        best, best_saving = 0, forward_cost
        for k in range(lo + 1, hi):
            if lengths[k - 1] != lengths[k]:
                saving = (k - lo) * (longest - lengths[k - 1])  # rows before k no longer padded to the longest
                if saving > best_saving:
                    best, best_saving = k, saving
        return split(lo, best) + split(best, hi) if best else [(lo, hi)]

    return split(0, len(lengths)) if len(lengths) else []


def forward_cost_of(backend: Backend, configured: int | None) -> int | None:
    """The configured forward cost, else the backend's own (``None``: forwards are never cut by length)."""
    return configured if configured is not None else backend.info.forward_cost_tokens


def measure_forward_cost(backend: Backend, length: int, rows: int, rounds: int = 5) -> int:
    """What one more forward costs on ``backend``, in padded tokens at ``length``: two forwards of half the rows
    against one of all of them (the fixed part is what the split pays twice). The fastest of ``rounds`` runs
    counts: work running beside it (another model loading) only ever adds time."""
    half = max(1, rows // 2)
    full = 2 * half

    def timed(n: int) -> float:
        z = np.zeros((n, length), dtype=np.int64)
        batch = PaddedBatch(z, np.ones_like(z), z, n)
        started = time.perf_counter()
        backend.infer(batch)
        return time.perf_counter() - started

    timed(full)  # both shapes once untimed: first runs allocate
    timed(half)
    t_full, t_half = [], []
    for _ in range(rounds):
        t_full.append(timed(full))
        t_half.append(timed(half))
    fixed = 2 * min(t_half) - min(t_full)
    per_token = (min(t_full) - fixed) / (full * length)
    return int(max(0.0, fixed / per_token)) if per_token > 0 else full * length


def run_forwards(
    backend: Backend,
    requests: Sequence[SequenceGroup],
    buckets: tuple[int, ...],
    max_rows: int,
    batch_slots: tuple[int, ...] | None = None,
    device_lock: threading.Semaphore | None = None,
    on_forward: Callable[[ForwardStats], None] | None = None,
    forward_cost: int | None = None,
    pool: Executor | None = None,
) -> tuple[list[np.ndarray], RunStats]:
    """Outputs for every request (``[len(request), width]``, input order), and what the run cost.

    Each forward holds one bucket's sequences only, from any number of requests, and is padded to that
    bucket (fixed shapes) or to its longest sequence within the bucket (dynamic shapes); ``device_lock`` is
    held around each forward only, so padding the next batch overlaps the current forward.
    ``forward_cost`` (dynamic shapes; tokens): cut a forward by length where that saves more padding than
    this; ``None`` cuts by ``max_rows`` only. ``pool``: a run of several forwards hands them to it, largest
    first, so they run side by side (a backend that takes ``concurrency`` > 1 forwards at once).
    ``on_forward`` is called after each forward (metrics).
    """
    by_bucket: dict[int, list[tuple[int, int, Encoded]]] = defaultdict(list)
    for r, request in enumerate(requests):
        for i, seq in enumerate(request):
            by_bucket[bucket_for(len(seq), buckets)].append((r, i, seq))
    slots = batch_slots if backend.info.fixed_shapes else None
    planned: list[tuple[int, list[tuple[int, int, Encoded]], PaddedBatch]] = []
    for bucket, entries in sorted(by_bucket.items()):
        if not slots:
            entries.sort(key=lambda e: len(e[2]))  # similar lengths share a forward
        chunks = [entries[start : start + max_rows] for start in range(0, len(entries), max_rows)]
        if not slots and forward_cost is not None:
            chunks = [
                chunk[lo:hi] for chunk in chunks for lo, hi in length_groups([len(e[2]) for e in chunk], forward_cost)
            ]
        for chunk in chunks:
            # fixed shapes: the bucket; dynamic shapes (ONNX Runtime): the longest sequence of the forward, which
            # measured faster on the CPU than rounding it up to a multiple of 8
            length = bucket if slots else max(len(e[2]) for e in chunk)
            batch = pad_batch([seq for _, _, seq in chunk], length, slot_for(len(chunk), slots) if slots else None)
            planned.append((bucket, chunk, batch))
    lock: AbstractContextManager[object] = device_lock if device_lock is not None else nullcontext()

    def forward(batch: PaddedBatch) -> tuple[np.ndarray, float]:
        with lock:
            started = time.perf_counter()
            y = backend.infer(batch)
            return y, time.perf_counter() - started

    batches = [batch for _, _, batch in planned]
    if pool is not None and len(batches) > 1:
        order = sorted(range(len(batches)), key=lambda k: -batches[k].shape[0] * batches[k].shape[1])
        futures = {k: pool.submit(forward, batches[k]) for k in order}
        results = [futures[k].result() for k in range(len(batches))]
    else:
        results = [forward(batch) for batch in batches]
    outputs: list[np.ndarray | None] = [None] * len(requests)
    stats = RunStats()
    for (bucket, chunk, batch), (y, seconds) in zip(planned, results, strict=True):
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
        stats.backend_s += seconds
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
    cost = forward_cost_of(backend, None)
    (out,), _ = run_forwards(backend, [seqs], buckets, batch_size, batch_slots, forward_cost=cost)
    return out
