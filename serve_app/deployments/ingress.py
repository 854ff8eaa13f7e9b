"""HTTP ingress: validates, tokenizes through the tokenizer deployment, fans out to the model deployments.

Every failure a client can cause maps to a JSON error with a 4xx status; a full downstream queue is a
503 with ``Retry-After`` at once (never a hang); nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, schemas
from serve_app.api.http import check_texts, parse, read_body
from serve_app.batching.buckets import Encoded
from serve_app.config import AppConfig
from serve_app.deployments.tokenizer import TokenizeJob

log = logging.getLogger("ray.serve")
Handler = Callable[[Request], Awaitable[Response]]


class Ingress:
    def __init__(self, tokenizer: DeploymentHandle, ranker: DeploymentHandle, intent: DeploymentHandle) -> None:
        self._tokenizer = tokenizer
        self._ranker = ranker
        self._intent = intent
        self._cfg: AppConfig | None = None
        self._ranker_pairs: bool | None = None
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/rerank"): self._tei_rerank,
            ("POST", "/v1/rerank"): self._cohere_rerank,
            ("POST", "/v1/classify"): self._classify,
            ("GET", "/health"): self._health,
            ("GET", "/ready"): self._ready,
            ("GET", "/v1/models"): self._models,
        }

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._cfg = AppConfig.model_validate(user_config)
        self._ranker_pairs = None  # the ranker may have changed between bi- and cross-encoder

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
        except (RayActorError, RayTaskError) as e:
            if isinstance(e, RayTaskError) and isinstance(e.cause, BackPressureError):
                return errors.overloaded().response()
            log.exception("downstream replica failed")
            return errors.unavailable("a model replica failed; retry").response()
        except Exception:  # a bug of ours: say so in JSON, keep serving
            log.exception("unhandled error on %s", path)
            return JSONResponse({"error": "internal error", "error_type": "internal_error"}, status_code=500)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _tokenize(self, role: str, texts: list[str], query: str | None = None) -> list[Encoded]:
        result: list[Encoded] = await self._tokenizer.encode.remote(TokenizeJob(role, texts, query))
        return result

    async def _ranker_uses_pairs(self) -> bool:
        if self._ranker_pairs is None:
            self._ranker_pairs = bool(await self._tokenizer.needs_pairs.remote("ranker"))
        return self._ranker_pairs

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
        max_len = self.cfg.batching.buckets[-1]
        if await self._ranker_uses_pairs():
            docs = await self._tokenize("ranker", texts, query=query)
            self._refuse_truncation(truncate, docs, max_len)
            scores = await self._ranker.score.remote(None, docs, raw_scores)
            encoded = docs
        else:
            encoded = await self._tokenize("ranker", [query, *texts])
            self._refuse_truncation(truncate, encoded, max_len)
            scores = await self._ranker.score.remote(encoded[0], encoded[1:], raw_scores)
        usage = schemas.Usage(
            total_tokens=sum(len(e) for e in encoded), truncated_inputs=sum(e.truncated for e in encoded)
        )
        return scores, usage

    @staticmethod
    def _json(model: Any, usage: schemas.Usage | None = None) -> JSONResponse:
        headers = {"X-Truncated-Inputs": str(usage.truncated_inputs)} if usage is not None else None
        if isinstance(model, list):
            return JSONResponse([m.model_dump(exclude_none=True) for m in model], headers=headers)
        return JSONResponse(model.model_dump(exclude_none=True), headers=headers)

    # -- routes -----------------------------------------------------------------------------------

    async def _tei_rerank(self, request: Request) -> Response:
        req = parse(await read_body(request, self.cfg.limits.max_body_bytes), schemas.TeiRerankRequest)
        scores, usage = await self._rank(req.query, req.texts, req.truncate, req.raw_scores)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        items = [
            schemas.TeiRerankItem(index=i, score=scores[i], text=req.texts[i] if req.return_text else None)
            for i in order
        ]
        return self._json(items, usage)

    async def _cohere_rerank(self, request: Request) -> Response:
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
        req = parse(await read_body(request, self.cfg.limits.max_body_bytes), schemas.ClassifyRequest)
        if req.model is not None and req.model != self.cfg.intent.name:
            raise errors.ApiError(404, "model_not_found", f"model {req.model!r} is not served here")
        texts = req.texts()
        if not texts:
            raise errors.ApiError(422, "validation_error", "inputs: must not be empty")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_inputs, "inputs")
        encoded = await self._tokenize("intent", texts)
        self._refuse_truncation(req.truncate, encoded, self.cfg.batching.buckets[-1])
        top = await self._intent.classify.remote(encoded, req.top_k)
        oos = self.cfg.intent.oos_label
        results = [
            schemas.ClassifyResult(
                index=i,
                label=labels[0][0],
                score=labels[0][1],
                out_of_scope=labels[0][0] == oos,
                top_k=[schemas.LabelScore(label=lab, score=s) for lab, s in labels],
                truncated=e.truncated,
            )
            for i, (labels, e) in enumerate(zip(top, encoded, strict=True))
        ]
        usage = schemas.Usage(
            total_tokens=sum(len(e) for e in encoded), truncated_inputs=sum(e.truncated for e in encoded)
        )
        return self._json(schemas.ClassifyResponse(results=results, model=self.cfg.intent.name, usage=usage), usage)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _model_infos(self, timeout_s: float) -> list[dict[str, Any]]:
        calls = [self._ranker.info.remote(), self._intent.info.remote()]
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
        return JSONResponse({"models": infos})
