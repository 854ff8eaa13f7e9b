"""Whole requests into ``@serve.batch`` calls under a token budget, run on one backend.

One batch item is a request (or, past the budget, a part of one), not a sequence: a 20-document
re-rank costs one future and one queue entry instead of 21. ``batch_size_fn`` bounds a batch by its
padded tokens, so short single-text requests pack by the hundred and long documents by a few.

``@serve.batch`` forms the next batch as soon as the previous one is *formed*, not when it is done:
with ``batch_wait_timeout_s: 0`` and one batch at a time, every request became its own batch and
waited for a free slot (measured: 1.1 requests per batch at 16 concurrent callers). So requests
wait at a gate while every slot computes and enter ``@serve.batch`` together when one frees: a batch
takes whatever arrived while the previous one ran (continuous batching, as TEI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from ray import serve

from serve_app.batching.buckets import bucket_lengths
from serve_app.batching.plan import ForwardStats, RunStats, forward_cost_of, run_forwards
from serve_app.config import BatchingConfig
from serve_app.core.backend import Backend, DeadlineExceeded, StartedLate, refuses_late
from serve_app.core.sequences import Sequences
from serve_app.core.timing import ModelTiming

# the metrics Ray Serve's ``_BatchQueue`` records per batch (ray 2.60: ``python/ray/serve/batching.py``)
SERVE_BATCH_METRICS = (
    "_batch_wait_time_histogram",
    "_batch_execution_time_histogram",
    "_batch_queue_length_gauge",
    "_batch_utilization_histogram",
    "_batch_size_histogram",
    "_batches_processed_counter",
)


class _NoMetric:
    """Takes a Ray metric's records and drops them."""

    def observe(self, *args: object, **kwargs: object) -> None:
        pass

    def set(self, *args: object, **kwargs: object) -> None:
        pass

    def inc(self, *args: object, **kwargs: object) -> None:
        pass


class ServeBatchMetrics:
    """Ray Serve's own per-batch metrics of one ``@serve.batch`` queue, on or off: Ray has no switch for them,
    so off swaps the queue's metric objects for no-ops and on puts them back."""

    def __init__(self, enqueue: Any) -> None:
        self._enqueue = enqueue
        self._saved: dict[str, Any] | None = None  # Ray's metric objects while they are swapped out

    def apply(self, on: bool) -> bool:
        """Whether Ray's metrics are recorded from now on (still True if this Ray keeps them elsewhere). Must
        run on the event loop that serves: the queue is created on first use, with its task on that loop."""
        wrapper = getattr(getattr(self._enqueue, "set_max_batch_size", None), "__self__", None)
        queue = getattr(wrapper, "queue", None)
        if queue is None or not all(hasattr(queue, name) for name in SERVE_BATCH_METRICS):
            return True
        if on and self._saved is not None:
            for name, metric in self._saved.items():
                setattr(queue, name, metric)
            self._saved = None
        elif not on and self._saved is None:
            self._saved = {name: getattr(queue, name) for name in SERVE_BATCH_METRICS}
            for name in SERVE_BATCH_METRICS:
                setattr(queue, name, _NoMetric())
        return on


class BatchObserver(Protocol):
    """Where the batcher reports what it did (the deployment's metrics)."""

    def queued(self, wait_s: float) -> None:
        """A batch item waited ``wait_s`` from submission to the start of its batch."""

    def forward(self, stats: ForwardStats) -> None:
        """A forward ran (called on the worker thread)."""


@dataclass(eq=False)
class _Part:
    seqs: Sequences
    cost: int  # padded tokens
    submitted: float  # time.monotonic() at submit
    deadline: float = math.inf  # time.time() past which nobody waits for this part's rows
    start_by: float = math.inf  # time.time() past which its caller refuses it rather than wait (overload)
    formed: bool = False  # set when a batch takes it (computed, or dropped as expired)
    finished: float = 0.0  # time.monotonic() when its batch's forwards were done
    inference_s: float = 0.0  # the backend's own time in them (waiting for the device not included)


def _batch_cost(parts: list[_Part]) -> int:
    return sum(p.cost for p in parts)


def _timing(parts: list[_Part]) -> ModelTiming:
    """The backend's time in the batches that computed the parts (one each: a part fills a batch's budget), and
    the rest of their time here: waiting for a batch, for the device, for the other parts, padding."""
    here = max(p.finished for p in parts) - min(p.submitted for p in parts)
    inference = min(here, sum(p.inference_s for p in parts))
    return ModelTiming(queue_s=here - inference, inference_s=inference)


# how long a replica holds queued requests to their start-by times after the latest call whose ingress did
# (it does so only while refusing in earnest: ``Admission.holds_start_by``), about that judgement's window
START_BY_HOLD_S = 0.25


def _missed(part: _Part, wall: float, start_by_held: bool, late_refusal_s: float) -> RuntimeError | None:
    """Why ``part`` is not computed in a batch formed at ``wall`` (``time.time()``), or None if it is."""
    if part.deadline <= wall:
        return DeadlineExceeded()
    if start_by_held and refuses_late(part.start_by, wall, late_refusal_s):
        return StartedLate()
    return None


@dataclass
class BatchingStats:
    batches: int = 0
    requests: int = 0  # batch items: a request, or a part of one over the token budget
    expired: int = 0  # batch items dropped uncomputed: their deadline had passed when their batch formed
    late: int = 0  # batch items dropped uncomputed: their start-by time (overload) had passed then
    # batch items dropped uncomputed because their caller left first: the call was cancelled (client gone, or
    # the ingress's deadline passed and Serve carried the cancel here, as its gRPC transport does at once)
    cancelled: int = 0
    run: RunStats = field(default_factory=RunStats)

    def as_dict(self) -> dict[str, Any]:
        r = self.run
        return {
            "batches": self.batches,
            "requests": self.requests,
            "expired": self.expired,
            "late": self.late,
            "cancelled": self.cancelled,
            "forwards": r.forwards,
            "sequences": r.sequences,
            "real_tokens": r.real_tokens,
            "padded_tokens": r.padded_tokens,
            "mean_requests_per_batch": self.requests / self.batches if self.batches else 0.0,
            "mean_rows_per_forward": r.sequences / r.forwards if r.forwards else 0.0,
            "padding_efficiency": r.real_tokens / r.padded_tokens if r.padded_tokens else 0.0,
        }


class RequestBatcher:
    """Submits a request's sequences, returns their output rows; owns the queue and its statistics."""

    def __init__(self, backend: Backend, config: BatchingConfig, observer: BatchObserver | None = None) -> None:
        self.backend = backend
        self.config = config
        self.stats = BatchingStats()
        self._observer = observer
        concurrency = max(1, backend.info.concurrency)
        self._device = threading.BoundedSemaphore(concurrency)
        # a batch of several forwards runs them side by side where the backend takes more than one at once
        self._pool = ThreadPoolExecutor(concurrency, "forward") if concurrency > 1 else None
        self._running = 0  # batches computing now
        self._slot_free = asyncio.Event()  # set while fewer than max_concurrent_batches compute
        self._slot_free.set()
        self.forward_cost = forward_cost_of(backend, config.forward_cost_tokens)
        self.serve_batch_metrics: bool | None = None  # whether Ray's own are recorded; None: set at the next submit
        self._start_by_held_until = 0.0  # time.monotonic() until which start-by times are held to

        async def run_batch(parts: list[_Part]) -> list[np.ndarray | RuntimeError]:
            return await self._run(parts)

        self._enqueue = serve.batch(
            max_batch_size=config.max_batch_tokens,
            batch_wait_timeout_s=config.batch_wait_timeout_s,
            max_concurrent_batches=config.max_concurrent_batches,
            batch_size_fn=_batch_cost,
        )(run_batch)
        self._ray_metrics = ServeBatchMetrics(self._enqueue)

    def retune(self, config: BatchingConfig) -> None:
        """New token budget and wait in place, without dropping queued requests."""
        self._enqueue.set_max_batch_size(config.max_batch_tokens)  # type: ignore[attr-defined]
        self._enqueue.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.forward_cost = forward_cost_of(self.backend, config.forward_cost_tokens)
        self.config = config
        self.serve_batch_metrics = None  # ray_batch_metrics applies at the next submit, on the serving loop

    def _split(
        self, seqs: Sequences, costs: np.ndarray, deadline: float = math.inf, start_by: float = math.inf
    ) -> list[_Part]:
        budget = self.config.max_batch_tokens
        total = int(costs.sum())
        now = time.monotonic()
        if total <= budget:
            return [_Part(seqs, total, now, deadline, start_by)]
        parts: list[_Part] = []
        start, acc = 0, 0
        for i, c in enumerate(costs.tolist()):
            if acc + c > budget:
                parts.append(_Part(seqs.select(start, i), acc, now, deadline, start_by))
                start, acc = i, 0
            acc += c
        parts.append(_Part(seqs.select(start, len(seqs)), acc, now, deadline, start_by))
        return parts

    async def submit(self, seqs: Sequences, deadline: float = math.inf, start_by: float = math.inf) -> np.ndarray:
        """Output rows ``[len(seqs), width]`` in input order. If the batch that would compute them forms after
        ``deadline`` (``time.time()``), ``DeadlineExceeded``; after ``start_by`` while those are held to
        (``hold_start_by``), ``StartedLate``: either way they are not computed.

        A caller that goes away (its task cancelled) is dropped from its batch too: ``@serve.batch`` skips
        cancelled futures when it forms a batch.
        """
        rows, _ = await self.submit_timed(seqs, deadline, start_by)
        return rows

    async def submit_timed(
        self, seqs: Sequences, deadline: float = math.inf, start_by: float = math.inf
    ) -> tuple[np.ndarray, ModelTiming]:
        """``submit``, and how long the backend computed its rows' batches and the rest of its time here."""
        if self.serve_batch_metrics is None:  # the first submit since the config changed, on the serving loop
            self.serve_batch_metrics = self._ray_metrics.apply(self.config.ray_batch_metrics)
        parts = self._split(seqs, bucket_lengths(seqs.lengths(), self.config.buckets), deadline, start_by)
        try:
            while not self._slot_free.is_set():  # every slot computes: queue here, join the next batch together
                await self._wait_for_slot(start_by)
            if len(parts) == 1:
                out = await self._enqueue(parts[0])
                if isinstance(out, RuntimeError):
                    raise out
                return out, _timing(parts)
            outs = await asyncio.gather(*(self._enqueue(p) for p in parts))
        except asyncio.CancelledError:
            self.stats.cancelled += sum(not p.formed for p in parts)
            raise
        computed = [o for o in outs if not isinstance(o, RuntimeError)]
        if len(computed) < len(outs):
            raise next(o for o in outs if isinstance(o, RuntimeError))
        return np.concatenate(computed), _timing(parts)

    async def _run(self, parts: list[_Part]) -> list[np.ndarray | RuntimeError]:
        """The batch's outputs; for each part whose deadline or start-by time has passed, the error its caller
        gets instead (not computed)."""
        wall = time.time()
        for p in parts:
            p.formed = True
        held = self.holds_start_by()
        window = self.config.overload_late_refusal_s
        if any(p.deadline <= wall or (held and refuses_late(p.start_by, wall, window)) for p in parts):
            missed = {id(p): _missed(p, wall, held, window) for p in parts}
            live = [p for p in parts if missed[id(p)] is None]
            self.stats.expired += sum(isinstance(e, DeadlineExceeded) for e in missed.values())
            self.stats.late += sum(isinstance(e, StartedLate) for e in missed.values())
            computed = iter(await self._run(live) if live else [])
            return [e if (e := missed[id(p)]) is not None else next(computed) for p in parts]
        c = self.config
        observer = self._observer
        if observer is not None:
            now = time.monotonic()
            for p in parts:
                observer.queued(now - p.submitted)
        self._running += 1
        if self._running >= c.max_concurrent_batches:
            self._slot_free.clear()
        started = time.monotonic()
        try:
            outputs: list[np.ndarray]
            outputs, run = await asyncio.to_thread(
                run_forwards,
                self.backend,
                [p.seqs for p in parts],
                c.buckets,
                c.max_batch_size,
                c.batch_slots,
                self._device,
                observer.forward if observer is not None else None,
                self.forward_cost,
                self._pool,
            )
        finally:
            self._running -= 1
            if self._running < c.max_concurrent_batches:
                self._slot_free.set()
        finished = time.monotonic()
        inference_s = min(run.backend_s, finished - started)  # forwards side by side: their sum overstates
        for p in parts:
            p.finished, p.inference_s = finished, inference_s
        self.stats.batches += 1
        self.stats.requests += len(parts)
        self.stats.run.add(run)
        return list(outputs)

    async def _wait_for_slot(self, start_by: float) -> None:
        """Wait at the gate until a slot frees; while start-by times are held to, ``StartedLate`` as soon as
        ``start_by`` passes (its caller hears at once, not when the batch it would have joined has computed).
        One woken past its time by more than ``overload_late_refusal_s`` (held to it only then) waits on."""
        window = self.config.overload_late_refusal_s
        if start_by == math.inf or not self.holds_start_by() or time.time() > start_by + window:
            await self._slot_free.wait()
            return
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(self._slot_free.wait(), max(0.0, start_by - time.time()))
            return
        if self.holds_start_by() and refuses_late(start_by, time.time(), window):
            self.stats.late += 1
            raise StartedLate()

    def hold_start_by(self) -> None:
        """A call came from an ingress refusing in earnest: hold queued requests to their start-by times for
        ``START_BY_HOLD_S`` (those queued before it, too: they would start later than any that follow)."""
        if not self.holds_start_by() and not self._slot_free.is_set():  # wake the gate's waiters to wait again,
            self._slot_free.set()  # now held to their start-by times (each wakes, sees no slot and waits again)
            self._slot_free.clear()
        self._start_by_held_until = time.monotonic() + START_BY_HOLD_S

    def holds_start_by(self) -> bool:
        return time.monotonic() < self._start_by_held_until

    def close(self) -> None:
        """Stops the forward threads (after the forwards handed to them); the batcher takes no more batches."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def shapes(self) -> list[tuple[int, int]]:
        """Every shape the backend can see: (slot, bucket) for fixed-shape backends, else two per bucket."""
        c = self.config
        rows = c.batch_slots if self.backend.info.fixed_shapes else (1, c.max_batch_size)
        return [(r, length) for length in c.buckets for r in rows]

    def as_dict(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "forward_cost_tokens": self.forward_cost}
