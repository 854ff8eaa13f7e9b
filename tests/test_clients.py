"""The client libraries search teams already use, unmodified, pointed at the running service.

Each test asserts on the library's own parsed objects (order, indices, ``top_n``, documents, vectors),
so a response shape that a library cannot read fails here. Versions are pinned in the test extras.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import cohere
import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient

pytestmark = pytest.mark.slow

QUERY = "how do I reset my password"
DOCS = [
    "The weather is nice today.",
    "Click 'forgot password' on the sign-in page to reset it.",
    "Passwords are changed in the account settings.",
    "Our office is closed on public holidays.",
]
RELEVANT = {1, 2}  # the password documents


def test_versions_are_the_pinned_ones() -> None:
    """The note and the README name these versions; a drifted install would test something else."""
    versions = {name: importlib.metadata.version(name) for name in ("cohere", "openai", "huggingface_hub")}
    print(versions)
    assert versions["cohere"].startswith("7.") and versions["openai"].startswith("3.")


@pytest.fixture()
def reference_scores(client: httpx.Client) -> list[float]:
    """The service's scores through its plain TEI route, in document order (the clients must agree)."""
    items = client.post("/rerank", json={"query": QUERY, "texts": DOCS}).json()
    return [s for _, s in sorted((i["index"], i["score"]) for i in items)]


@pytest.fixture()
def cohere_v1(service: str) -> Iterator[cohere.Client]:
    yield cohere.Client(api_key="unused", base_url=service, timeout=60)


@pytest.fixture()
def cohere_v2(service: str) -> Iterator[cohere.ClientV2]:
    yield cohere.ClientV2(api_key="unused", base_url=service, timeout=60)


def test_cohere_v1_client_rerank(cohere_v1: cohere.Client, reference_scores: list[float]) -> None:
    res = cohere_v1.rerank(query=QUERY, documents=DOCS, top_n=2, return_documents=True, model="rerank-english-v3.0")
    assert len(res.results) == 2
    assert {r.index for r in res.results} == RELEVANT
    assert res.results[0].relevance_score >= res.results[1].relevance_score
    for r in res.results:
        assert r.document is not None and r.document.text == DOCS[r.index]
        assert r.relevance_score == pytest.approx(reference_scores[r.index], abs=1e-6)


def test_cohere_v2_client_rerank(cohere_v2: cohere.ClientV2, reference_scores: list[float]) -> None:
    res = cohere_v2.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
    assert [r.index for r in res.results] == sorted(range(len(DOCS)), key=lambda i: -reference_scores[i])[:3]
    assert {r.index for r in res.results[:2]} == RELEVANT
    assert [r.relevance_score for r in res.results] == pytest.approx(
        sorted(reference_scores, reverse=True)[:3], abs=1e-6
    )
    assert res.meta is not None and res.meta.tokens is not None and res.meta.tokens.input_tokens
    assert res.id


def test_cohere_v2_client_sees_our_error_message(cohere_v2: cohere.ClientV2) -> None:
    with pytest.raises(cohere.errors.NotFoundError) as err:
        cohere_v2.rerank(model="no-such-model", query=QUERY, documents=DOCS)
    assert "no-such-model" in err.value.body["message"]


@pytest.fixture()
def openai_client(service: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="unused", base_url=f"{service}/v1", timeout=60, max_retries=0) as c:
        yield c


def test_openai_embeddings_equal_the_reference_model(openai_client: openai.OpenAI, reference_model) -> None:  # type: ignore[no-untyped-def]
    texts = [QUERY, *DOCS]
    # the SDK asks for base64 unless told otherwise, and decodes it itself: both wire formats are exercised
    res = openai_client.embeddings.create(model="text-embedding-3-small", input=texts)
    as_float = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in res.data], np.float32)
    np.testing.assert_array_equal(got, np.array([d.embedding for d in as_float.data], np.float32))
    assert [d.index for d in res.data] == list(range(len(texts))) and res.model == "all-MiniLM-L6-v2"
    assert res.usage.prompt_tokens == res.usage.total_tokens > len(texts)
    reference = reference_model.encode(texts, normalize_embeddings=True)
    diff = float(np.abs(got - reference).max())
    print(f"/v1/embeddings vs sentence-transformers: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_openai_client_lists_models(openai_client: openai.OpenAI) -> None:
    ids = {m.id for m in openai_client.models.list()}
    assert ids == {"all-MiniLM-L6-v2", "minilm-clinc150-intent"}


def test_openai_client_reads_our_errors(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as err:
        openai_client.embeddings.create(model="text-embedding-3-small", input=[[101, 2003]])
    # the SDK reads ``error`` as the error's body: ours is TEI's string, so the reason is the body itself
    assert err.value.status_code == 422 and "token ids" in str(err.value.body)


def test_tei_client_feature_extraction(service: str, reference_model) -> None:  # type: ignore[no-untyped-def]
    """huggingface_hub's InferenceClient, as TEI's README uses it, pointed at the /embed route."""
    client = InferenceClient(model=f"{service}/embed", token=None)
    got = client.feature_extraction(DOCS[1])
    assert got.shape == (1, 384)
    reference = reference_model.encode([DOCS[1]], normalize_embeddings=True)
    assert float(np.abs(got - reference).max()) <= 1e-4
