"""This project's own routes: ``/v1/classify`` (query intent) and ``/v1/search`` (a search backend's one call:
its candidates re-ranked and its query's intent, the two models called at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from serve_app.api import schemas
from serve_app.api.http import parse
from serve_app.deployments.ingress.dialects import cohere
from serve_app.deployments.ingress.dialects.responses import json_response
from serve_app.deployments.ingress.pipeline import Pipeline
from serve_app.deployments.ingress.rerank import RerankInput
from serve_app.deployments.ingress.trace import Trace


async def classify(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "classify")
    req = parse(await p.read(request), schemas.ClassifyRequest)
    p.check_model("classify", req.model)
    encoded, result, usage = await p.classify(req.texts(), req.truncate, req.top_k, False, "inputs", trace)
    oos = p.cfg.model_for("classify").oos_label
    results = [
        schemas.ClassifyResult(
            index=i,
            label=names[0],
            score=probs[0],
            out_of_scope=names[0] == oos,
            top_k=[schemas.LabelScore(label=lab, score=s) for lab, s in zip(names, probs, strict=True)],
            truncated=e.truncated,
        )
        for i, (names, probs, e) in enumerate(zip(result.labels, result.scores.tolist(), encoded, strict=True))
    ]
    body = schemas.ClassifyResponse(results=results, model=p.cfg.model_for("classify").name, usage=usage)
    return json_response(body, usage)


async def search(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "rerank", "classify")
    req = parse(await p.read(request), schemas.SearchRequest)
    texts = req.texts()
    rerank = RerankInput(req.query, texts, req.truncate, False, req.chunking, req.first_stage())
    p.check_documents(req.query, texts)  # before either model is called
    out, (_, intent, _) = await _both(
        p.rerank(rerank, trace), p.classify([req.query], True, req.intent_top_k, False, "query", trace)
    )
    names, probs = intent.labels[0], intent.scores[0].tolist()
    versions = dict(trace.served)
    ranker, intent_model = p.cfg.model_for("rerank"), p.cfg.model_for("classify")
    body = schemas.SearchResponse(
        intent=schemas.QueryIntent(
            label=names[0],
            score=probs[0],
            out_of_scope=names[0] == intent_model.oos_label,
            top_k=[schemas.LabelScore(label=lab, score=s) for lab, s in zip(names, probs, strict=True)],
        ),
        results=cohere.results(texts, out, out.order(req.top_n), req.return_documents),
        models=schemas.SearchModels(
            ranker=ranker.name,
            ranker_version=versions[ranker.name],
            intent=intent_model.name,
            intent_version=versions[intent_model.name],
        ),
        usage=out.usage,
    )
    return json_response(body, out.usage)


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
