"""The model deployments: a batched encoder (``EncoderServer``) and its two tasks, ranking and intent.

A call carries one request's sequences packed as numpy arrays (``Sequences``) and returns numbers
(scores, or top-k label indices and probabilities), so both directions of the hop stay small.

Everything model-specific arrives through ``user_config``: every registered version of the task
(``TaskServingConfig``). ``reconfigure`` builds each new version (artifacts → backend → warm-up of every
bucket → its probe check against the stored FP32 reference) *beside* the serving ones, and it takes calls
only when it is ready; a replaced version finishes its in-flight batches before it is closed, so a
version swap fails no request. Which version answers a call is the caller's choice (``version``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import ray

from serve_app.backends.gpu_budget import check_budget, process_gpu_bytes
from serve_app.backends.select import select_backend
from serve_app.batching.batcher import RequestBatcher
from serve_app.batching.row_cache import RowCache, sequence_keys
from serve_app.config import ModelServingConfig, Precision, TaskServingConfig
from serve_app.core.backend import Backend, DeadlineExceeded, StartedLate, VersionNotReady, refuses_late
from serve_app.core.peer_clocks import PeerClocks
from serve_app.core.sequences import Sequences, split_rows
from serve_app.core.timing import UNTIMED, ModelTiming
from serve_app.core.versions import ModelKey
from serve_app.deployments.pauses import PROCESS_PAUSES
from serve_app.deployments.python_gc import apply_python_gc
from serve_app.deployments.replicas import node_id, replica_id
from serve_app.deployments.telemetry import ModelObserver, ServedModel, model_metrics
from serve_app.engine.probe_check import ProbeCheck, check_backend, probe_reference
from serve_app.models.artifacts import ModelArtifacts, resolve

log = logging.getLogger("ray.serve")


class _Call(Protocol):
    @property
    def seqs(self) -> Sequences: ...

    @property
    def deadline(self) -> float: ...

    @property
    def start_by(self) -> float: ...

    @property
    def held(self) -> bool: ...

    @property
    def model(self) -> ModelKey | None: ...

    @property
    def sent_from(self) -> str | None: ...

    @property
    def sent_at(self) -> float: ...


_CallT = TypeVar("_CallT", bound=_Call)
_ReplyT = TypeVar("_ReplyT")


@dataclass
class LoadedModel:
    config: ModelServingConfig
    artifacts: ModelArtifacts
    backend: Backend
    batcher: RequestBatcher
    served: ServedModel
    observer: ModelObserver
    cache: RowCache
    probe: ProbeCheck
    gpu_budget: dict[str, float] | None = None
    loaded_s: float = 0.0  # artifacts + backend + warm-up + probe check, in seconds
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def label(self) -> str:
        """The version label of the registry (``/v1/models``, ``X-Model-Version``, metrics)."""
        return self.config.model.version

    @property
    def key(self) -> ModelKey:
        return self.config.model.key

    def info(self) -> dict[str, Any]:
        b = self.backend.info
        return {
            "name": self.artifacts.name,
            "version": self.label,
            "digest": self.artifacts.version,  # of the weights: the artifacts folder, the engine's manifest
            "state": VersionState.READY.value,
            "task": self.config.model.task,
            "architecture": self.artifacts.architecture,
            "backend": b.name,
            "backend_reason": b.reason,
            "precision": b.precision,
            "device": b.device,
            "buckets": list(self.config.batching.buckets),
            "max_batch_size": self.config.batching.max_batch_size,
            "max_batch_tokens": self.config.batching.max_batch_tokens,
            "max_length": min(self.artifacts.max_length, self.config.batching.buckets[-1]),
            "labels": len(self.artifacts.labels),
            "gpu_budget": self.gpu_budget,
            "gate": self.probe.as_dict(),
            "load_seconds": round(self.loaded_s, 3),
            "batching": self.batcher.as_dict(),
            "score_cache": self.cache.as_dict(),
            **{f"backend_{k}": v for k, v in b.extra.items()},
        }


class VersionState(enum.Enum):
    READY = "ready"  # loaded, checked against its probe reference, warm: it may take traffic
    LOADING = "loading"
    FAILED = "failed"  # did not load, failed its probe check or its warm-up: it never takes traffic


class EncoderServer:
    """Shared by Ranker and Intent: the versions of one task side by side, bucketed batching, metrics.

    Each version has its own backend, batcher and cache; a call names the version it wants (the ingress
    routes: serving, canary, shadow) and is answered by exactly that version, or refused with
    ``VersionNotReady`` listing what this replica serves.
    """

    def __init__(self) -> None:
        self._models: dict[ModelKey, LoadedModel] = {}  # ready versions
        self._failed: dict[ModelKey, str] = {}  # why a version does not serve
        self._loading: set[ModelKey] = set()
        self._config: TaskServingConfig | None = None
        self._syncing: asyncio.Task[None] | None = None  # loading a config's new versions in the background
        self._swap_lock = asyncio.Lock()
        self._metrics = model_metrics()
        self._flusher: asyncio.Task[None] | None = None
        self._node = node_id()
        self._senders = PeerClocks()  # per ingress node: its clock against ours

    async def _flush_metrics(self, every_s: float = 1.0) -> None:
        """Hands each version's summed figures to Ray once a second (see ``telemetry``)."""
        while True:
            await asyncio.sleep(every_s)
            for model in list(self._models.values()):
                model.observer.flush()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Take a new config. A replica that serves nothing yet loads it before it returns (Serve routes to it
        only then); one that serves returns at once and loads new versions in the background: Serve routes no
        request to a replica while its ``reconfigure`` runs (measured: a 0.9 s stall per load on 2 cores), and
        a version still loading answers ``VersionNotReady``, so its requests go to one that serves."""
        cfg = TaskServingConfig.model_validate(user_config)
        apply_python_gc(cfg.python_gc)
        PROCESS_PAUSES.watch()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics())
        self._config = cfg
        if not self._models:
            await self._sync()
            return
        self._syncing = asyncio.get_running_loop().create_task(self._sync())  # held: loops keep weak refs

    async def loaded(self) -> None:
        """Wait until the latest config is applied (tests, and a local caller that wants it now)."""
        while self._syncing is not None and not self._syncing.done():
            await asyncio.shield(self._syncing)

    async def _sync(self) -> None:
        """Load each listed version beside the ones serving, retune those whose weights did not change, retire
        those no longer listed once a listed one serves. A version that fails stays out of traffic; only a
        replica left with no version at all fails (so Serve reports it)."""
        async with self._swap_lock:
            cfg = self._config
            assert cfg is not None
            for version in cfg.versions:  # the serving version first: it is what a new replica waits for
                if cfg is not self._config:
                    return  # a newer config arrived meanwhile: its own sync applies it
                await self._apply(version)
            listed = {v.model.key for v in cfg.versions}
            if listed & set(self._models):  # versions the config dropped leave once a listed one serves
                for label in [v for v in self._models if v not in listed]:
                    self._retire_later(self._models.pop(label))
            self._failed = {v: why for v, why in self._failed.items() if v in listed}
            if not self._models:
                raise RuntimeError(f"no version of the {cfg.task} model could be served: {self._failed}")

    async def _apply(self, cfg: ModelServingConfig) -> None:
        label = cfg.model.key
        current = self._models.get(label)
        if current is not None and _same_model(current.config, cfg):
            current.batcher.retune(cfg.batching)
            current.cache.resize(cfg.model.score_cache.max_entries)
            current.config = cfg
            return
        self._loading.add(label)
        try:
            # beside a serving version, a CPU backend warms one row per bucket: the full warm-up would take the
            # cores from the version answering (measured: p99 x35 during a 3 s load on 2 cores)
            loaded = await asyncio.to_thread(self._load, cfg, bool(self._models))
        except Exception as e:  # a candidate that cannot serve never takes traffic; the others keep serving
            self._failed[label] = f"{type(e).__name__}: {e}"
            log.error("%s %s refused: %s", cfg.model.name, label, self._failed[label])
            return
        finally:
            self._loading.discard(label)
        self._failed.pop(label, None)
        self._models[label] = loaded
        self._metrics.set_active(loaded.served, True)
        info = loaded.backend.info
        log.info("serving %s %s on %s (%s)", cfg.model.name, label, info.name, info.reason)
        if current is not None:
            self._retire_later(current, still_active=current.served == loaded.served)

    def _retire_later(self, old: LoadedModel, still_active: bool = False) -> None:
        if not still_active:
            self._metrics.set_active(old.served, False)
        asyncio.get_running_loop().create_task(self._retire(old))

    def _load(self, cfg: ModelServingConfig, beside_serving: bool = False) -> LoadedModel:
        started = time.perf_counter()
        art = resolve(cfg.model, cfg.artifacts_dir)
        max_length = min(art.max_length, cfg.batching.buckets[-1])
        reference = probe_reference(art, cfg.artifacts_dir, max_length)  # FP32, computed once per version
        backend = select_backend(art, cfg)
        batcher: RequestBatcher | None = None
        try:
            served = ServedModel(cfg.model.name, cfg.model.version, backend.info.name, backend.info.precision)
            observer = self._metrics.observer(served)
            batcher = RequestBatcher(backend, cfg.batching, observer)
            shapes = batcher.shapes()  # /ready turns true only after every bucket ran once
            if beside_serving and not backend.info.fixed_shapes:  # no graphs to capture: a row per bucket
                shapes = [(1, length) for length in cfg.batching.buckets]
            backend.warmup(shapes)
            b = cfg.batching
            probe = check_backend(backend, reference, cfg.engine.gate[_precision(backend)], b.buckets, b.batch_slots)
            budget = _check_gpu_budget(backend, cfg.backend.gpu_memory_margin)
        except Exception:  # GateFailed, GpuBudgetExceeded, a warm-up failure: this version does not serve
            if batcher is not None:
                batcher.close()
            backend.close()
            raise
        cache = RowCache(cfg.model.score_cache.max_entries)  # a new version starts empty
        model = LoadedModel(
            cfg, art, backend, batcher, served, observer, cache, probe, budget, time.perf_counter() - started
        )
        model.idle.set()
        return model

    async def _retire(self, old: LoadedModel) -> None:
        await old.idle.wait()
        await asyncio.sleep(0.5)  # batches already handed to the queues finish first
        await old.idle.wait()
        old.observer.flush()  # its last figures, under its own version
        old.batcher.close()
        old.backend.close()

    def _pick(self, key: ModelKey | None) -> LoadedModel | None:
        """The version a call asked for; a call that names none gets the serving one (else any that serves)."""
        if key is not None:
            return self._models.get(key)
        serving = self._config.serving if self._config is not None else None
        if serving in self._models:
            return self._models[serving]
        return next(iter(self._models.values()), None)

    def _serving(self) -> LoadedModel:
        model = self._pick(None)
        if model is None:
            raise RuntimeError("model is not loaded")
        return model

    @staticmethod
    async def _forward(
        model: LoadedModel, seqs: Sequences, deadline: float = math.inf, start_by: float = math.inf
    ) -> tuple[np.ndarray, ModelTiming]:
        model.in_flight += 1
        model.idle.clear()
        try:
            return await model.batcher.submit_timed(seqs, deadline, start_by)
        finally:
            model.in_flight -= 1
            if model.in_flight == 0:
                model.idle.set()

    async def _rows(
        self, model: LoadedModel, seqs: Sequences, deadline: float, start_by: float
    ) -> tuple[np.ndarray, ModelTiming]:
        """Output rows of ``seqs`` from ``model``: from its cache where it holds them, computed otherwise; and
        how long the computed ones waited and ran (nothing, if all were cached).

        ``model`` is taken once per batch item, before anything is awaited, so cached and computed rows
        come from the same version even if a swap lands meanwhile.
        """
        cache = model.cache
        if not cache.enabled:
            return await self._forward(model, seqs, deadline, start_by)
        keys = sequence_keys(seqs)
        found = cache.lookup(keys)
        missing = [i for i, row in enumerate(found) if row is None]
        model.observer.cached(len(keys), len(keys) - len(missing))
        if not missing:
            return np.stack(found), UNTIMED  # type: ignore[arg-type]  # no None left
        partial = seqs if len(missing) == len(keys) else seqs.take(missing)
        computed, timing = await self._forward(model, partial, deadline, start_by)
        cache.store([keys[i] for i in missing], computed)
        if len(missing) == len(keys):
            return computed, timing
        out = np.empty((len(keys), computed.shape[1]), dtype=computed.dtype)
        for i, row in enumerate(found):
            if row is not None:
                out[i] = row
        out[missing] = computed
        return out, timing

    async def _answer_many(
        self, calls: Sequence[_CallT], reply: Callable[[np.ndarray, _CallT, LoadedModel, ModelTiming], _ReplyT]
    ) -> list[_ReplyT | RuntimeError]:
        """Several requests as one batch item per version, their output rows split back per request, each with
        the time it spent here (``ModelTiming``).

        A request whose deadline has already passed is answered ``DeadlineExceeded`` without being computed;
        one past its start-by time (by at most ``overload_late_refusal_s``) while those are held to (overload),
        ``StartedLate``; one for a version this replica does not serve, ``VersionNotReady``. A batch item
        carries the latest deadline of its requests and the earliest start-by time (the batcher drops it once
        one passes; one long past it is computed). Those times are by the clock of the node a call was sent
        from: read here with that node's base (``core.peer_clocks``), ours on our own node.
        """
        received = time.monotonic()
        now = time.time()
        shifts = [self._clock_shift(c.sent_from, c.sent_at, now) for c in calls]  # a call's times + its shift: ours
        replies: list[_ReplyT | RuntimeError] = [DeadlineExceeded() for _ in calls]
        groups: dict[ModelKey, tuple[LoadedModel, list[int]]] = {}
        for i, (c, shift) in enumerate(zip(calls, shifts, strict=True)):
            if c.deadline + shift <= now:
                continue
            model = self._pick(c.model)
            if model is None:
                served = tuple(self._models.values())
                configs = tuple(m.config.model.model_dump(mode="json") for m in served)
                replies[i] = VersionNotReady(c.model, tuple(m.key for m in served), configs)  # type: ignore[arg-type]
                continue
            if c.held:
                model.batcher.hold_start_by()
            if model.batcher.holds_start_by() and refuses_late(
                c.start_by + shift, now, model.batcher.config.overload_late_refusal_s
            ):
                replies[i] = StartedLate()
                continue
            groups.setdefault(model.key, (model, []))[1].append(i)

        async def answer(model: LoadedModel, live: list[int]) -> None:
            seqs = [calls[i].seqs for i in live]
            # one reply answers a call: held to its earliest start-by time, the call is refused whole then (a
            # later one's refusal could come no sooner than the call's compute); the deadline is the latest's
            deadline = max(calls[i].deadline + shifts[i] for i in live)
            start_by = min(calls[i].start_by + shifts[i] for i in live)
            out, timing = await self._rows(model, Sequences.concat(seqs), deadline, start_by)
            here = time.monotonic() - received
            timing = ModelTiming(timing.queue_s, timing.inference_s, here, processor=model.backend.info.processor)
            for i, rows in zip(live, split_rows(out, seqs), strict=True):
                replies[i] = reply(rows, calls[i], model, timing)

        await asyncio.gather(*(answer(model, live) for model, live in groups.values()))
        return replies

    def _clock_shift(self, node: str | None, sent_at: float, now: float) -> float:
        """What turns a time of the node a call was sent from into ours: 0 from our own node (one clock), or
        unstamped; else that node's base, taking in this call's offset."""
        if node is None or node == self._node:
            return 0.0
        return self._senders.base_s(node, now - sent_at, now)

    async def info(self) -> dict[str, Any]:
        """Every version of this replica: ready ones with their backend and gate figures, the others' state."""
        cfg = self._config
        if cfg is None:
            return {"ready": False, "task": None, "serving": None, "versions": []}
        versions = [m.info() for m in self._models.values()]
        replica, pauses, clocks = replica_id(), PROCESS_PAUSES.as_dict(), self._senders.bases_ms()
        for v in versions:  # a reload of a serving version failed: the version it had keeps serving
            v["replica"] = replica  # its batching figures are this replica's, not the deployment's
            v["pauses"] = pauses  # its process's collections and event-loop lag (``pauses``)
            v["ingress_clock_base_ms"] = clocks  # per ingress node on another (``core.peer_clocks``)
            failed = self._failed.get(ModelKey(v["name"], v["version"]))
            if failed is not None:
                v["reload_error"] = failed

        def entry(key: ModelKey, state: VersionState) -> dict[str, Any]:
            return {"name": key.name, "version": key.version, "task": cfg.task, "state": state.value}

        versions += [entry(key, VersionState.LOADING) for key in sorted(self._loading - set(self._models))]
        versions += [
            {**entry(key, VersionState.FAILED), "error": why}
            for key, why in self._failed.items()
            if key not in self._models
        ]
        return {"ready": bool(self._models), "task": cfg.task, "serving": str(cfg.serving), "versions": versions}

    def check_health(self) -> None:
        if not self._models:
            raise RuntimeError("no model loaded")


def _precision(backend: Backend) -> Precision:
    p = backend.info.precision
    return p if p in ("fp32", "fp16", "int8") else "fp32"  # type: ignore[return-value]


def _check_gpu_budget(backend: Backend, margin: float) -> dict[str, float] | None:
    """Enforce the replica's ``num_gpus`` share of the card (Ray does not); None for CPU backends."""
    memory = backend.gpu_memory()
    if memory is None:
        return None
    held, total = memory
    used = process_gpu_bytes() or held  # NVML sees the CUDA context too; the backend's own count is a floor
    fraction = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    if fraction <= 0:  # no share reserved: report, don't enforce
        return {"fraction": 0.0, "total_bytes": total, "used_bytes": used, "used_mib": round(used / 2**20, 1)}
    return check_budget(fraction, total, used, margin).as_dict()


def _same_model(a: ModelServingConfig, b: ModelServingConfig) -> bool:
    """Only batch knobs changed: retune in place instead of reloading."""
    return (
        a.model.weights_identity() == b.model.weights_identity()
        and a.backend == b.backend
        and a.artifacts_dir == b.artifacts_dir
        and a.batching.buckets == b.batching.buckets
        and a.batching.batch_slots == b.batching.batch_slots
        and a.batching.max_batch_size == b.batching.max_batch_size
        and a.batching.max_concurrent_batches == b.batching.max_concurrent_batches
    )


def _only(replies: list[_ReplyT | RuntimeError]) -> _ReplyT:
    """The one reply of a one-call batch item, raised if it is an error."""
    (reply,) = replies
    if isinstance(reply, RuntimeError):
        raise reply
    return reply


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RankerOutput(enum.Enum):
    """What a ranker call returns for its sequences."""

    SCORES = "scores"  # bi-encoder: cosine with the query; cross-encoder: sigmoid of the logit
    RAW_SCORES = "raw_scores"  # cross-encoder: the logit itself (a bi-encoder's cosine has no raw form)
    EMBEDDINGS = "embeddings"  # bi-encoder: the normalized embedding of every sequence


@dataclass(frozen=True)
class RankCall:
    """One request's sequences for the ranker: (query, document) pairs, or the query first, then documents."""

    seqs: Sequences
    pairs: bool  # cross-encoder input
    output: RankerOutput = RankerOutput.SCORES
    deadline: float = math.inf  # time.time() after which the caller no longer waits: not computed then
    model: ModelKey | None = None  # the model version to answer (the ingress routes); None: the serving one
    # overload (``batching.overload_start_within_s``): time.time() by which the request must start computing or
    # be refused uncomputed (``StartedLate``), and whether its ingress held requests to that as it was sent: the
    # replica then holds every queued request to its own for a while (``RequestBatcher.hold_start_by``)
    start_by: float = math.inf
    held: bool = False
    # the Ray node the call left from and when, by that node's clock (which its times are by): set as it is
    # sent. Plain fields with defaults, as every field added since the first: replicas of the versions before
    # and after a rolling update unpickle each other's calls (a class of ours the older lacks would not)
    sent_from: str | None = None
    sent_at: float = 0.0


@dataclass(frozen=True)
class ClassifyCall:
    seqs: Sequences
    top_k: int | None  # None: every label
    raw_scores: bool = False  # logits instead of probabilities
    deadline: float = math.inf
    model: ModelKey | None = None
    start_by: float = math.inf  # as ``RankCall``'s
    held: bool = False
    sent_from: str | None = None
    sent_at: float = 0.0


@dataclass(frozen=True)
class Ranked:
    values: np.ndarray  # scores [n documents], or embeddings [n, dim]
    version: str  # the model version (label) that computed them: the response names it
    timing: ModelTiming = UNTIMED  # its time in the replica (the response's timing headers)


@dataclass(frozen=True)
class Classified:
    labels: list[list[str]]  # the top-k label names of each text, best first
    scores: np.ndarray  # their probabilities (or logits) [n, k]
    version: str
    timing: ModelTiming = UNTIMED


class Ranker(EncoderServer):
    """Bi-encoder: cosine of the query (the first sequence) with each document. Cross-encoder: one logit per
    (query, document) pair, through a sigmoid unless raw scores are asked for. A bi-encoder also answers
    embeddings."""

    async def score(self, call: RankCall) -> Ranked:
        return _only(await self.score_many([call]))

    async def score_many(self, calls: list[RankCall]) -> list[Ranked | RuntimeError]:
        """Several requests in one call (an ingress coalesces them): one batch item, an answer per request."""
        return await self._answer_many(calls, lambda out, c, m, t: Ranked(_rank_output(out, c), m.label, t))


def _rank_output(out: np.ndarray, call: RankCall) -> np.ndarray:
    if call.output is RankerOutput.EMBEDDINGS:
        return out
    if not call.pairs:
        return (out[1:] @ out[0]).astype(np.float32)
    col = out[:, -1] if out.shape[1] > 1 else out[:, 0]
    return (col if call.output is RankerOutput.RAW_SCORES else _sigmoid(col)).astype(np.float32)


class Intent(EncoderServer):
    async def classify(self, call: ClassifyCall) -> Classified:
        """The top ``top_k`` labels of each text, best first, and their probabilities ``[n, k]``."""
        return _only(await self.classify_many([call]))

    async def classify_many(self, calls: list[ClassifyCall]) -> list[Classified | RuntimeError]:
        return await self._answer_many(calls, lambda logits, c, m, t: _top_k(logits, c, m.artifacts.labels, m.label, t))


def _top_k(
    logits: np.ndarray, call: ClassifyCall, names: Sequence[str], version: str, timing: ModelTiming
) -> Classified:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = probs.shape[1] if call.top_k is None else min(call.top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :k]
    scores = np.take_along_axis(logits if call.raw_scores else probs, order, axis=1)
    return Classified([[names[j] for j in row] for row in order.tolist()], scores, version, timing)
