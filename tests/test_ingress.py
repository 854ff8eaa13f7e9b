"""The ingress without a cluster: routing, tokenizing, response shapes, admission control and error mapping.

The model deployments are replaced by fake handles (the actor boundary); the ingress, its tokenizers and
its admission control are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request

from serve_app.config import load_config
from serve_app.core.sequences import Sequences
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.model_client import RemoteRanker


class FakeMethod:
    def __init__(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> None:
        self.fn, self.calls = fn, calls

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def run() -> Any:
            return self.fn(*args)

        return run()


class FakeHandle:
    """Stands in for a DeploymentHandle: ``handle.method.remote(...)`` awaits ``methods[method](...)``."""

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._methods = methods

    def __getattr__(self, name: str) -> FakeMethod:
        return FakeMethod(self._methods[name], self.calls)


def shorter_is_better(calls: list[tuple[Sequences, bool, bool]]) -> list[np.ndarray]:
    return [-seqs.lengths()[1:].astype(np.float32) for seqs, _, _ in calls]  # the query is sequence 0


def top_labels(calls: list[tuple[Sequences, int]]) -> list[tuple[list[list[str]], np.ndarray]]:
    return [([["balance", "oos"][:k]] * len(s), np.tile([0.9, 0.1][:k], (len(s), 1))) for s, k in calls]


@pytest.fixture()
def ranker() -> FakeHandle:
    return FakeHandle(score_many=shorter_is_better)


@pytest.fixture()
def ingress(ranker: FakeHandle) -> Ingress:
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    return ing


async def acall(ing: Ingress, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers, "query_string": b""}
    response = await ing(Request(scope, receive))
    return response.status_code, dict(response.headers), json.loads(bytes(response.body))


def call(ing: Ingress, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    return asyncio.run(acall(ing, method, path, body))


def test_rerank_sends_one_packed_request_and_sorts_the_scores(ingress: Ingress, ranker: FakeHandle) -> None:
    docs = ["a much longer document about resetting passwords", "short", "medium length text"]
    status, headers, body = call(ingress, "POST", "/v1/rerank", {"query": "reset", "documents": docs, "top_n": 2})
    assert status == 200
    assert [r["index"] for r in body["results"]] == [1, 2]  # the fake prefers fewer tokens
    (([(packed, pairs, raw)],),) = ranker.calls  # one handle call carrying one request
    assert isinstance(packed, Sequences) and len(packed) == 4 and pairs is False and raw is False
    assert body["usage"] == {"total_tokens": packed.total_tokens, "truncated_inputs": 0}
    assert headers["x-truncated-inputs"] == "0"


def test_tei_rerank_and_long_inputs_tokenized_off_the_event_loop(ingress: Ingress) -> None:
    long_doc = "password reset instructions " * 400  # over the inline limit, and over 256 tokens
    status, headers, items = call(ingress, "POST", "/rerank", {"query": "q", "texts": [long_doc, "x"]})
    assert status == 200 and [i["index"] for i in items] == [1, 0]
    assert headers["x-truncated-inputs"] == "1"
    status, _, body = call(ingress, "POST", "/rerank", {"query": "q", "texts": [long_doc], "truncate": False})
    assert status == 413 and body["error_type"] == "input_too_long"


def test_classify_shape(ingress: Ingress) -> None:
    status, _, body = call(ingress, "POST", "/v1/classify", {"inputs": ["what is my balance", "hi"], "top_k": 2})
    assert status == 200
    first = body["results"][0]
    assert first["label"] == "balance" and first["score"] == pytest.approx(0.9) and not first["out_of_scope"]
    assert [x["label"] for x in first["top_k"]] == ["balance", "oos"]


def test_admission_refuses_before_tokenizing_or_calling_the_model(ingress: Ingress, ranker: FakeHandle) -> None:
    adm = ingress._admission["ranker"]
    adm.observe(1000, started=0.0, now=1.0)  # the ranker answers 1,000 padded tokens per second
    adm.admit(5000)  # 5 s of work already queued; the default budget is 0.25 s
    status, headers, body = call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert status == 503 and body["error_type"] == "overloaded" and headers["retry-after"] == "1"
    assert ranker.calls == []
    assert adm.refused == 1
    status, _, _ = call(ingress, "POST", "/v1/classify", {"inputs": "hi"})
    assert status == 200  # the other model's queue is its own
    adm.release(5000)
    assert call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})[0] == 200


def test_queue_accounting_returns_to_zero_after_answers_and_failures(ingress: Ingress) -> None:
    for _ in range(3):
        call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert ingress._admission["ranker"].queued_tokens == 0

    def full(*args: Any) -> Any:
        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)

    ingress._ranker = RemoteRanker(FakeHandle(score_many=full), calls_in_flight=4)  # type: ignore[arg-type]
    status, headers, body = call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 503 and body["error_type"] == "overloaded" and "retry-after" in headers
    assert ingress._admission["ranker"].queued_tokens == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "error_type"),
    [("GET", "/v1/rerank", 405, "method_not_allowed"), ("POST", "/nope", 404, "not_found")],
)
def test_unknown_routes_and_methods(ingress: Ingress, method: str, path: str, status: int, error_type: str) -> None:
    got, _, body = call(ingress, method, path, {})
    assert got == status and body["error_type"] == error_type


@pytest.mark.usefixtures("outside_replica")
def test_the_default_runs_both_models_in_the_ingress_process_and_batches_across_requests(artifacts_dir: Path) -> None:
    """``model_placement: ingress`` (the laptop default): no handles, the real ONNX Runtime models in process,
    the same routes, batching and admission code as with model deployments."""
    cfg = load_config().model_copy(update={"artifacts_dir": str(artifacts_dir)})
    assert cfg.model_placement == "ingress"
    docs = ["To reset your password, open Settings and choose Reset password.", "The weather is sunny today."]
    utterances = ["what is my bank balance", "how much money do i have in checking", "transfer $50 to savings"] * 6

    async def scenario() -> tuple[Any, list[Any], Any]:
        ing = Ingress()
        await ing.reconfigure(cfg.model_dump(mode="json"))
        rerank = await acall(ing, "POST", "/v1/rerank", {"query": "how do I reset my password", "documents": docs})
        classified = await asyncio.gather(*(acall(ing, "POST", "/v1/classify", {"inputs": u}) for u in utterances))
        models = await acall(ing, "GET", "/v1/models")
        return rerank, classified, models

    (status, _, ranked), classified, (_, _, models) = asyncio.run(scenario())
    assert status == 200 and [r["index"] for r in ranked["results"]] == [0, 1]
    assert ranked["results"][0]["relevance_score"] > ranked["results"][1]["relevance_score"] + 0.3
    assert {c[0] for c in classified} == {200}
    assert [c[2]["results"][0]["label"] for c in classified[:2]] == ["balance", "balance"]
    intent = next(m for m in models["models"] if m["task"] == "classify")
    assert intent["backend"] == "onnxruntime" and intent["batching"]["requests"] == len(utterances)
    assert intent["batching"]["batches"] <= len(utterances) / 3  # requests sent together share forwards
