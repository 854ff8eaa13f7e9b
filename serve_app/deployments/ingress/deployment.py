"""The ``Ingress`` deployment: HTTP routes in, validated and tokenized requests out to the models.

The routes speak each client's shape (TEI, Cohere v1/v2, OpenAI embeddings, our classify and search) and
share one path: admit at the door (``door``), parse, tokenize on this replica (``tokenizer_threads``) with
the tokenizer of the version chosen for the request (``versions``), call the model, shape the answer.

Where the models run is the config's ``model_placement``: their own deployments (handles passed in; GPUs,
per-model autoscaling) or this process (no handles; the laptop default, where an actor hop costs more than
the model). The ingress code is the same for both (``model_client``).

Every failure a client can cause maps to a JSON error with a 4xx status; a full downstream queue or an
admission refusal is a 503 with ``Retry-After`` at once (never a hang); nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, openapi, routes, schemas
from serve_app.api.auth import ApiKeys
from serve_app.api.http import ARRIVED_HEADER, check_texts, parse, read_body
from serve_app.api.routes import Route
from serve_app.batching.buckets import bucket_lengths
from serve_app.config import AppConfig, AuthConfig, ModelConfig, Task, env_api_keys
from serve_app.core.backend import DeadlineExceeded, ModelUnavailable, Overloaded, VersionNotReady
from serve_app.core.sequences import Encoded, Sequences
from serve_app.deployments.encoder import (
    Classified,
    ClassifyCall,
    EncoderServer,
    Intent,
    RankCall,
    Ranker,
    RankerOutput,
)
from serve_app.deployments.haproxy_launcher import launcher_stamps
from serve_app.deployments.ingress.arrival_clock import ArrivalClock
from serve_app.deployments.ingress.door import Door
from serve_app.deployments.ingress.rerank import Reranked, RerankInput, RerankSequences, reranked_agreement
from serve_app.deployments.ingress.tokenizer_threads import TokenizerThreads
from serve_app.deployments.ingress.trace import Trace
from serve_app.deployments.ingress.versions import TASKS, Versions, VersionSpec
from serve_app.deployments.model_client import IntentClient, RankerClient, RemoteIntent, RemoteModel, RemoteRanker
from serve_app.deployments.pauses import PROCESS_PAUSES
from serve_app.deployments.python_gc import apply_python_gc
from serve_app.deployments.replicas import replica_id
from serve_app.deployments.telemetry import RefusalReason, ingress_metrics
from serve_app.models.tokenizer import cap_document_tokens
from serve_app.ranking.chunks import ChunkMap, aggregate
from serve_app.ranking.fusion import fuse
from serve_app.rollout.agreement import top1_agreement

log = logging.getLogger("ray.serve")
UNMATCHED = "unmatched"  # the route tag of requests to no route (keeps the metric's tag values bounded)
Handler = Callable[[Request, Trace], Awaitable[Response]]


class Ingress:
    """The HTTP deployment: each route admitted at the door, tokenized here, answered by the models."""

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
        self._keys = ApiKeys()
        self._metrics = ingress_metrics()
        self._door = Door()
        self._counts_arrival_wait = False  # set by reconfigure
        self._arrivals = ArrivalClock()
        self._calls_by_reference: bool | None = None  # model calls: Ray actor calls (True) or Serve's gRPC
        self._versions = Versions(self._metrics)
        self._tokenizer = TokenizerThreads(self._door.tokenizer, self._door.measured)
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
        PROCESS_PAUSES.watch()
        for task, server in self._local.items():  # in-process models: the first load before serving, later
            await server.reconfigure(cfg.task_serving(task).model_dump(mode="json"))  # ones in the background
        ranker, intent = self._handles
        if ranker is not None and intent is not None:
            by_reference = not cfg.ray_serve.grpc_between_deployments  # Ray actor calls, or Serve's gRPC
            new_transport = by_reference != self._calls_by_reference  # the first config, or another transport
            if new_transport:
                ranker, intent = (h.options(_by_reference=by_reference) for h in (ranker, intent))
                self._calls_by_reference = by_reference
                if self._cfg is None:
                    self._ranker = RemoteRanker(ranker, cfg.batching.calls_in_flight, "Ranker")
                    self._intent = RemoteIntent(intent, cfg.batching.calls_in_flight, "Intent")
            for task, client, handle in (("rerank", self._ranker, ranker), ("classify", self._intent, intent)):
                if isinstance(client, RemoteModel):
                    client.calls.max_in_flight = cfg.batching.calls_in_flight
                    client.holds_start_by = self._door.models[task].holds_start_by
                    client.late_refusal_s = cfg.batching.overload_late_refusal_s
                    if new_transport:  # every replica serves both transports
                        client.use_handle(handle)
        self._versions.load(cfg)
        self._tokenizer.resize(cfg.tokenizer_threads())
        self._door.configure(cfg.batching)
        # HAProxy's stamp is there (and a client's replaced) only where our launcher runs it with its shedding
        # rules: asked of the environment this process has from Ray, not of the config (``haproxy: auto`` with no
        # binary, or a Ray started without the launcher, would read a caller's header as HAProxy's)
        self._counts_arrival_wait = cfg.batching.count_wait_before_ingress and launcher_stamps()
        self._keys = ApiKeys(AuthConfig(api_keys=(*cfg.auth.api_keys, *env_api_keys())).api_keys)
        self._cfg = cfg

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
                self._door.release(trace)
        except errors.ApiError as e:
            response = e.response()
        took = time.perf_counter() - started
        if trace.served and response.status_code == 200:  # which version answered, and where the time went
            response.headers["X-Model-Version"] = trace.header()
            response.raw_headers += trace.timing.raw_headers(took)
        model, version = trace.tags()
        self._metrics.request(route, response.status_code, model, version, took)
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
            refusal = RefusalReason.STARTED_LATE if e.started_late else RefusalReason.QUEUE_WAIT
            return errors.overloaded(e.retry_after_s, e.started_late).response()
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

    async def _tokenize(
        self, spec: VersionSpec, texts: list[str], trace: Trace, query: str | None = None
    ) -> list[Encoded]:
        enc = spec.encoder
        if query is not None:
            return await self._tokenizer.encode(texts, None, lambda part: enc.encode_pairs(query, part), trace, query)
        return await self._tokenizer.encode(texts, None, enc.encode, trace, lookup=enc.lookup)

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
            encoded = await self._tokenizer.encode(texts, query, spec.encoder.encode, trace, lookup=spec.encoder.lookup)
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

        seqs, chunks = await self._tokenizer.run(texts, query, windows, trace, pairs=pair_query is not None)
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
        start_by, held = self._door.start_by("rerank", trace)
        call = RankCall(packed, spec.pairs, output, trace.deadline, spec.model.key, start_by, held)
        ranked = await self._door.call("rerank", self._cost(packed), lambda: self._ranker.score(call), trace)
        trace.served.append((spec.model.name, ranked.version))
        trace.timing.replied(ranked.timing)
        return ranked.values, self._usage(packed)

    async def _rerank(self, req: RerankInput, trace: Trace) -> Reranked:
        """Score every document, windows aggregated per document, fused with the first stage if it was sent."""

        async def work(spec: VersionSpec, t: Trace) -> Reranked:
            return await self._score_documents(req, await self._encode_rerank(spec, req, t), spec, t)

        return await self._versions.routed("rerank", trace, work, reranked_agreement)

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
            start_by, held = self._door.start_by("rerank", t)
            call = RankCall(packed, False, RankerOutput.EMBEDDINGS, t.deadline, spec.model.key, start_by, held)
            ranked = await self._door.call("rerank", self._cost(packed), lambda: self._ranker.score(call), t)
            t.served.append((spec.model.name, ranked.version))
            t.timing.replied(ranked.timing)
            return ranked.values, self._usage(packed)

        return await self._versions.routed("rerank", trace, work)  # embeddings are not shadowed: nothing to rank

    async def _classify_route(
        self, texts: list[str], truncate: bool, top_k: int | None, raw_scores: bool, what: str, trace: Trace
    ) -> tuple[list[Encoded], Classified, schemas.Usage]:
        async def work(spec: VersionSpec, t: Trace) -> tuple[list[Encoded], Classified, schemas.Usage]:
            encoded = await self._encode_inputs(spec, texts, truncate, what, t)
            result, usage = await self._classify_texts(spec, encoded, top_k, raw_scores, t)
            return encoded, result, usage

        return await self._versions.routed("classify", trace, work, _top1_agreement)

    async def _classify_texts(
        self, spec: VersionSpec, encoded: list[Encoded], top_k: int | None, raw_scores: bool, trace: Trace
    ) -> tuple[Classified, schemas.Usage]:
        packed = Sequences.pack(encoded)
        start_by, held = self._door.start_by("classify", trace)
        call = ClassifyCall(packed, top_k, raw_scores, trace.deadline, spec.model.key, start_by, held)
        result = await self._door.call("classify", self._cost(packed), lambda: self._intent.classify(call), trace)
        trace.served.append((spec.model.name, result.version))
        trace.timing.replied(result.timing)
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
        """Admit a request at the door, before its body is read (a refusal costs almost nothing), or refuse
        it with 503 there: the one admission decision (``Door``)."""
        size = request.headers.get("content-length")
        waited = 0.0
        if self._counts_arrival_wait:
            peer = request.client.host if request.client else ""
            waited = trace.timing.wait_s = self._arrivals.wait_s(peer, request.headers.get(ARRIVED_HEADER), time.time())
        self._door.admit(int(size) if size is not None and size.isdigit() else None, trace, *tasks, waited_s=waited)

    def _cost(self, packed: Sequences) -> int:
        """A model call's cost in padded tokens: what it holds in the model's queue (``Door.call``) while it runs."""
        return int(bucket_lengths(packed.lengths(), self.cfg.batching.buckets).sum())

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
            for i in out.order()
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
        return texts, out, out.order(req.top_n)

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
        results = self._cohere_results(texts, out, out.order(req.top_n), req.return_documents)
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
        """``Versions.report``, and which ingress replica answered with its process's pauses (``pauses``)."""
        report = self._versions.report(task, replica, self._door.models[task])
        ingress = {
            "replica": replica_id(),
            "pauses": PROCESS_PAUSES.as_dict(),
            "haproxy_clock_base_ms": self._arrivals.bases_ms(),  # per HAProxy address (``ArrivalClock``)
            "model_calls": {None: "in_process", True: "actor", False: "grpc"}[self._calls_by_reference],
        }
        for entry in report:
            entry["ingress"] = ingress
        return report

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
            if self._versions.specs[serving.key].pairs
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
