"""Every HTTP route, declared once: the ingress dispatches on this table and ``/openapi.json`` is built
from it, so the document cannot drift from what is served."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from serve_app.api import schemas

Method = Literal["GET", "POST"]


@dataclass(frozen=True)
class Route:
    method: Method
    path: str
    summary: str
    tag: str  # the OpenAPI group: which clients speak it
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    public: bool = False  # answered without an API key (probes of load balancers and orchestrators)


TEI_RERANK = Route("POST", "/rerank", "Re-rank texts against a query (TEI)", "TEI", schemas.TeiRerankRequest)
TEI_EMBED = Route("POST", "/embed", "Embed texts (TEI)", "TEI", schemas.TeiEmbedRequest, schemas.TeiEmbedResponse)
TEI_PREDICT = Route(
    "POST",
    "/predict",
    "Classify texts with the intent model (TEI)",
    "TEI",
    schemas.TeiPredictRequest,
    schemas.TeiPredictResponse,
)
TEI_INFO = Route("GET", "/info", "The served models (TEI)", "TEI", None, schemas.TeiInfo)
COHERE_V1_RERANK = Route(
    "POST",
    "/v1/rerank",
    "Re-rank documents (Cohere v1, Jina)",
    "Cohere and Jina",
    schemas.CohereRerankRequest,
    schemas.CohereRerankResponse,
)
COHERE_V2_RERANK = Route(
    "POST",
    "/v2/rerank",
    "Re-rank documents (Cohere v2)",
    "Cohere and Jina",
    schemas.CohereV2RerankRequest,
    schemas.CohereV2RerankResponse,
)
OPENAI_EMBEDDINGS = Route(
    "POST",
    "/v1/embeddings",
    "Embed texts (OpenAI)",
    "OpenAI",
    schemas.OpenAIEmbeddingsRequest,
    schemas.OpenAIEmbeddingsResponse,
)
MODELS = Route("GET", "/v1/models", "Served models, aliases and batching state", "OpenAI", None, schemas.ModelsResponse)
CLASSIFY = Route(
    "POST", "/v1/classify", "Intent of texts, top-k labels", "Search", schemas.ClassifyRequest, schemas.ClassifyResponse
)
SEARCH = Route(
    "POST",
    "/v1/search",
    "A query's intent and its candidates re-ranked, in one call",
    "Search",
    schemas.SearchRequest,
    schemas.SearchResponse,
)
HEALTH = Route("GET", "/health", "Liveness: the ingress answers", "Operations", public=True)
READY = Route("GET", "/ready", "Readiness: every model is loaded and warm", "Operations", public=True)
OPENAPI = Route("GET", "/openapi.json", "This document", "Operations")
DOCS = Route("GET", "/docs", "Interactive API documentation", "Operations")

ALL: tuple[Route, ...] = (
    TEI_RERANK, TEI_EMBED, TEI_PREDICT, TEI_INFO, COHERE_V1_RERANK, COHERE_V2_RERANK, OPENAI_EMBEDDINGS, MODELS,
    CLASSIFY, SEARCH, HEALTH, READY, OPENAPI, DOCS,
)  # fmt: skip
