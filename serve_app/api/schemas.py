"""HTTP request and response shapes, each in the shape its clients already parse.

TEI (``/rerank``, ``/embed``, ``/predict``, ``/info``), Cohere v1 and Jina (``/v1/rerank``), Cohere v2
(``/v2/rerank``), OpenAI (``/v1/embeddings``, ``/v1/models``), and this service's own ``/v1/classify``
and ``/v1/search`` (a search backend's one call: the query's intent and the re-ranked candidates).

Unknown fields are ignored (SDKs send extras such as ``rank_fields``); every known field is typed
strictly enough that a wrong type is a 422, never a silent coercion of a document into a string.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

NonBlank = Annotated[StrictStr, Field(min_length=1)]
Score = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # a JSON number (integers too), finite
FIRST_STAGE = (
    "the first-stage retriever's score of each document (BM25, a vector index), aligned with the documents; "
    "when sent, the relevance score is the model's fused with it (the model's own score is model_score)"
)
CHUNKING = "score long documents as overlapping windows instead of cutting them (default: the model's config)"


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or whitespace only")
    return v


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _RerankOptions(_Request):
    """What every re-ranking route takes beyond its client's own shape (issue #11)."""

    first_stage_scores: list[Score] | None = Field(None, description=FIRST_STAGE)
    chunking: StrictBool | None = Field(None, description=CHUNKING)


class TeiRerankRequest(_RerankOptions):
    query: NonBlank
    texts: list[StrictStr] = Field(min_length=1)
    truncate: StrictBool = True  # TEI defaults to false; here over-long inputs are cut to the largest bucket
    raw_scores: StrictBool = False
    return_text: StrictBool = False

    _q = field_validator("query")(_not_blank)

    @model_validator(mode="after")
    def _scores_aligned(self) -> TeiRerankRequest:
        _aligned(self.first_stage_scores, len(self.texts))
        return self

    def first_stage(self) -> list[float] | None:
        return self.first_stage_scores


class DocumentObject(_Request):
    text: StrictStr
    score: Score | None = Field(None, description="this document's first-stage score (or first_stage_scores)")


def _aligned(scores: list[float] | None, documents: int) -> list[float] | None:
    if scores is not None and len(scores) != documents:
        raise ValueError(f"first_stage_scores: {len(scores)} scores for {documents} documents")
    return scores


class _DocumentsRequest(_RerankOptions):
    """A query and documents given as strings or ``{text, score?}`` objects."""

    query: NonBlank
    documents: list[StrictStr | DocumentObject] = Field(min_length=1)

    _q = field_validator("query")(_not_blank)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    @model_validator(mode="after")
    def _scores_aligned(self) -> _DocumentsRequest:
        self._first_stage()
        return self

    def first_stage(self) -> list[float] | None:
        """The first-stage scores, from ``first_stage_scores`` or from every document's ``score``."""
        return self._first_stage()

    def _first_stage(self) -> list[float] | None:
        on_docs = [d.score for d in self.documents if isinstance(d, DocumentObject) and d.score is not None]
        if not on_docs:
            return _aligned(self.first_stage_scores, len(self.documents))
        if self.first_stage_scores is not None:
            raise ValueError("send first-stage scores either as first_stage_scores or on the documents, not both")
        if len(on_docs) != len(self.documents):
            raise ValueError(f"documents: {len(on_docs)} of {len(self.documents)} carry a score; all or none must")
        return on_docs


class CohereRerankRequest(_DocumentsRequest):
    """Cohere v1 and Jina rerank."""

    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False
    model: StrictStr | None = None
    max_tokens_per_doc: StrictInt | None = Field(None, ge=1)
    truncate: StrictBool = True
    raw_scores: StrictBool = False


class CohereV2RerankRequest(CohereRerankRequest):
    """Cohere v2 rerank: ``model`` is required; results carry no documents."""

    model: StrictStr | None = Field(..., description="the served model's name or one of its aliases")


class ClassifyRequest(_Request):
    inputs: StrictStr | list[StrictStr]
    top_k: StrictInt = Field(1, ge=1)
    model: StrictStr | None = None
    truncate: StrictBool = True

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class TeiRerankItem(BaseModel):
    index: int
    score: float
    text: str | None = None
    model_score: float | None = None  # the model's own score, when ``score`` fused it with the first stage


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None
    model_score: float | None = None  # the model's own score, when relevance_score fused it with the first stage


class Usage(BaseModel):
    total_tokens: int
    truncated_inputs: int
    chunks: int | None = None  # re-ranking: document sequences scored (windows when chunking, else documents)


class BilledUnits(BaseModel):
    search_units: int


class Tokens(BaseModel):
    input_tokens: int


class ApiVersion(BaseModel):
    version: str


class CohereMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: Tokens


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    model: str
    usage: Usage
    meta: CohereMeta


class CohereV2Result(BaseModel):
    index: int
    relevance_score: float
    model_score: float | None = None


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2Result]
    meta: CohereMeta


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    index: int
    label: str
    score: float
    out_of_scope: bool
    top_k: list[LabelScore]
    truncated: bool


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]
    model: str
    usage: Usage


# -- embeddings -------------------------------------------------------------------------------------


class OpenAIEmbeddingsRequest(_Request):
    """OpenAI embeddings. Token-id inputs (what LangChain's ``OpenAIEmbeddings`` sends unless
    ``check_embedding_ctx_length=False``) are refused: they are ids of OpenAI's tokenizer, not this model's."""

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class TeiEmbedRequest(_Request):
    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool = True
    truncate: StrictBool = True
    truncation_direction: Literal["right", "Right", "left", "Left"] = "right"
    prompt_name: StrictStr | None = None
    dimensions: StrictInt | None = Field(None, ge=1)


TeiEmbedResponse = RootModel[list[list[float]]]


# -- TEI predict and info -------------------------------------------------------------------------


class TeiPredictRequest(_Request):
    """TEI's ``inputs``: a text, a pair ``[a, b]``, or a batch ``[[a], [b], ...]``; this service's
    classifiers read single texts, so a pair is refused."""

    inputs: StrictStr | list[StrictStr] | list[list[StrictStr]]
    raw_scores: StrictBool = False
    truncate: StrictBool = True


class Prediction(BaseModel):
    score: float
    label: str


TeiPredictResponse = RootModel[list[Prediction] | list[list[Prediction]]]


class TeiInfo(BaseModel):
    """TEI's ``/info`` for the embedding/re-ranking model, and every served model under ``models``."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[str, Any]
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    models: list[dict[str, Any]]


# -- the search backend's one call ----------------------------------------------------------------


class SearchRequest(_DocumentsRequest):
    """The query's intent and its candidates re-ranked, in one call: the query is tokenized once
    (when both models share a tokenizer) and both models run concurrently."""

    top_n: StrictInt | None = Field(None, ge=1, description="re-ranked results to return (default: all)")
    return_documents: StrictBool = False
    intent_top_k: StrictInt = Field(3, ge=1, description="intent labels to return, best first")
    truncate: StrictBool = True


class QueryIntent(BaseModel):
    label: str
    score: float
    out_of_scope: bool
    top_k: list[LabelScore]


class SearchModels(BaseModel):
    ranker: str
    ranker_version: str
    intent: str
    intent_version: str


class SearchResponse(BaseModel):
    intent: QueryIntent
    results: list[CohereResult]
    models: SearchModels
    usage: Usage


# -- models and errors ----------------------------------------------------------------------------


class ModelCard(BaseModel):
    """OpenAI's model object, plus what this service knows of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    aliases: list[str]
    task: str
    versions: list[str] = []  # registered versions of this model (``models`` has each one's state and share)


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # every model version: its replica's report (state, backend, probe gate, batching) and its route (role,
    # traffic share, requests answered, shadow agreement), serving versions first
    models: list[dict[str, Any]]


class ErrorBody(BaseModel):
    """TEI's ``{error, error_type}``; ``message`` for Cohere's and OpenAI's clients, ``detail`` for Jina's."""

    error: str
    error_type: str
    message: str
    detail: str
