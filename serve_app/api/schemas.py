"""HTTP request and response shapes: TEI's /rerank, Cohere/Jina's /v1/rerank, and /v1/classify.

Unknown fields are ignored (SDKs send extras such as ``rank_fields``); every known field is typed
strictly enough that a wrong type is a 422, never a silent coercion of a document into a string.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

NonBlank = Annotated[StrictStr, Field(min_length=1)]


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or whitespace only")
    return v


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TeiRerankRequest(_Request):
    query: NonBlank
    texts: list[StrictStr] = Field(min_length=1)
    truncate: StrictBool = True  # TEI defaults to false; here over-long inputs are cut to the largest bucket
    raw_scores: StrictBool = False
    return_text: StrictBool = False

    _q = field_validator("query")(_not_blank)


class DocumentObject(_Request):
    text: StrictStr


class CohereRerankRequest(_Request):
    query: NonBlank
    documents: list[StrictStr | DocumentObject] = Field(min_length=1)
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool = False
    model: StrictStr | None = None
    truncate: StrictBool = True
    raw_scores: StrictBool = False

    _q = field_validator("query")(_not_blank)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


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


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None


class Usage(BaseModel):
    total_tokens: int
    truncated_inputs: int


class CohereRerankResponse(BaseModel):
    results: list[CohereResult]
    model: str
    usage: Usage


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


class ErrorBody(BaseModel):
    error: str
    error_type: str
