"""Which version of a route's model answers a request, and what the ingress knows of every version.

Per request: the route's serving version, a weighted canary sticky per ``X-Caller-Id`` (``rollout.router``),
or, if the model replica does not serve the one chosen (still loading, refused by its gate), a version it
does: a rollout fails no request. A shadow version is scored in the background and compared. Each version is
tokenized with its own tokenizer (``VersionSpec``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from serve_app.batching.admission import Admission
from serve_app.config import AppConfig, ModelConfig, Task
from serve_app.core.backend import ModelUnavailable, VersionNotReady
from serve_app.core.versions import ModelKey
from serve_app.deployments.ingress.trace import Trace
from serve_app.deployments.telemetry import IngressMetrics
from serve_app.models.artifacts import tokenizer_spec
from serve_app.models.tokenizer import TextEncoder
from serve_app.rollout.agreement import AgreementStats
from serve_app.rollout.router import VersionRouter

log = logging.getLogger("ray.serve")
TASKS: tuple[Task, Task] = ("rerank", "classify")
T = TypeVar("T")
ROLE_ORDER = {"serving": 0, "canary": 1, "shadow": 2, "previous": 3, "standby": 4}


@dataclass(frozen=True)
class VersionSpec:
    """What the ingress needs of one model version: its config and its tokenizer."""

    model: ModelConfig
    encoder: TextEncoder
    pairs: bool  # a cross-encoder reads (query, document) pairs

    @classmethod
    def of(cls, model: ModelConfig, largest_bucket: int, chunk_cache_entries: int) -> VersionSpec:
        spec = tokenizer_spec(model, largest_bucket)
        return cls(model, TextEncoder(spec.tokenizer_path, spec.max_length, chunk_cache_entries), spec.pairs)


class Versions:
    """Every registered version this ingress can tokenize for, and each route's router."""

    def __init__(self, metrics: IngressMetrics) -> None:
        self._metrics = metrics
        self._cfg: AppConfig | None = None
        # those of the config before stay one more generation (a model replica may still serve them while it
        # loads the new ones)
        self.specs: dict[ModelKey, VersionSpec] = {}
        self.errors: dict[ModelKey, str] = {}  # versions whose tokenizer or files could not be read
        self._listed: set[ModelKey] = set()  # the versions of the config now applied
        self.routers: dict[Task, VersionRouter] = {}
        self._agreement: dict[tuple[ModelKey, ModelKey], AgreementStats] = {}  # (serving, shadow) -> stats
        self._background: set[asyncio.Task[None]] = set()  # shadow scoring: held, loops keep weak refs

    def load(self, cfg: AppConfig) -> None:
        """Tokenizers of every registered version, and the routes' routers (their counters carry over). A
        version that cannot be read is left out (and reported): its requests go to another version of the
        model; only a route with none readable fails the config (``ValueError``)."""
        largest = cfg.batching.buckets[-1]
        specs: dict[ModelKey, VersionSpec] = {}
        errors_: dict[ModelKey, str] = {}
        for model in cfg.models:
            old = self.specs.get(model.key)
            if old is not None and old.model.weights_identity() == model.weights_identity():
                old.encoder.use_chunk_cache(cfg.tokenization.chunk_cache_entries)
                specs[model.key] = VersionSpec(model, old.encoder, old.pairs)
                continue
            try:
                specs[model.key] = VersionSpec.of(model, largest, cfg.tokenization.chunk_cache_entries)
            except Exception as e:  # a broken candidate: its replicas refuse it too
                errors_[model.key] = f"{type(e).__name__}: {e}"
                log.error("%s: cannot tokenize for it: %s", model.key, errors_[model.key])
        # versions of the config before (only): a model replica may serve them until its new ones are ready
        kept = {k: self.specs[k] for k in self._listed - set(specs) - set(errors_) if k in self.specs}
        for task in TASKS:  # a route needs one readable version of its model: the serving one, or any other
            key = cfg.model_for(task).key
            if key not in specs and not any(k.name == key.name for k in (*specs, *kept)):
                raise ValueError(f"routes.{task}: the serving version {key} cannot be read: {errors_[key]}")
        self.specs = {**kept, **specs}
        self.errors = errors_
        self._listed = {m.key for m in cfg.models}
        for task in TASKS:
            route = cfg.routes.of(task)
            if task in self.routers:
                self.routers[task].route = route
            else:
                self.routers[task] = VersionRouter(route)
        self._cfg = cfg

    @property
    def cfg(self) -> AppConfig:
        assert self._cfg is not None, "load() runs before the first request"
        return self._cfg

    async def routed(
        self,
        task: Task,
        trace: Trace,
        work: Callable[[VersionSpec, Trace], Awaitable[T]],
        compare: Callable[[T, T], float] | None = None,
    ) -> T:
        """``work`` (tokenize with a version's tokenizer, call the model, shape the answer) on the version the
        route's router chooses; again on one the replica serves if it did not serve that one; and in the
        background on the route's shadow, whose answer is compared with ``compare`` and dropped."""
        router = self.routers[task]
        choice = router.choose(trace.caller)
        key = choice.model
        if key not in self.specs:  # this ingress could not read it: as if no replica served it
            key = self._instead(router, key, tuple(k for k in self.specs if k.name == router.route.model))
        try:
            result = await work(self.specs[key], trace)
        except VersionNotReady as e:
            key = self._instead(router, e.model, e.ready, e.configs)
            result = await work(self.specs[key], trace)
        router.answered[key.version] += 1
        if choice.shadow is not None and compare is not None:
            self._shadow(key, choice.shadow, trace, work, result, compare)
        return result

    def _instead(
        self,
        router: VersionRouter,
        missing: ModelKey,
        ready: tuple[ModelKey, ...],
        configs: tuple[dict[str, Any], ...] = (),
    ) -> ModelKey:
        instead = router.instead_of(missing, ready, self.specs)
        if instead is None and configs:  # it serves versions this replica has never seen (a rolling update)
            for key, data in zip(ready, configs, strict=True):
                if key not in self.specs:
                    try:
                        self.specs[key] = VersionSpec.of(
                            ModelConfig.model_validate(data),
                            self.cfg.batching.buckets[-1],
                            self.cfg.tokenization.chunk_cache_entries,
                        )
                    except Exception as e:  # unreadable here: try the next one
                        log.warning("cannot tokenize for %s, which a model replica serves: %s", key, e)
            instead = router.instead_of(missing, ready, self.specs)
        if instead is None:
            raise ModelUnavailable(f"{missing} (a deploy is under way: no version both sides know is ready yet)")
        return instead

    def _shadow(
        self,
        serving: ModelKey,
        shadow: ModelKey,
        trace: Trace,
        work: Callable[[VersionSpec, Trace], Awaitable[T]],
        answer: T,
        compare: Callable[[T, T], float],
    ) -> None:
        stats = self._agreement.setdefault((serving, shadow), AgreementStats())
        spec = self.specs.get(shadow)
        if spec is None:
            stats.skipped += 1
            return

        async def score() -> None:
            try:  # its own trace: the response does not name it; the same deadline bounds it
                theirs = await work(spec, Trace(trace.timeout_s, trace.deadline, caller=trace.caller))
            except Exception as e:  # refused by admission, not ready, past the deadline: not compared
                stats.skipped += 1
                log.debug("shadow %s skipped: %s", shadow, e)
                return
            value = compare(answer, theirs)
            stats.add(value)
            self._metrics.shadow(serving, shadow, value)

        task = asyncio.get_running_loop().create_task(score())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def report(self, task: Task, replica: dict[str, Any], admission: Admission) -> list[dict[str, Any]]:
        """Every version of ``task``: what the model replica reports of it (backend, gate, state), and what this
        ingress adds (its role in the route, traffic share, requests answered, shadow agreement, and this
        ingress replica's view of the model's queue, ``admission``)."""
        router = self.routers[task]
        route, shares = router.route, router.route.weights()
        reported = {ModelKey(v["name"], v["version"]): v for v in replica.get("versions", [])}
        for key, why in self.errors.items():
            listed = self.cfg.find(key)
            if listed is not None and listed.task == task:
                reported.setdefault(key, {"name": key.name, "version": key.version, "task": task, "state": "failed"})
                reported[key]["ingress_error"] = why
        out = []
        for key, entry in reported.items():
            mine = key.name == route.model
            role = "standby"
            if mine and key.version == route.version:
                role = "serving"
            elif mine and route.canary is not None and key.version == route.canary.version:
                role = "canary"
            elif mine and route.shadow is not None and key.version == route.shadow.version:
                role = "shadow"
            elif mine and key.version == route.previous:
                role = "previous"
            entry.update(
                route=task,
                role=role,
                traffic_share=shares.get(key.version, 0.0) if mine else 0.0,
                answered=router.answered[key.version] if mine else 0,  # by this ingress replica
                admission=admission.as_dict(),
            )
            spec = self.specs.get(key)
            if spec is not None and spec.encoder.chunk_cache is not None:  # this ingress replica's
                entry["chunk_cache"] = spec.encoder.chunk_cache.as_dict()
            if mine and route.shadow is not None and key.version == route.shadow.version:  # also a canary maybe
                serving = ModelKey(route.model, route.version)
                entry["shadow"] = self._agreement.get((serving, key), AgreementStats()).as_dict()
                entry["shadow_share"] = route.shadow.share if route.shadow else 0.0
            out.append(entry)
        return sorted(out, key=lambda e: ROLE_ORDER[e["role"]])
