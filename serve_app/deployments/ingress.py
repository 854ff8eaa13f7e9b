"""HTTP ingress and CPU tokenizer in one deployment: validates, tokenizes, calls the models.

Tokenizing here saves an actor hop per request (HTTP → ingress → model instead of HTTP → ingress →
tokenizer → model); the ingress scales on its own CPU replicas. Short inputs are tokenized on the
event loop (Rust, microseconds); long ones on a worker thread (the Rust tokenizer releases the GIL).
The sequences travel packed as numpy arrays (``Sequences``).

Where the models run is the config's ``model_placement``: their own deployments (handles passed in;
GPUs, per-model autoscaling) or this process (no handles; the laptop default, where an actor hop
costs more than the model). The ingress code is the same for both (``model_client``).

Every failure a client can cause maps to a JSON error with a 4xx status; a full downstream queue or
an admission refusal is a 503 with ``Retry-After`` at once (never a hang); nothing a client sends
produces a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, schemas
from serve_app.api.http import check_texts, parse, read_body
from serve_app.batching.admission import Admission
from serve_app.batching.buckets import bucket_lengths
from serve_app.config import AppConfig
from serve_app.core.backend import Overloaded
from serve_app.core.sequences import Encoded, Sequences
from serve_app.deployments.encoder import EncoderServer, Intent, Ranker
from serve_app.deployments.model_client import IntentClient, RankerClient, RemoteIntent, RemoteRanker
from serve_app.models.artifacts import tokenizer_spec
from serve_app.models.tokenizer import TextEncoder

log = logging.getLogger("ray.serve")
Handler = Callable[[Request], Awaitable[Response]]
ModelKey = Literal["ranker", "intent"]
T = TypeVar("T")
INLINE_TOKENIZE_CHARS = 2_000  # below this a request is tokenized on the event loop; a thread hop costs more


class Ingress:
    def __init__(self, ranker: DeploymentHandle | None = None, intent: DeploymentHandle | None = None) -> None:
        # no handles: the models live in this process and reconfigure loads them (model_placement: ingress);
        # handles: reconfigure wraps them in clients that share calls between concurrent requests
        self._local: dict[ModelKey, EncoderServer] = {}
        self._handles = (ranker, intent)
        self._ranker: RankerClient
        self._intent: IntentClient
        if ranker is None or intent is None:
            self._ranker, self._intent = Ranker(), Intent()
            self._local = {"ranker": self._ranker, "intent": self._intent}
        self._cfg: AppConfig | None = None
        self._encoders: dict[ModelKey, TextEncoder] = {}
        self._admission: dict[ModelKey, Admission] = {"ranker": Admission(0.0), "intent": Admission(0.0)}
        self._ranker_pairs = False
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/rerank"): self._tei_rerank,
            ("POST", "/v1/rerank"): self._cohere_rerank,
            ("POST", "/v1/classify"): self._classify,
            ("GET", "/health"): self._health,
            ("GET", "/ready"): self._ready,
            ("GET", "/v1/models"): self._models,
        }

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(user_config)
        for key, server in self._local.items():  # in-process models: load (or retune) before serving
            await server.reconfigure(cfg.serving(key).model_dump(mode="json"))
        ranker, intent = self._handles
        if ranker is not None and intent is not None:
            if self._cfg is None:
                self._ranker = RemoteRanker(ranker, cfg.batching.calls_in_flight)
                self._intent = RemoteIntent(intent, cfg.batching.calls_in_flight)
            for client in (self._ranker, self._intent):
                if isinstance(client, RemoteRanker | RemoteIntent):
                    client.calls.max_in_flight = cfg.batching.calls_in_flight
        largest = cfg.batching.buckets[-1]
        specs = {key: tokenizer_spec(getattr(cfg, key), largest) for key in ("ranker", "intent")}
        self._encoders = {key: TextEncoder(s.tokenizer_path, s.max_length) for key, s in specs.items()}  # type: ignore[misc]
        self._ranker_pairs = specs["ranker"].pairs  # a cross-encoder reads (query, document) pairs
        for adm in self._admission.values():
            adm.max_queue_wait_s = cfg.batching.max_queue_wait_s
        self._cfg = cfg

    @property
    def cfg(self) -> AppConfig:
        assert self._cfg is not None, "reconfigure() runs before the first request"
        return self._cfg

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # served under a route prefix
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        handler = self._routes.get((request.method, path))
        try:
            if handler is None:
                if any(p == path for _, p in self._routes):
                    raise errors.ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {path}")
                raise errors.ApiError(404, "not_found", f"no route {path}")
            return await handler(request)
        except errors.ApiError as e:
            return e.response()
        except BackPressureError:
            return errors.overloaded().response()
        except Overloaded as e:
            return errors.overloaded(e.retry_after_s).response()
        except (RayActorError, RayTaskError) as e:
            if isinstance(e.cause if isinstance(e, RayTaskError) else None, BackPressureError):
                return errors.overloaded().response()
            log.exception("downstream replica failed")
            return errors.unavailable("a model replica failed; retry").response()
        except Exception:  # a bug of ours: say so in JSON, keep serving
            log.exception("unhandled error on %s", path)
            return JSONResponse({"error": "internal error", "error_type": "internal_error"}, status_code=500)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _tokenize(self, key: ModelKey, texts: list[str], query: str | None = None) -> list[Encoded]:
        enc = self._encoders[key]
        chars = sum(len(t) for t in texts) + len(query or "")
        if query is not None:
            if chars <= INLINE_TOKENIZE_CHARS:
                return enc.encode_pairs(query, texts)
            return await asyncio.to_thread(enc.encode_pairs, query, texts)
        if chars <= INLINE_TOKENIZE_CHARS:
            return enc.encode(texts)
        return await asyncio.to_thread(enc.encode, texts)

    @staticmethod
    def _refuse_truncation(truncate: bool, encoded: list[Encoded], max_len: int) -> None:
        if not truncate:
            for i, e in enumerate(encoded):
                if e.truncated:
                    raise errors.ApiError(
                        413, "input_too_long", f"input {i} exceeds {max_len} tokens and truncate is false"
                    )

    async def _rank(
        self, query: str, texts: list[str], truncate: bool, raw_scores: bool
    ) -> tuple[list[float], schemas.Usage]:
        check_texts([query], self.cfg.limits, 1, "query")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_documents, "documents")
        pairs = self._ranker_pairs
        if pairs:
            encoded = await self._tokenize("ranker", texts, query=query)
        else:  # bi-encoder: the query is the first sequence
            encoded = await self._tokenize("ranker", [query, *texts])
        self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
        packed = Sequences.pack(encoded)
        scores = await self._call("ranker", packed, lambda: self._ranker.score(packed, pairs, raw_scores))
        return scores.tolist(), self._usage(packed)

    async def _call(self, key: ModelKey, packed: Sequences, call: Callable[[], Awaitable[T]]) -> T:
        """Make a model call if admission control lets it in, keeping the model's queue estimate current."""
        adm = self._admission[key]
        cost = int(bucket_lengths(packed.lengths(), self.cfg.batching.buckets).sum())
        adm.admit(cost)  # raises Overloaded (503) if the wait is now over budget; nothing was sent
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

    # -- routes -----------------------------------------------------------------------------------

    async def _tei_rerank(self, request: Request) -> Response:
        self._admission["ranker"].check()  # before reading the body: a refusal costs almost nothing
        req = parse(await read_body(request, self.cfg.limits.max_body_bytes), schemas.TeiRerankRequest)
        scores, usage = await self._rank(req.query, req.texts, req.truncate, req.raw_scores)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        items = [
            schemas.TeiRerankItem(index=i, score=scores[i], text=req.texts[i] if req.return_text else None)
            for i in order
        ]
        return self._json(items, usage)

    async def _cohere_rerank(self, request: Request) -> Response:
        self._admission["ranker"].check()
        req = parse(await read_body(request, self.cfg.limits.max_body_bytes), schemas.CohereRerankRequest)
        if req.model is not None and req.model != self.cfg.ranker.name:
            raise errors.ApiError(404, "model_not_found", f"model {req.model!r} is not served here")
        texts = req.texts()
        scores, usage = await self._rank(req.query, texts, req.truncate, req.raw_scores)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
        results = [
            schemas.CohereResult(
                index=i,
                relevance_score=scores[i],
                document=schemas.CohereDocument(text=texts[i]) if req.return_documents else None,
            )
            for i in order
        ]
        return self._json(schemas.CohereRerankResponse(results=results, model=self.cfg.ranker.name, usage=usage), usage)

    async def _classify(self, request: Request) -> Response:
        self._admission["intent"].check()
        req = parse(await read_body(request, self.cfg.limits.max_body_bytes), schemas.ClassifyRequest)
        if req.model is not None and req.model != self.cfg.intent.name:
            raise errors.ApiError(404, "model_not_found", f"model {req.model!r} is not served here")
        texts = req.texts()
        if not texts:
            raise errors.ApiError(422, "validation_error", "inputs: must not be empty")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_inputs, "inputs")
        encoded = await self._tokenize("intent", texts)
        self._refuse_truncation(req.truncate, encoded, self.cfg.batching.buckets[-1])
        packed = Sequences.pack(encoded)
        labels, probs = await self._call("intent", packed, lambda: self._intent.classify(packed, req.top_k))
        oos = self.cfg.intent.oos_label
        results = [
            schemas.ClassifyResult(
                index=i,
                label=names[0],
                score=p[0],
                out_of_scope=names[0] == oos,
                top_k=[schemas.LabelScore(label=lab, score=s) for lab, s in zip(names, p, strict=True)],
                truncated=e.truncated,
            )
            for i, (names, p, e) in enumerate(zip(labels, probs.tolist(), encoded, strict=True))
        ]
        usage = self._usage(packed)
        return self._json(schemas.ClassifyResponse(results=results, model=self.cfg.intent.name, usage=usage), usage)

    def check_health(self) -> None:
        for server in self._local.values():
            server.check_health()

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _model_infos(self, timeout_s: float) -> list[dict[str, Any]]:
        calls = [self._ranker.info(), self._intent.info()]
        return list(await asyncio.wait_for(asyncio.gather(*calls), timeout=timeout_s))

    async def _ready(self, request: Request) -> Response:
        try:
            infos = await self._model_infos(timeout_s=5.0)
        except (TimeoutError, BackPressureError, RayActorError):
            infos = []
        ready = len(infos) == 2 and all(i.get("ready") for i in infos)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def _models(self, request: Request) -> Response:
        try:
            infos = await self._model_infos(timeout_s=10.0)
        except TimeoutError:
            raise errors.unavailable("model deployments did not answer in time") from None
        keys: tuple[ModelKey, ModelKey] = ("ranker", "intent")
        for key, info in zip(keys, infos, strict=True):
            info["admission"] = self._admission[key].as_dict()  # this ingress replica's view
        return JSONResponse({"models": infos})
