"""Cohere's re-ranking routes, v1 (also Jina's shape) and v2: ``/v1/rerank``, ``/v2/rerank``."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from serve_app.api import schemas
from serve_app.api.http import parse
from serve_app.deployments.ingress.dialects.responses import json_response
from serve_app.deployments.ingress.pipeline import Pipeline
from serve_app.deployments.ingress.rerank import Reranked, RerankInput
from serve_app.deployments.ingress.trace import Trace


async def v1_rerank(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "rerank")
    req = parse(await p.read(request), schemas.CohereRerankRequest)
    texts, out, order = await _rank(p, req, trace)
    body = schemas.CohereRerankResponse(
        id=uuid.uuid4().hex, results=results(texts, out, order, req.return_documents),
        model=p.cfg.model_for("rerank").name, usage=out.usage, meta=_meta("1", out.usage),
    )  # fmt: skip
    return json_response(body, out.usage)


async def v2_rerank(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "rerank")
    req = parse(await p.read(request), schemas.CohereV2RerankRequest)
    _, out, order = await _rank(p, req, trace)
    ranked = [schemas.CohereV2Result(index=i, relevance_score=out.scores[i], model_score=out.model(i)) for i in order]
    body = schemas.CohereV2RerankResponse(id=uuid.uuid4().hex, results=ranked, meta=_meta("2", out.usage))
    return json_response(body, out.usage)


def results(texts: list[str], out: Reranked, order: list[int], documents: bool) -> list[schemas.CohereResult]:
    """Cohere v1's results, best first (``/v1/search`` answers its documents in this shape too)."""
    return [
        schemas.CohereResult(
            index=i,
            relevance_score=out.scores[i],
            document=schemas.CohereDocument(text=texts[i]) if documents else None,
            model_score=out.model(i),
        )
        for i in order
    ]


async def _rank(p: Pipeline, req: schemas.CohereRerankRequest, trace: Trace) -> tuple[list[str], Reranked, list[int]]:
    p.check_model("rerank", req.model)
    texts = req.texts()
    out = await p.rerank(
        RerankInput(
            req.query, texts, req.truncate, req.raw_scores, req.chunking, req.first_stage(), req.max_tokens_per_doc
        ),
        trace,
    )
    return texts, out, out.order(req.top_n)


def _meta(version: str, usage: schemas.Usage) -> schemas.CohereMeta:
    return schemas.CohereMeta(
        api_version=schemas.ApiVersion(version=version),
        billed_units=schemas.BilledUnits(search_units=1),
        tokens=schemas.Tokens(input_tokens=usage.total_tokens),
    )
