"""HTTP ingress and CPU tokenizer in one deployment: validates, tokenizes, calls the models.

Tokenizing here saves an actor hop per request (HTTP → ingress → model instead of HTTP → ingress →
tokenizer → model); the ingress scales on its own CPU replicas. Short inputs are tokenized on the
event loop (Rust, microseconds); long ones on a worker thread (the Rust tokenizer releases the GIL).
The sequences travel packed as numpy arrays (``Sequences``).

Where the models run is the config's ``model_placement``: their own deployments (handles passed in;
GPUs, per-model autoscaling) or this process (no handles; the laptop default, where an actor hop
costs more than the model). The ingress code is the same for both (``model_client``).

Which version of a route's model answers is decided here, per request (``rollout.router``: the route's
serving version, a weighted canary sticky per ``X-Caller-Id``, a shadow scored in the background and
compared), and each version is tokenized with its own tokenizer. A version a model replica does not serve
(still loading, refused by its gate) is answered by one it does: a rollout fails no request.

Every failure a client can cause maps to a JSON error with a 4xx status; a full downstream queue or
an admission refusal is a 503 with ``Retry-After`` at once (never a hang); nothing a client sends
produces a 500.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, openapi, routes, schemas
from serve_app.api.auth import ApiKeys
from serve_app.api.http import check_texts, parse, read_body
from serve_app.api.routes import Route
from serve_app.batching.admission import Admission
from serve_app.batching.buckets import bucket_lengths
from serve_app.config import AppConfig, AuthConfig, ModelConfig, Task, env_api_keys
from serve_app.core.backend import DeadlineExceeded, ModelUnavailable, Overloaded, VersionNotReady
from serve_app.core.sequences import Encoded, Sequences
from serve_app.core.versions import ModelKey
from serve_app.deployments.encoder import (
    Classified,
    ClassifyCall,
    EncoderServer,
    Intent,
    RankCall,
    Ranker,
    RankerOutput,
)
from serve_app.deployments.model_client import IntentClient, RankerClient, RemoteIntent, RemoteModel, RemoteRanker
from serve_app.deployments.python_gc import apply_python_gc
from serve_app.deployments.telemetry import RefusalReason, ingress_metrics
from serve_app.models.artifacts import tokenizer_spec
from serve_app.models.tokenizer import TextEncoder, cap_document_tokens
from serve_app.ranking.chunks import ChunkMap, aggregate
from serve_app.ranking.fusion import fuse
from serve_app.rollout.agreement import AgreementStats, rank_agreement, top1_agreement
from serve_app.rollout.router import VersionRouter

log = logging.getLogger("ray.serve")
TASKS: tuple[Task, Task] = ("rerank", "classify")
T = TypeVar("T")
INLINE_TOKENIZE_CHARS = 2_000  # below this a request is tokenized on the event loop; a thread hop costs more
# up to this, a request is first looked up in the chunk cache on the event loop (~20 us of CPU per 1,000 characters)
LOOKUP_ON_LOOP_CHARS = 100_000
# a model's queue holds an admitted request from the door on, at this estimate until its call: padded tokens
# per body byte (SciFact re-rank, whole abstracts: 0.19; a short classify body: about 1), learned per route and
# model from the first request on
INITIAL_TOKENS_PER_BYTE = 0.5
PER_BYTE_SMOOTHING = 0.2  # moving average of both per-byte ratios (tokens, characters)
# the tokenizer threads' queue is in characters (their rate is): a body's are estimated from its size at the
# door, learned per route (ASCII JSON: about 0.95 characters a byte; text sent as \uXXXX escapes, as
# json.dumps sends any non-ASCII: 1/6), and known once it is parsed
INITIAL_CHARS_PER_BYTE = 1.0
UNMATCHED = "unmatched"  # the route tag of requests to no route (keeps the metric's tag values bounded)


@dataclass
class Trace:
    """One request's deadline, and what it touched (for its latency metric): the model versions that answered."""

    timeout_s: float = math.inf
    deadline: float = math.inf  # time.time() past which the client gets 504 and the models drop its rows
    served: list[tuple[str, str]] = field(default_factory=list)  # (model name, version)
    caller: str | None = None  # X-Caller-Id: a canary keeps a caller on one version
    route: str = ""  # the route's path (metrics, and the estimates admission learns per route)
    # admitted at the door: what this request holds in the queues until its work is done (``Ingress._admit``)
    body_bytes: int = 0
    tokenizer_held: int = 0  # characters of text in the tokenizer threads' queue, until its model call
    text_measured: bool = False  # its text was parsed: what it holds there is its length, not an estimate
    models_held: dict[Task, int] = field(default_factory=dict)  # estimated padded tokens, until the call

    def tags(self) -> tuple[str, str]:
        return ",".join(n for n, _ in self.served), ",".join(v for _, v in self.served)

    def header(self) -> str:
        """``X-Model-Version``: ``<name>/<version>`` of each model that answered, comma-separated."""
        return ",".join(f"{n}/{v}" for n, v in self.served)


Handler = Callable[[Request, Trace], Awaitable[Response]]


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


@dataclass(frozen=True)
class RerankInput:
    """What every re-ranking route asks, whatever its client's shape."""

    query: str
    texts: list[str]
    truncate: bool
    raw_scores: bool
    chunking: bool | None  # None: the model's config decides
    first_stage: list[float] | None
    max_doc_tokens: int | None = None


@dataclass(frozen=True)
class RerankSequences:
    """A re-ranking request's sequences and which document each scored one belongs to."""

    encoded: list[Encoded]  # a bi-encoder's start with the query
    chunks: ChunkMap
    chunked: bool

    def documents_cut(self, pairs: bool) -> int:
        docs = self.encoded if pairs else self.encoded[1:]
        return len({int(d) for d, e in zip(self.chunks.owner.tolist(), docs, strict=True) if e.truncated})


@dataclass(frozen=True)
class Reranked:
    """One score per document (fused when first-stage scores were sent), and the model's own beside it."""

    scores: list[float]
    model_scores: list[float] | None
    usage: schemas.Usage

    def model(self, i: int) -> float | None:
        return None if self.model_scores is None else self.model_scores[i]


class Ingress:
    def __init__(self, ranker: DeploymentHandle | None = None, intent: DeploymentHandle | None = None) -> None:
        # no handles: the models live in this process and reconfigure loads them (model_placement: ingress);
        # handles: reconfigure wraps them in clients that share calls between concurrent requests
        self._local: dict[Task, EncoderServer] = {}
        self._handles = (ranker, intent)
        self._ranker: RankerClient
        self._intent: IntentClient
        if ranker is None or intent is None:
            self._ranker, self._intent = Ranker(), Intent()
            self._local = {"rerank": self._ranker, "classify": self._intent}
        self._cfg: AppConfig | None = None
        # every registered version this ingress can tokenize for; those of the config before stay one more
        # generation (a model replica may still serve them while it loads the new ones)
        self._specs: dict[ModelKey, VersionSpec] = {}
        self._spec_errors: dict[ModelKey, str] = {}  # versions whose tokenizer or files could not be read
        self._listed: set[ModelKey] = set()  # the versions of the config now applied
        self._routers: dict[Task, VersionRouter] = {}
        self._agreement: dict[tuple[ModelKey, ModelKey], AgreementStats] = {}  # (serving, shadow) -> stats
        self._background: set[asyncio.Task[None]] = set()  # shadow scoring: held, loops keep weak refs
        self._admission: dict[Task, Admission] = {"rerank": Admission(0.0), "classify": Admission(0.0)}
        self._keys = ApiKeys()
        self._metrics = ingress_metrics()
        self._pool: ThreadPoolExecutor | None = None  # tokenizer threads (reconfigure sizes them)
        self._pool_threads = 0
        self._tokenizing_now = 0  # requests (or parts) on the tokenizer threads or queued for them
        self._tokenizer_admission = Admission(0.0)  # its queue: characters of admitted text not yet tokenized
        self._chars_per_byte: dict[str, float] = {}  # per route: see INITIAL_CHARS_PER_BYTE
        self._tokens_per_byte: dict[tuple[str, Task], float] = {}  # per (route, model): see INITIAL_TOKENS_PER_BYTE
        handlers: dict[Route, Handler] = {
            routes.TEI_RERANK: self._tei_rerank,
            routes.TEI_EMBED: self._tei_embed,
            routes.TEI_PREDICT: self._tei_predict,
            routes.TEI_INFO: self._tei_info,
            routes.COHERE_V1_RERANK: self._cohere_v1_rerank,
            routes.COHERE_V2_RERANK: self._cohere_v2_rerank,
            routes.OPENAI_EMBEDDINGS: self._openai_embeddings,
            routes.MODELS: self._models,
            routes.CLASSIFY: self._classify,
            routes.SEARCH: self._search,
            routes.HEALTH: self._health,
            routes.READY: self._ready,
            routes.OPENAPI: self._openapi,
            routes.DOCS: self._docs,
        }
        assert set(handlers) == set(routes.ALL), "every declared route has a handler"
        self._routes: dict[tuple[str, str], tuple[Route, Handler]] = {
            (r.method, r.path): (r, h) for r, h in handlers.items()
        }
        self._paths = {r.path for r in routes.ALL}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(user_config)
        apply_python_gc(cfg.python_gc)
        for task, server in self._local.items():  # in-process models: the first load before serving, later
            await server.reconfigure(cfg.task_serving(task).model_dump(mode="json"))  # ones in the background
        ranker, intent = self._handles
        if ranker is not None and intent is not None:
            if self._cfg is None:
                self._ranker = RemoteRanker(ranker, cfg.batching.calls_in_flight, "Ranker")
                self._intent = RemoteIntent(intent, cfg.batching.calls_in_flight, "Intent")
            for client in (self._ranker, self._intent):
                if isinstance(client, RemoteModel):
                    client.calls.max_in_flight = cfg.batching.calls_in_flight
        self._load_specs(cfg)
        self._tokenizer_pool(cfg)
        for task in TASKS:
            route = cfg.routes.of(task)
            if task in self._routers:
                self._routers[task].route = route  # counters and redirects carry over
            else:
                self._routers[task] = VersionRouter(route)
        for adm in (*self._admission.values(), self._tokenizer_admission):
            adm.max_queue_wait_s = cfg.batching.max_queue_wait_s
            adm.overload_queue_wait_s = cfg.batching.overload_queue_wait_s
            adm.overload_window_s = cfg.batching.overload_window_s
        self._keys = ApiKeys(AuthConfig(api_keys=(*cfg.auth.api_keys, *env_api_keys())).api_keys)
        self._cfg = cfg

    def _load_specs(self, cfg: AppConfig) -> None:
        """Tokenizers of every registered version. One that cannot be read is left out (and reported): its
        requests go to another version of the model; only a route with none readable fails the config."""
        largest = cfg.batching.buckets[-1]
        specs: dict[ModelKey, VersionSpec] = {}
        errors_: dict[ModelKey, str] = {}
        for model in cfg.models:
            old = self._specs.get(model.key)
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
        kept = {k: self._specs[k] for k in self._listed - set(specs) - set(errors_) if k in self._specs}
        for task in TASKS:  # a route needs one readable version of its model: the serving one, or any other
            key = cfg.model_for(task).key
            if key not in specs and not any(k.name == key.name for k in (*specs, *kept)):
                raise ValueError(f"routes.{task}: the serving version {key} cannot be read: {errors_[key]}")
        self._specs = {**kept, **specs}
        self._spec_errors = errors_
        self._listed = {m.key for m in cfg.models}

    async def loaded(self) -> None:
        """In-process models: wait until their latest config is loaded (new versions load in the background)."""
        for server in self._local.values():
            await server.loaded()

    @property
    def cfg(self) -> AppConfig:
        assert self._cfg is not None, "reconfigure() runs before the first request"
        return self._cfg

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # served under a route prefix
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        found = self._routes.get((request.method, path))
        route = found[0].path if found is not None else UNMATCHED
        trace = Trace(caller=request.headers.get("x-caller-id"), route=route)
        try:
            if found is None or not found[0].public:
                self._keys.check(request.headers.get("authorization"))  # before anything else is revealed
            timeout_s = trace.timeout_s = self._timeout_s(request)
            trace.deadline = time.time() + timeout_s
            try:
                response = await asyncio.wait_for(self._answer(request, path, route, found, trace), timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                response = errors.deadline_exceeded(timeout_s).response()
            finally:
                self._release(trace)
        except errors.ApiError as e:
            response = e.response()
        if trace.served and response.status_code == 200:  # which version answered (rollouts, debugging)
            response.headers["X-Model-Version"] = trace.header()
        model, version = trace.tags()
        self._metrics.request(route, response.status_code, model, version, time.perf_counter() - started)
        return response

    async def _answer(
        self, request: Request, path: str, route: str, found: tuple[Route, Handler] | None, trace: Trace
    ) -> Response:
        refusal: RefusalReason | None = None
        try:
            if found is None:
                if path in self._paths:
                    raise errors.ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {path}")
                raise errors.ApiError(404, "not_found", f"no route {path}")
            return await found[1](request, trace)
        except errors.ApiError as e:
            if e.status == 503:
                refusal = RefusalReason.NOT_READY
            return e.response()
        except BackPressureError:
            refusal = RefusalReason.QUEUE_FULL
            return errors.overloaded().response()
        except Overloaded as e:
            refusal = RefusalReason.QUEUE_WAIT
            return errors.overloaded(e.retry_after_s).response()
        except DeadlineExceeded:
            return errors.deadline_exceeded(trace.timeout_s).response()
        except ModelUnavailable as e:
            refusal = RefusalReason.REPLICA_FAILED
            return errors.unavailable(str(e), e.retry_after_s).response()
        except VersionNotReady as e:  # the version it was sent to instead went too (a deploy under way)
            refusal = RefusalReason.NOT_READY
            return errors.unavailable(str(e)).response()
        except (RayActorError, RayTaskError) as e:
            if isinstance(e.cause if isinstance(e, RayTaskError) else None, BackPressureError):
                refusal = RefusalReason.QUEUE_FULL
                return errors.overloaded().response()
            log.exception("downstream replica failed")
            refusal = RefusalReason.REPLICA_FAILED
            return errors.unavailable("a model replica failed; retry").response()
        except Exception:  # a bug of ours: say so in JSON, keep serving
            log.exception("unhandled error on %s", path)
            return JSONResponse(errors.body("internal error", "internal_error"), status_code=500)
        finally:
            if refusal is not None:
                self._metrics.refused(route, refusal)

    # -- plumbing ---------------------------------------------------------------------------------

    def _timeout_s(self, request: Request) -> float:
        """The configured deadline, or a shorter one the client asked for in ``X-Request-Timeout-Ms``."""
        default = self.cfg.limits.request_timeout_s
        asked = request.headers.get("x-request-timeout-ms")
        if asked is None:
            return default
        try:
            ms = float(asked)
        except ValueError:
            ms = math.nan
        if not math.isfinite(ms) or ms <= 0:
            raise errors.ApiError(
                400, "invalid_request", "X-Request-Timeout-Ms: expected a positive number of milliseconds"
            )
        return min(default, ms / 1000)

    def _tokenizer_pool(self, cfg: AppConfig) -> None:
        """``tokenization.threads`` worker threads of this replica's own. The tokenizers library's thread pool
        is turned off: on an H100 node's 16 cores, 4 ingress replicas tokenized 13 % fewer requests per second
        with it, its threads spinning on cores the other requests needed (``scripts/results``)."""
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the library at each call
        threads = cfg.tokenizer_threads()
        if self._pool is None or self._pool_threads != threads:
            old, self._pool = self._pool, ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
            self._pool_threads = threads
            if old is not None:
                old.shutdown(wait=False)  # its queued requests still run

    async def _run_tokenizer(
        self, texts: list[str], query: str | None, tokenize: Callable[[], T], trace: Trace, pairs: bool = False
    ) -> T:
        """Short inputs on the event loop, long ones on a tokenizer thread. With ``pairs`` the tokenizer reads
        the query once per text, (query, text) by (query, text)."""
        chars = _chars(texts, len(query or "")) if pairs else _chars(texts) + len(query or "")
        self._measured(trace, chars)
        return await self._named_errors(texts, query, self._on_threads(chars, tokenize))

    async def _encode_split(
        self,
        texts: list[str],
        query: str | None,
        encode: Callable[[list[str]], list[Encoded]],
        trace: Trace,
        pair_query: str | None = None,
        lookup: Callable[[list[str]], list[Encoded] | None] | None = None,
    ) -> list[Encoded]:
        """``encode`` over ``texts`` (with ``query`` first, if given), split over the tokenizer threads that are
        idle: a lone long request is not tokenized on one core while the others wait; whole when busy.
        ``pair_query``: a cross-encoder's query, which ``encode`` pairs with each text: its characters count
        once per text. ``lookup``: the same sequences from remembered chunks if all are known (``TextEncoder``),
        cheap enough to try on the event loop first: no thread hop, no tokenizer."""
        whole = texts if query is None else [query, *texts]
        per_text = len(pair_query or "")
        chars = _chars(whole, per_text)
        self._measured(trace, chars)
        found = lookup(whole) if lookup is not None and chars <= LOOKUP_ON_LOOP_CHARS else None
        if found is not None:
            return found
        return await self._named_errors(texts, query, self._split(whole, encode, per_text))

    def _measured(self, trace: Trace, chars: int) -> None:
        """A request's text is parsed: what it holds in the tokenizer threads' queue becomes its length in
        characters, and its route learns characters per body byte for the next estimates at the door."""
        if trace.text_measured or not trace.body_bytes:  # measured already, or not admitted at the door
            return
        trace.text_measured = True
        if trace.tokenizer_held:
            self._tokenizer_admission.resize(trace.tokenizer_held, chars)
            trace.tokenizer_held = chars
        old = self._chars_per_byte.get(trace.route, chars / trace.body_bytes)
        self._chars_per_byte[trace.route] = old + PER_BYTE_SMOOTHING * (chars / trace.body_bytes - old)

    @staticmethod
    async def _named_errors(texts: list[str], query: str | None, tokenizing: Awaitable[T]) -> T:
        """Text that is not valid Unicode is a 422 naming it (the Rust tokenizer takes only text that encodes
        to UTF-8: not a lone surrogate)."""
        try:
            return await tokenizing
        except TypeError:
            bad = next((i for i, t in enumerate([query or "", *texts]) if not _utf8(t)), None)
            if bad is None:
                raise
            what = "query" if bad == 0 else f"input {bad - 1}"
            raise errors.ApiError(
                422, "validation_error", f"{what}: not valid Unicode text (a lone surrogate \\ud800-\\udfff)"
            ) from None

    async def _on_threads(self, chars: int, tokenize: Callable[[], T]) -> T:
        if chars <= INLINE_TOKENIZE_CHARS:
            return tokenize()
        return await self._pooled(chars, tokenize)

    async def _split(
        self, texts: list[str], encode: Callable[[list[str]], list[Encoded]], per_text: int = 0
    ) -> list[Encoded]:
        chars = _chars(texts, per_text)
        parts = min(self._pool_threads - self._tokenizing_now, len(texts))
        if chars <= INLINE_TOKENIZE_CHARS or parts <= 1:
            return await self._on_threads(chars, lambda: encode(texts))
        bounds = np.linspace(0, len(texts), parts + 1).astype(int).tolist()
        pieces = [texts[a:b] for a, b in itertools.pairwise(bounds)]
        done = await asyncio.gather(
            *(self._pooled(_chars(piece, per_text), functools.partial(encode, piece)) for piece in pieces)
        )
        return [e for part in done for e in part]

    async def _pooled(self, chars: int, work: Callable[[], T]) -> T:
        """``work`` on a tokenizer thread. Its request was admitted at the door (``_admit``); here the threads'
        rate is measured (characters per second while busy), which the door's wait estimate divides by."""
        started = time.monotonic()
        self._tokenizing_now += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            self._tokenizing_now -= 1
        self._tokenizer_admission.observe(chars, started)
        return result

    async def _tokenize(
        self, spec: VersionSpec, texts: list[str], trace: Trace, query: str | None = None
    ) -> list[Encoded]:
        enc = spec.encoder
        if query is not None:
            return await self._encode_split(texts, None, lambda part: enc.encode_pairs(query, part), trace, query)
        return await self._encode_split(texts, None, enc.encode, trace, lookup=enc.lookup)

    @staticmethod
    def _refuse_truncation(truncate: bool, encoded: list[Encoded], max_len: int) -> None:
        if not truncate:
            for i, e in enumerate(encoded):
                if e.truncated:
                    raise errors.ApiError(
                        413, "input_too_long", f"input {i} exceeds {max_len} tokens and truncate is false"
                    )

    def _check_model(self, task: Task, requested: str | None) -> ModelConfig:
        model = self.cfg.model_for(task)
        if not model.answers_to(requested):
            names = ", ".join(repr(n) for n in (model.name, *model.aliases))
            raise errors.ApiError(404, "model_not_found", f"model {requested!r} is not served here; use one of {names}")
        return model

    def _read(self, request: Request) -> Awaitable[bytes]:
        return read_body(request, self.cfg.limits.max_body_bytes)

    async def _routed(
        self,
        task: Task,
        trace: Trace,
        work: Callable[[VersionSpec, Trace], Awaitable[T]],
        compare: Callable[[T, T], float] | None = None,
    ) -> T:
        """``work`` (tokenize with a version's tokenizer, call the model, shape the answer) on the version the
        route's router chooses; again on one the replica serves if it did not serve that one; and in the
        background on the route's shadow, whose answer is compared with ``compare`` and dropped."""
        router = self._routers[task]
        choice = router.choose(trace.caller)
        key = choice.model
        if key not in self._specs:  # this ingress could not read it: as if no replica served it
            key = self._instead(router, key, tuple(k for k in self._specs if k.name == router.route.model))
        try:
            result = await work(self._specs[key], trace)
        except VersionNotReady as e:
            key = self._instead(router, e.model, e.ready, e.configs)
            result = await work(self._specs[key], trace)
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
        instead = router.instead_of(missing, ready, self._specs)
        if instead is None and configs:  # it serves versions this replica has never seen (a rolling update)
            for key, data in zip(ready, configs, strict=True):
                if key not in self._specs:
                    try:
                        self._specs[key] = VersionSpec.of(
                            ModelConfig.model_validate(data),
                            self.cfg.batching.buckets[-1],
                            self.cfg.tokenization.chunk_cache_entries,
                        )
                    except Exception as e:  # unreadable here: try the next one
                        log.warning("cannot tokenize for %s, which a model replica serves: %s", key, e)
            instead = router.instead_of(missing, ready, self._specs)
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
        spec = self._specs.get(shadow)
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

    def _chunking(self, spec: VersionSpec, asked: bool | None) -> bool:
        return spec.model.chunking.enabled if asked is None else asked

    async def _encode_documents(
        self,
        spec: VersionSpec,
        query: str,
        texts: list[str],
        truncate: bool,
        trace: Trace,
        max_doc_tokens: int | None = None,
        chunking: bool = False,
    ) -> tuple[list[Encoded], ChunkMap]:
        """The ranker's sequences: (query, document) pairs, or the query first and then each document; with
        ``chunking``, every window of each document. Also which document each scored sequence belongs to."""
        check_texts([query], self.cfg.limits, 1, "query")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_documents, "documents")
        if chunking:
            encoded, chunks = await self._tokenize_windows(spec, query, texts, max_doc_tokens, trace)
        elif spec.pairs:
            encoded, chunks = await self._tokenize(spec, texts, trace, query), ChunkMap.one_each(len(texts))
            if max_doc_tokens is not None:
                encoded = cap_document_tokens(encoded, max_doc_tokens, pairs=True)
        else:
            # the query and the documents together; errors name the document
            encoded = await self._encode_split(texts, query, spec.encoder.encode, trace, lookup=spec.encoder.lookup)
            chunks = ChunkMap.one_each(len(texts))
            if max_doc_tokens is not None:
                encoded = [encoded[0], *cap_document_tokens(encoded[1:], max_doc_tokens, pairs=False)]
        self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
        return encoded, chunks

    async def _tokenize_windows(
        self, spec: VersionSpec, query: str, texts: list[str], max_doc_tokens: int | None, trace: Trace
    ) -> tuple[list[Encoded], ChunkMap]:
        c, limit = spec.model.chunking, self.cfg.limits.max_chunks_per_request
        enc = spec.encoder
        pair_query = query if spec.pairs else None

        def windows() -> tuple[list[Encoded], ChunkMap]:
            return enc.encode_windows(texts, c.overlap_tokens, c.max_chunks_per_document, pair_query, max_doc_tokens)

        seqs, chunks = await self._run_tokenizer(texts, query, windows, trace, pairs=pair_query is not None)
        if pair_query is None:  # a bi-encoder's first sequence is the query
            seqs = [*await self._tokenize(spec, [query], trace), *seqs]
        if chunks.chunks > limit:
            raise errors.ApiError(
                413, "too_many_chunks",
                f"the documents make {chunks.chunks} windows; the limit is {limit} per request "
                "(send fewer or shorter documents, or chunking: false)",
            )  # fmt: skip
        return seqs, chunks

    async def _rank(
        self, spec: VersionSpec, encoded: list[Encoded], raw_scores: bool, trace: Trace
    ) -> tuple[np.ndarray, schemas.Usage]:
        packed = Sequences.pack(encoded)
        output = RankerOutput.RAW_SCORES if raw_scores else RankerOutput.SCORES
        call = RankCall(packed, spec.pairs, output, trace.deadline, spec.model.key)
        ranked = await self._call("rerank", packed, lambda: self._ranker.score(call), trace)
        trace.served.append((spec.model.name, ranked.version))
        return ranked.values, self._usage(packed)

    async def _rerank(self, req: RerankInput, trace: Trace) -> Reranked:
        """Score every document, windows aggregated per document, fused with the first stage if it was sent."""

        async def work(spec: VersionSpec, t: Trace) -> Reranked:
            return await self._score_documents(req, await self._encode_rerank(spec, req, t), spec, t)

        return await self._routed("rerank", trace, work, _rank_agreement)

    async def _encode_rerank(self, spec: VersionSpec, req: RerankInput, trace: Trace) -> RerankSequences:
        chunking = self._chunking(spec, req.chunking)
        encoded, chunks = await self._encode_documents(
            spec, req.query, req.texts, req.truncate, trace, req.max_doc_tokens, chunking
        )
        return RerankSequences(encoded, chunks, chunking)

    async def _score_documents(
        self, req: RerankInput, seqs: RerankSequences, spec: VersionSpec, trace: Trace
    ) -> Reranked:
        ranker = spec.model
        scores, usage = await self._rank(spec, seqs.encoded, req.raw_scores, trace)
        usage.chunks = seqs.chunks.chunks
        if seqs.chunked:  # a document counts once, however many of its windows were cut
            usage.truncated_inputs = seqs.documents_cut(spec.pairs)
        model = aggregate(scores, seqs.chunks, ranker.chunking.aggregation)
        if req.first_stage is None:
            return Reranked(model.tolist(), None, usage)
        return Reranked(fuse(model, req.first_stage, ranker.fusion).tolist(), model.tolist(), usage)

    async def _embed(self, texts: list[str], truncate: bool, trace: Trace) -> tuple[np.ndarray, schemas.Usage]:
        async def work(spec: VersionSpec, t: Trace) -> tuple[np.ndarray, schemas.Usage]:
            if spec.pairs:
                raise errors.ApiError(
                    400, "unsupported_model",
                    f"{spec.model.name} is a cross-encoder: it scores pairs, it has no embeddings",
                )  # fmt: skip
            if not texts:
                raise errors.ApiError(422, "validation_error", "input: must not be empty")
            check_texts(texts, self.cfg.limits, self.cfg.limits.max_inputs, "input")
            encoded = await self._tokenize(spec, texts, t)
            self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
            packed = Sequences.pack(encoded)
            call = RankCall(packed, False, RankerOutput.EMBEDDINGS, t.deadline, spec.model.key)
            ranked = await self._call("rerank", packed, lambda: self._ranker.score(call), t)
            t.served.append((spec.model.name, ranked.version))
            return ranked.values, self._usage(packed)

        return await self._routed("rerank", trace, work)  # embeddings are not shadowed: nothing to rank

    async def _classify_route(
        self, texts: list[str], truncate: bool, top_k: int | None, raw_scores: bool, what: str, trace: Trace
    ) -> tuple[list[Encoded], Classified, schemas.Usage]:
        async def work(spec: VersionSpec, t: Trace) -> tuple[list[Encoded], Classified, schemas.Usage]:
            encoded = await self._encode_inputs(spec, texts, truncate, what, t)
            result, usage = await self._classify_texts(spec, encoded, top_k, raw_scores, t)
            return encoded, result, usage

        return await self._routed("classify", trace, work, _top1_agreement)

    async def _classify_texts(
        self, spec: VersionSpec, encoded: list[Encoded], top_k: int | None, raw_scores: bool, trace: Trace
    ) -> tuple[Classified, schemas.Usage]:
        packed = Sequences.pack(encoded)
        call = ClassifyCall(packed, top_k, raw_scores, trace.deadline, spec.model.key)
        result = await self._call("classify", packed, lambda: self._intent.classify(call), trace)
        trace.served.append((spec.model.name, result.version))
        return result, self._usage(packed)

    async def _encode_inputs(
        self, spec: VersionSpec, texts: list[str], truncate: bool, what: str, trace: Trace
    ) -> list[Encoded]:
        if not texts:
            raise errors.ApiError(422, "validation_error", f"{what}: must not be empty")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_inputs, what)
        encoded = await self._tokenize(spec, texts, trace)
        self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
        return encoded

    def _admit(self, request: Request, trace: Trace, *tasks: Task) -> None:
        """Admit a request at the door, before its body is read, or refuse it (503) there: the one decision.

        Its expected wait is the tokenizer threads' queue (if its body may hold text for them: a body of at
        most ``INLINE_TOKENIZE_CHARS`` bytes is tokenized on the event loop) plus the longest of its models'
        queues, and the budget is ``batching.max_queue_wait_s`` (``overload_queue_wait_s`` while either queue is
        refusing in earnest: ``Admission.budget_s``). An admitted request joins those queues at
        once, its cost estimated from its body's size (``Content-Length``; characters and tokens per byte as
        measured on this route and model), so requests arriving together see each other. Once admitted it is
        never refused by our own admission control: a refusal after tokenizing wastes the work (measured on an
        H100 node at 4x overload: 1,700 of 9,000 refusals came after tokenizing, about 7 of its 16 cores).
        """
        size = request.headers.get("content-length")
        body = int(size) if size is not None and size.isdigit() else None
        tok = self._tokenizer_admission
        threads = body is None or body > INLINE_TOKENIZE_CHARS
        tok_wait = tok.expected_wait_s() if threads else 0.0
        waits = {task: self._admission[task].expected_wait_s() for task in tasks}
        slowest = max(tasks, key=waits.__getitem__)
        wait = tok_wait + waits[slowest]
        budget = min(tok.budget_s(), self._admission[slowest].budget_s())  # one, for the whole path
        if budget > 0 and wait > budget:
            (tok if tok_wait > waits[slowest] else self._admission[slowest]).refuse(wait, budget)
        trace.body_bytes = body or 0
        if threads and body:  # characters, estimated until the text is parsed (``_measured``)
            held = max(1, int(body * self._chars_per_byte.get(trace.route, INITIAL_CHARS_PER_BYTE)))
            tok.reserve(held)
            trace.tokenizer_held = held
        for task in tasks:
            estimate = int(trace.body_bytes * self._tokens_per_byte.get((trace.route, task), INITIAL_TOKENS_PER_BYTE))
            self._admission[task].reserve(estimate)
            trace.models_held[task] = estimate

    def _release(self, trace: Trace) -> None:
        """What a request still holds in the queues when it ends (failed, timed out, or never called a model)."""
        self._tokenized(trace)
        for task, held in trace.models_held.items():
            self._admission[task].release(held)
        trace.models_held.clear()

    def _tokenized(self, trace: Trace) -> None:
        """The request's text has left the tokenizer threads' queue."""
        if trace.tokenizer_held:
            self._tokenizer_admission.release(trace.tokenizer_held)
            trace.tokenizer_held = 0

    async def _call(self, task: Task, packed: Sequences, call: Callable[[], Awaitable[T]], trace: Trace) -> T:
        """Make a model call, keeping the model's queue estimate current. A request admitted at the door has
        its estimate replaced by the known cost; any other call (a shadow's) is checked here."""
        adm = self._admission[task]
        cost = int(bucket_lengths(packed.lengths(), self.cfg.batching.buckets).sum())
        self._tokenized(trace)  # a model is called once the request's text is tokenized
        estimate = trace.models_held.pop(task, None)
        if estimate is None:
            adm.admit(cost)  # raises Overloaded (503) if the wait is over budget; nothing was sent
        else:
            adm.resize(estimate, cost)
            if trace.body_bytes:  # learn this route's tokens per body byte for the next estimates
                key, ratio = (trace.route, task), cost / trace.body_bytes
                old = self._tokens_per_byte.get(key, ratio)
                self._tokens_per_byte[key] = old + PER_BYTE_SMOOTHING * (ratio - old)
        started = time.monotonic()
        try:
            result = await call()
        finally:
            adm.release(cost)
        adm.observe(cost, started)
        return result

    @staticmethod
    def _usage(packed: Sequences) -> schemas.Usage:
        return schemas.Usage(total_tokens=packed.total_tokens, truncated_inputs=int(packed.truncated.sum()))

    @staticmethod
    def _json(model: Any, usage: schemas.Usage | None = None) -> JSONResponse:
        headers = {"X-Truncated-Inputs": str(usage.truncated_inputs)} if usage is not None else None
        if isinstance(model, list):
            return JSONResponse([m.model_dump(exclude_none=True) for m in model], headers=headers)
        return JSONResponse(model.model_dump(exclude_none=True), headers=headers)

    @staticmethod
    def _order(scores: list[float], top_n: int | None) -> list[int]:
        return sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]

    @staticmethod
    def _cohere_meta(version: str, usage: schemas.Usage) -> schemas.CohereMeta:
        return schemas.CohereMeta(
            api_version=schemas.ApiVersion(version=version),
            billed_units=schemas.BilledUnits(search_units=1),
            tokens=schemas.Tokens(input_tokens=usage.total_tokens),
        )

    def _check_dimensions(self, requested: int | None, width: int) -> None:
        if requested is not None and requested != width:
            raise errors.ApiError(
                422,
                "validation_error",
                f"dimensions: {self.cfg.model_for('rerank').name} embeds in {width} dimensions only",
            )

    # -- routes: re-ranking -----------------------------------------------------------------------

    async def _tei_rerank(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "rerank")  # before reading the body: a refusal costs almost nothing
        req = parse(await self._read(request), schemas.TeiRerankRequest)
        out = await self._rerank(
            RerankInput(req.query, req.texts, req.truncate, req.raw_scores, req.chunking, req.first_stage()), trace
        )
        items = [
            schemas.TeiRerankItem(
                index=i, score=out.scores[i], text=req.texts[i] if req.return_text else None, model_score=out.model(i)
            )
            for i in self._order(out.scores, None)
        ]
        return self._json(items, out.usage)

    async def _cohere_rank(
        self, req: schemas.CohereRerankRequest, trace: Trace
    ) -> tuple[list[str], Reranked, list[int]]:
        self._check_model("rerank", req.model)
        texts = req.texts()
        out = await self._rerank(
            RerankInput(
                req.query, texts, req.truncate, req.raw_scores, req.chunking, req.first_stage(), req.max_tokens_per_doc
            ),
            trace,
        )
        return texts, out, self._order(out.scores, req.top_n)

    async def _cohere_v1_rerank(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "rerank")
        req = parse(await self._read(request), schemas.CohereRerankRequest)
        texts, out, order = await self._cohere_rank(req, trace)
        results = self._cohere_results(texts, out, order, req.return_documents)
        body = schemas.CohereRerankResponse(
            id=uuid.uuid4().hex, results=results, model=self.cfg.model_for("rerank").name, usage=out.usage,
            meta=self._cohere_meta("1", out.usage),
        )  # fmt: skip
        return self._json(body, out.usage)

    @staticmethod
    def _cohere_results(
        texts: list[str], out: Reranked, order: list[int], documents: bool
    ) -> list[schemas.CohereResult]:
        return [
            schemas.CohereResult(
                index=i,
                relevance_score=out.scores[i],
                document=schemas.CohereDocument(text=texts[i]) if documents else None,
                model_score=out.model(i),
            )
            for i in order
        ]

    async def _cohere_v2_rerank(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "rerank")
        req = parse(await self._read(request), schemas.CohereV2RerankRequest)
        _, out, order = await self._cohere_rank(req, trace)
        results = [
            schemas.CohereV2Result(index=i, relevance_score=out.scores[i], model_score=out.model(i)) for i in order
        ]
        body = schemas.CohereV2RerankResponse(
            id=uuid.uuid4().hex, results=results, meta=self._cohere_meta("2", out.usage)
        )
        return self._json(body, out.usage)

    # -- routes: embeddings -----------------------------------------------------------------------

    async def _openai_embeddings(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "rerank")
        req = parse(await self._read(request), schemas.OpenAIEmbeddingsRequest)
        self._check_model("rerank", req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if any(not isinstance(t, str) for t in texts):
            raise errors.ApiError(
                422, "unsupported_input",
                "input: token ids are not accepted (they would be another tokenizer's ids); send text. "
                "LangChain's OpenAIEmbeddings: set check_embedding_ctx_length=False",
            )  # fmt: skip
        vectors, usage = await self._embed([t for t in texts if isinstance(t, str)], True, trace)
        self._check_dimensions(req.dimensions, int(vectors.shape[1]))
        data = [
            schemas.OpenAIEmbedding(
                index=i,
                embedding=base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                if req.encoding_format == "base64"
                else v.tolist(),
            )
            for i, v in enumerate(vectors)
        ]
        tokens = schemas.OpenAIUsage(prompt_tokens=usage.total_tokens, total_tokens=usage.total_tokens)
        body = schemas.OpenAIEmbeddingsResponse(data=data, model=self.cfg.model_for("rerank").name, usage=tokens)
        return self._json(body, usage)

    async def _tei_embed(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "rerank")
        req = parse(await self._read(request), schemas.TeiEmbedRequest)
        if not req.normalize:
            raise errors.ApiError(
                422,
                "validation_error",
                "normalize: false is not supported; this model's graph ends in L2 normalization",
            )
        if req.truncation_direction.lower() != "right":
            raise errors.ApiError(422, "validation_error", "truncation_direction: only right is supported")
        if req.prompt_name is not None:
            raise errors.ApiError(422, "validation_error", "prompt_name: this model has no prompts")
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        vectors, usage = await self._embed(texts, req.truncate, trace)
        self._check_dimensions(req.dimensions, int(vectors.shape[1]))
        return JSONResponse(vectors.tolist(), headers={"X-Truncated-Inputs": str(usage.truncated_inputs)})

    # -- routes: intent ---------------------------------------------------------------------------

    async def _classify(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "classify")
        req = parse(await self._read(request), schemas.ClassifyRequest)
        self._check_model("classify", req.model)
        encoded, result, usage = await self._classify_route(
            req.texts(), req.truncate, req.top_k, False, "inputs", trace
        )
        oos = self.cfg.model_for("classify").oos_label
        results = [
            schemas.ClassifyResult(
                index=i,
                label=names[0],
                score=p[0],
                out_of_scope=names[0] == oos,
                top_k=[schemas.LabelScore(label=lab, score=s) for lab, s in zip(names, p, strict=True)],
                truncated=e.truncated,
            )
            for i, (names, p, e) in enumerate(zip(result.labels, result.scores.tolist(), encoded, strict=True))
        ]
        body = schemas.ClassifyResponse(results=results, model=self.cfg.model_for("classify").name, usage=usage)
        return self._json(body, usage)

    async def _tei_predict(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "classify")
        req = parse(await self._read(request), schemas.TeiPredictRequest)
        texts, batch = _predict_texts(req.inputs)
        _, result, usage = await self._classify_route(texts, req.truncate, None, req.raw_scores, "inputs", trace)
        rows = [
            [{"score": s, "label": lab} for lab, s in zip(names, p, strict=True)]
            for names, p in zip(result.labels, result.scores.tolist(), strict=True)
        ]
        return JSONResponse(rows if batch else rows[0], headers={"X-Truncated-Inputs": str(usage.truncated_inputs)})

    # -- routes: the search backend's one call ---------------------------------------------------

    async def _search(self, request: Request, trace: Trace) -> Response:
        self._admit(request, trace, "rerank", "classify")
        req = parse(await self._read(request), schemas.SearchRequest)
        texts = req.texts()
        rerank = RerankInput(req.query, texts, req.truncate, False, req.chunking, req.first_stage())
        check_texts([req.query], self.cfg.limits, 1, "query")  # before either model is called
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_documents, "documents")
        out, (_, intent, _) = await _both(
            self._rerank(rerank, trace),
            self._classify_route([req.query], True, req.intent_top_k, False, "query", trace),
        )
        usage = out.usage
        names, probs = intent.labels[0], intent.scores[0].tolist()
        results = self._cohere_results(texts, out, self._order(out.scores, req.top_n), req.return_documents)
        versions = dict(trace.served)
        ranker, intent_model = self.cfg.model_for("rerank"), self.cfg.model_for("classify")
        body = schemas.SearchResponse(
            intent=schemas.QueryIntent(
                label=names[0],
                score=probs[0],
                out_of_scope=names[0] == intent_model.oos_label,
                top_k=[schemas.LabelScore(label=lab, score=p) for lab, p in zip(names, probs, strict=True)],
            ),
            results=results,
            models=schemas.SearchModels(
                ranker=ranker.name,
                ranker_version=versions[ranker.name],
                intent=intent_model.name,
                intent_version=versions[intent_model.name],
            ),
            usage=usage,
        )
        return self._json(body, usage)

    # -- routes: operations -----------------------------------------------------------------------

    def check_health(self) -> None:
        for server in self._local.values():
            server.check_health()

    async def _health(self, request: Request, trace: Trace) -> Response:
        return JSONResponse({"status": "ok"})

    async def _model_infos(self, timeout_s: float) -> list[dict[str, Any]]:
        calls = [self._ranker.info(), self._intent.info()]
        return list(await asyncio.wait_for(asyncio.gather(*calls), timeout=timeout_s))

    async def _ready(self, request: Request, trace: Trace) -> Response:
        try:
            infos = await self._model_infos(timeout_s=5.0)
        except (TimeoutError, BackPressureError, RayActorError):
            infos = []
        ready = len(infos) == 2 and all(i.get("ready") for i in infos)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _version_report(self, task: Task, replica: dict[str, Any]) -> list[dict[str, Any]]:
        """Every version of ``task``: what the model replica reports of it (backend, gate, state), and what this
        ingress adds (its role in the route, traffic share, requests answered, shadow agreement)."""
        router = self._routers[task]
        route, shares = router.route, router.route.weights()
        reported = {ModelKey(v["name"], v["version"]): v for v in replica.get("versions", [])}
        for key, why in self._spec_errors.items():
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
                admission=self._admission[task].as_dict(),  # this ingress replica's view
            )
            spec = self._specs.get(key)
            if spec is not None and spec.encoder.chunk_cache is not None:  # this ingress replica's
                entry["chunk_cache"] = spec.encoder.chunk_cache.as_dict()
            if mine and route.shadow is not None and key.version == route.shadow.version:  # also a canary maybe
                serving = ModelKey(route.model, route.version)
                entry["shadow"] = self._agreement.get((serving, key), AgreementStats()).as_dict()
                entry["shadow_share"] = route.shadow.share if route.shadow else 0.0
            out.append(entry)
        order = {"serving": 0, "canary": 1, "shadow": 2, "previous": 3, "standby": 4}
        return sorted(out, key=lambda e: order[e["role"]])

    async def _infos_or_503(self) -> list[dict[str, Any]]:
        try:
            return await self._model_infos(timeout_s=10.0)
        except TimeoutError:
            raise errors.unavailable("model deployments did not answer in time") from None

    async def _models(self, request: Request, trace: Trace) -> Response:
        infos = await self._infos_or_503()
        cards, versions = [], []
        for task, info in zip(TASKS, infos, strict=True):
            model = self.cfg.model_for(task)
            report = self._version_report(task, info)
            versions += report
            cards.append(
                schemas.ModelCard(
                    id=model.name, created=0, owned_by="serve-app", aliases=list(model.aliases), task=model.task,
                    versions=[e["version"] for e in report if e["name"] == model.name],
                )
            )  # fmt: skip
        return self._json(schemas.ModelsResponse(data=cards, models=versions))

    async def _tei_info(self, request: Request, trace: Trace) -> Response:
        infos = await self._infos_or_503()
        ranker, intent = (self._version_report(task, info)[0] for task, info in zip(TASKS, infos, strict=True))
        b, limits = self.cfg.batching, self.cfg.limits
        serving = self.cfg.model_for("rerank")
        model_type: dict[str, Any] = (
            {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
            if self._specs[serving.key].pairs
            else {"embedding": {"pooling": "mean"}}
        )
        info = schemas.TeiInfo(
            model_id=serving.name,
            model_sha=ranker.get("digest"),
            model_dtype=str(ranker.get("precision", "float32")),
            model_type=model_type,
            max_concurrent_requests=self.cfg.scaling_for("ingress").max_ongoing_requests,
            max_input_length=int(ranker.get("max_length", b.buckets[-1])),
            max_batch_tokens=b.max_batch_tokens,
            max_batch_requests=None,
            max_client_batch_size=max(limits.max_inputs, limits.max_documents),
            auto_truncate=True,
            tokenization_workers=1,
            version="serve-app 0.1.0",
            models=[ranker, intent],
        )
        return self._json(info)

    async def _openapi(self, request: Request, trace: Trace) -> Response:
        return JSONResponse(openapi.document())

    async def _docs(self, request: Request, trace: Trace) -> Response:
        return openapi.docs_page(request.scope.get("root_path", "") + routes.OPENAPI.path)


def _rank_agreement(serving: Reranked, shadow: Reranked) -> float:
    """The model's own scores (before fusion, which both share) ranked alike?"""
    a = serving.model_scores if serving.model_scores is not None else serving.scores
    b = shadow.model_scores if shadow.model_scores is not None else shadow.scores
    return rank_agreement(np.asarray(a), np.asarray(b))


def _top1_agreement(
    serving: tuple[list[Encoded], Classified, schemas.Usage], shadow: tuple[list[Encoded], Classified, schemas.Usage]
) -> float:
    return top1_agreement([labels[0] for labels in serving[1].labels], [labels[0] for labels in shadow[1].labels])


A = TypeVar("A")
B = TypeVar("B")


async def _both(a: Awaitable[A], b: Awaitable[B]) -> tuple[A, B]:
    """Both results; if one fails the other is cancelled (its model work is dropped) and the error raised."""
    first, second = asyncio.ensure_future(a), asyncio.ensure_future(b)
    done, pending = await asyncio.wait({first, second}, return_when=asyncio.FIRST_EXCEPTION)
    failed = next((d.exception() for d in done if d.exception() is not None), None)
    if failed is not None:
        for f in pending:
            f.cancel()
        raise failed
    return first.result(), second.result()


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _predict_texts(inputs: str | list[str] | list[list[str]]) -> tuple[list[str], bool]:
    """TEI's ``inputs`` as texts, and whether the answer is a batch (a list per input)."""

    def pairs() -> errors.ApiError:
        return errors.ApiError(
            422, "unsupported_input", "inputs: text pairs are not supported; this classifier reads single texts"
        )

    if isinstance(inputs, str):
        return [inputs], False
    if not inputs:
        return [], False
    if all(isinstance(x, str) for x in inputs):
        if len(inputs) == 2:
            raise pairs()
        if len(inputs) > 2:
            raise errors.ApiError(
                422, "validation_error", "inputs: a list of strings is a text or a pair; batch as [[a], [b]]"
            )
        return [str(inputs[0])], False
    texts: list[str] = []
    for i, x in enumerate(inputs):
        if isinstance(x, str) or len(x) not in (1, 2):
            raise errors.ApiError(422, "validation_error", f"inputs[{i}]: expected [text]")
        if len(x) == 2:
            raise pairs()
        texts.append(x[0])
    return texts, True


def _chars(texts: list[str], per_text: int = 0) -> int:
    """Characters the tokenizer reads for ``texts``, each with ``per_text`` more (a cross-encoder's query)."""
    return sum(len(t) for t in texts) + per_text * len(texts)
