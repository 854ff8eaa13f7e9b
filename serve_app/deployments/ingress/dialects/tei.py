"""Hugging Face Text Embeddings Inference's routes: ``/rerank``, ``/embed``, ``/predict``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, schemas
from serve_app.api.http import parse
from serve_app.deployments.ingress.dialects.responses import json_response, truncated_header
from serve_app.deployments.ingress.pipeline import Pipeline
from serve_app.deployments.ingress.rerank import RerankInput
from serve_app.deployments.ingress.trace import Trace


async def rerank(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "rerank")  # before reading the body: a refusal costs almost nothing
    req = parse(await p.read(request), schemas.TeiRerankRequest)
    out = await p.rerank(
        RerankInput(req.query, req.texts, req.truncate, req.raw_scores, req.chunking, req.first_stage()), trace
    )
    items = [
        schemas.TeiRerankItem(
            index=i, score=out.scores[i], text=req.texts[i] if req.return_text else None, model_score=out.model(i)
        )
        for i in out.order()
    ]
    return json_response(items, out.usage)


async def embed(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "rerank")
    req = parse(await p.read(request), schemas.TeiEmbedRequest)
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
    vectors, usage = await p.embed(texts, req.truncate, trace)
    p.check_dimensions(req.dimensions, int(vectors.shape[1]))
    return JSONResponse(vectors.tolist(), headers=truncated_header(usage))


async def predict(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "classify")
    req = parse(await p.read(request), schemas.TeiPredictRequest)
    texts, batch = predict_texts(req.inputs)
    _, result, usage = await p.classify(texts, req.truncate, None, req.raw_scores, "inputs", trace)
    rows = [
        [{"score": s, "label": lab} for lab, s in zip(names, probs, strict=True)]
        for names, probs in zip(result.labels, result.scores.tolist(), strict=True)
    ]
    return JSONResponse(rows if batch else rows[0], headers=truncated_header(usage))


def predict_texts(inputs: str | list[str] | list[list[str]]) -> tuple[list[str], bool]:
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
