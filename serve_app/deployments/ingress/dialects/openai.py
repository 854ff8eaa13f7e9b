"""OpenAI's embeddings route, ``/v1/embeddings`` (the openai client, LangChain's and LlamaIndex's)."""

from __future__ import annotations

import base64

from starlette.requests import Request
from starlette.responses import Response

from serve_app.api import errors, schemas
from serve_app.api.http import parse
from serve_app.deployments.ingress.dialects.responses import json_response
from serve_app.deployments.ingress.pipeline import Pipeline
from serve_app.deployments.ingress.trace import Trace


async def embeddings(p: Pipeline, request: Request, trace: Trace) -> Response:
    p.admit(request, trace, "rerank")
    req = parse(await p.read(request), schemas.OpenAIEmbeddingsRequest)
    p.check_model("rerank", req.model)
    texts = [req.input] if isinstance(req.input, str) else req.input
    if any(not isinstance(t, str) for t in texts):
        raise errors.ApiError(
            422, "unsupported_input",
            "input: token ids are not accepted (they would be another tokenizer's ids); send text. "
            "LangChain's OpenAIEmbeddings: set check_embedding_ctx_length=False",
        )  # fmt: skip
    vectors, usage = await p.embed([t for t in texts if isinstance(t, str)], True, trace)
    p.check_dimensions(req.dimensions, int(vectors.shape[1]))
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
    body = schemas.OpenAIEmbeddingsResponse(data=data, model=p.cfg.model_for("rerank").name, usage=tokens)
    return json_response(body, usage)
