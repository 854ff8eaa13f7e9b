"""The ingress without a cluster: routing, tokenizing, response shapes, admission control and error mapping.

The model deployments are replaced by fake handles (the actor boundary); the ingress, its tokenizers and
its admission control are the real ones.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request

from serve_app.config import PythonGcConfig, TaskServingConfig, load_config
from serve_app.core.sequences import Encoded, Sequences
from serve_app.core.timing import ModelTiming, Processor
from serve_app.deployments.encoder import Classified, ClassifyCall, RankCall, Ranked, RankerOutput
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.model_client import RemoteIntent, RemoteRanker


class FakeMethod:
    def __init__(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> None:
        self.fn, self.calls = fn, calls

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def run() -> Any:
            result = self.fn(*args)
            return await result if inspect.isawaitable(result) else result

        return run()


class FakeHandle:
    """Stands in for a DeploymentHandle: ``handle.method.remote(...)`` awaits ``methods[method](...)``."""

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.sent = 0  # method calls made through this very handle (a variant from ``options`` counts its own)
        self.variants: list[FakeHandle] = []
        self._methods = methods
        self.app_name, self.deployment_name = "app", "Ranker" if "score_many" in methods else "Intent"

    def __getattr__(self, name: str) -> FakeMethod:
        self.sent += 1
        return FakeMethod(self._methods[name], self.calls)

    def options(self, **options: Any) -> FakeHandle:
        """Serve's per-handle options (the ingress picks the transport): a handle with them, whose calls are
        recorded with this one's."""
        self.options_asked = options
        variant = FakeHandle(**self._methods)
        variant.calls, variant.options_asked = self.calls, options
        self.variants.append(variant)
        return variant


EMBEDDING_WIDTH = 8


def fake_embedding(seqs: Sequences) -> np.ndarray:
    """Row i: a unit vector that depends on sequence i's length (enough to check order and shape)."""
    rows = np.zeros((len(seqs), EMBEDDING_WIDTH), np.float32)
    rows[np.arange(len(seqs)), seqs.lengths() % EMBEDDING_WIDTH] = 1.0
    return rows


def shorter_is_better(calls: list[RankCall]) -> list[Ranked]:
    return [
        Ranked(fake_embedding(c.seqs), "v1")
        if c.output is RankerOutput.EMBEDDINGS
        else Ranked(-c.seqs.lengths()[1:].astype(np.float32), "v1")  # the query is sequence 0
        for c in calls
    ]


LABELS = ["balance", "oos", "transfer"]


def top_labels(calls: list[ClassifyCall]) -> list[Classified]:
    out = []
    for c in calls:
        k = len(LABELS) if c.top_k is None else min(c.top_k, len(LABELS))
        probs = [0.7, 0.2, 0.1][:k]
        out.append(Classified([LABELS[:k]] * len(c.seqs), np.tile(probs, (len(c.seqs), 1)), "v7"))
    return out


def slow_ranker(sent: list[RankCall], delay_s: float) -> FakeHandle:
    """A ranker that records the calls it is sent and answers each ``delay_s`` later."""

    async def slow(calls: list[RankCall]) -> list[Ranked]:
        sent.extend(calls)
        await asyncio.sleep(delay_s)
        return shorter_is_better(calls)

    return FakeHandle(score_many=slow)


@pytest.fixture()
def ranker() -> FakeHandle:
    return FakeHandle(score_many=shorter_is_better)


@pytest.fixture()
def ingress(ranker: FakeHandle) -> Ingress:
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    return ing


@pytest.mark.parametrize("grpc", [True, False])
def test_the_ingress_calls_its_models_over_the_transport_the_config_names(grpc: bool) -> None:
    """``ray_serve.grpc_between_deployments`` picks Serve's transport on both handles (gRPC: not by reference).
    Left to Ray, it depended on when the process that built the app had imported Serve."""
    handles = FakeHandle(score_many=shorter_is_better), FakeHandle(classify_many=top_labels)
    ing = Ingress(*handles)  # type: ignore[arg-type]
    cfg = load_config().model_dump(mode="json")
    cfg.update(model_placement="deployments")
    cfg["ray_serve"]["grpc_between_deployments"] = grpc
    asyncio.run(ing.reconfigure(cfg))
    assert [h.options_asked for h in handles] == [{"_by_reference": not grpc}] * 2
    assert call(ing, "POST", "/v1/classify", {"inputs": "hi"})[0] == 200


def test_a_later_config_that_names_another_transport_carries_the_next_calls() -> None:
    """``serve deploy`` with ``grpc_between_deployments`` changed reconfigures the ingress without a restart:
    the next model calls go over the new transport (every replica serves both), and the same config again
    changes nothing."""
    handles = FakeHandle(score_many=shorter_is_better), FakeHandle(classify_many=top_labels)
    ing = Ingress(*handles)  # type: ignore[arg-type]
    cfg = load_config().model_dump(mode="json")
    cfg.update(model_placement="deployments")
    for grpc in (True, False, False, True):
        cfg["ray_serve"]["grpc_between_deployments"] = grpc
        asyncio.run(ing.reconfigure(cfg))
        assert call(ing, "POST", "/v1/classify", {"inputs": "hi"})[0] == 200
    intent = handles[1]
    assert [v.options_asked for v in intent.variants] == [{"_by_reference": b} for b in (False, True, False)]
    assert [v.sent for v in intent.variants] == [1, 2, 1]  # each config's classify went out on its transport


async def acall(
    ing: Ingress,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    body_after_s: float = 0.0,
) -> tuple[int, dict[str, str], Any]:
    """One request through the ingress's ASGI entry; ``body_after_s``: its body arrives that much later."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        if body_after_s:
            await asyncio.sleep(body_after_s)
        return {"type": "http.request", "body": raw, "more_body": False}

    sent_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    sent_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http", "method": method, "path": path, "root_path": "", "headers": sent_headers, "query_string": b""
    }  # fmt: skip
    response = await ing(Request(scope, receive))
    return response.status_code, dict(response.headers), json.loads(bytes(response.body))


def call(
    ing: Ingress, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    return asyncio.run(acall(ing, method, path, body, headers))


def test_rerank_sends_one_packed_request_and_sorts_the_scores(ingress: Ingress, ranker: FakeHandle) -> None:
    docs = ["a much longer document about resetting passwords", "short", "medium length text"]
    before = time.time()
    status, headers, body = call(ingress, "POST", "/v1/rerank", {"query": "reset", "documents": docs, "top_n": 2})
    assert status == 200
    assert [r["index"] for r in body["results"]] == [1, 2]  # the fake prefers fewer tokens
    (([sent],),) = ranker.calls  # one handle call carrying one request
    # when it left, by this node's clock ("" outside Ray): the model replica reads the call's times by it
    assert sent.sent_from == "" and before <= sent.sent_at <= time.time()
    packed = sent.seqs
    assert isinstance(packed, Sequences) and len(packed) == 4 and not sent.pairs
    assert sent.output is RankerOutput.SCORES
    assert body["usage"] == {"total_tokens": packed.total_tokens, "truncated_inputs": 0, "chunks": 3}
    assert headers["x-truncated-inputs"] == "0"
    assert headers["x-model-version"] == "all-MiniLM-L6-v2/v1"  # the version that computed the scores


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
    assert first["label"] == "balance" and first["score"] == pytest.approx(0.7) and not first["out_of_scope"]
    assert [x["label"] for x in first["top_k"]] == ["balance", "oos"]


def test_admission_refuses_before_tokenizing_or_calling_the_model(ingress: Ingress, ranker: FakeHandle) -> None:
    adm = ingress._door.models["rerank"]
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


def test_under_sustained_overload_the_door_holds_the_shorter_budget(ranker: FakeHandle) -> None:
    """``batching.overload_queue_wait_s``: while the ingress refuses about as many as it admits, a request that
    would wait 60 ms is refused (503) before reaching the model; once that ends, it is accepted again."""
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_dump(mode="json")
    cfg.update(model_placement="deployments")
    cfg["batching"].update(max_queue_wait_s=0.25, overload_queue_wait_s=0.03)
    asyncio.run(ing.reconfigure(cfg))
    adm = ing._door.models["rerank"]
    adm.observe(1000, started=0.0, now=1.0)  # 1,000 padded tokens a second
    adm.reserve(60)  # 60 ms queued: within 250 ms, over 30 ms
    body = {"query": "q", "documents": ["a"]}
    assert call(ing, "POST", "/v1/rerank", body)[0] == 200
    for _ in range(20):  # refused as many as admitted, lately
        adm._count(refused=1.0)
    assert adm.overloaded()
    status, _, err = call(ing, "POST", "/v1/rerank", body)
    assert status == 503 and err["error_type"] == "overloaded" and len(ranker.calls) == 1  # not sent
    for _ in range(200):  # admissions outweigh the refusals again
        adm._count(admitted=1.0)
    assert call(ing, "POST", "/v1/rerank", body)[0] == 200
    adm.release(60)


@pytest.mark.parametrize("processor", [Processor.GPU, Processor.CPU])
def test_the_overload_budgets_hold_only_while_the_model_answers_from_a_gpu(processor: Processor) -> None:
    """The start-by mode's 20 ms budgets are sized for a GPU: a model that fell back to ONNX Runtime on the CPU
    takes longer than that for one call. Once its answers say so, the same sustained overload keeps the long
    budget (a request 60 ms behind is admitted, none is held to a start-by time); from a GPU it is refused."""

    def answered_on(calls: list[RankCall]) -> list[Ranked]:
        timing = ModelTiming(inference_s=0.001, processor=processor)
        return [replace(r, timing=timing) for r in shorter_is_better(calls)]

    ranker = FakeHandle(score_many=answered_on)
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_dump(mode="json")
    cfg.update(model_placement="deployments")
    cfg["batching"].update(max_queue_wait_s=0.25, overload_queue_wait_s=0.02, overload_start_within_s=0.02)
    asyncio.run(ing.reconfigure(cfg))
    adm = ing._door.models["rerank"]
    body = {"query": "q", "documents": ["a"]}
    adm.observe(1000, started=0.0, now=1.0)  # 1,000 padded tokens a second
    adm.reserve(60)  # 60 ms queued: within 250 ms, over 20 ms
    assert call(ing, "POST", "/v1/rerank", body)[0] == 200  # the first answer says what computed it
    for _ in range(20):  # refused as many as admitted, lately
        adm._count(refused=1.0)
    on_gpu = processor is Processor.GPU
    assert adm.as_dict()["overload_budgets_on"] is on_gpu
    assert adm.holds_start_by() is on_gpu and adm.budget_s() == (0.02 if on_gpu else 0.25)
    status, _, _ = call(ing, "POST", "/v1/rerank", body)
    assert status == (503 if on_gpu else 200) and len(ranker.calls) == (1 if on_gpu else 2)
    if not on_gpu:
        assert ranker.calls[1][0][0].start_by == math.inf and not ranker.calls[1][0][0].held  # no start-by time
    adm.release(60)


@pytest.mark.parametrize("overloaded", [False, True])
def test_under_sustained_overload_a_request_that_cannot_start_in_time_is_refused_at_once(overloaded: bool) -> None:
    """``batching.overload_start_within_s``: while the ingress refuses in earnest, a request still waiting for
    a call slot 50 ms after it arrived is refused then (503 with Retry-After, counted as a refusal), not
    answered 300 ms late; its call says so to the replica (``held``), which holds its queue to the same
    start-by times. Without the overload, the same wait is the queue a closed population needs: answered."""
    sent: list[RankCall] = []
    ing = Ingress(slow_ranker(sent, 0.3), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_dump(mode="json")
    cfg.update(model_placement="deployments")
    cfg["batching"].update(max_queue_wait_s=5.0, overload_start_within_s=0.05, calls_in_flight=1)
    asyncio.run(ing.reconfigure(cfg))
    adm = ing._door.models["rerank"]
    if overloaded:
        for _ in range(20):  # refused as many as admitted, lately
            adm._count(refused=1.0)
    body = {"query": "q", "documents": ["a"]}

    order: list[str] = []

    async def two() -> list[tuple[int, dict[str, str], Any]]:
        async def one(name: str) -> tuple[int, dict[str, str], Any]:
            answer = await acall(ing, "POST", "/v1/rerank", body)
            order.append(name)
            return answer

        first = asyncio.create_task(one("first"))
        await asyncio.sleep(0.01)  # its call is out: the second waits for the only slot
        return list(await asyncio.gather(first, one("second")))

    sent_at = time.time()
    first, second = asyncio.run(two())
    assert first[0] == 200 and sent[0].held is overloaded
    assert sent_at < sent[0].start_by - 0.05 < sent_at + 0.05  # its arrival, plus 50 ms
    if overloaded:
        status, headers, err = second
        assert status == 503 and err["error_type"] == "overloaded" and int(headers["retry-after"]) >= 1
        assert order == ["second", "first"] and len(sent) == 1 and adm.refused == 1  # refused before the slot freed
    else:
        assert second[0] == 200 and order == ["first", "second"] and len(sent) == 2 and adm.refused == 0
    assert adm.queued_tokens == 0


def test_a_request_the_model_replica_refused_as_started_late_is_a_503_refusal() -> None:
    from serve_app.core.backend import StartedLate

    late = FakeHandle(score_many=lambda calls: [StartedLate() for _ in calls])
    ing = Ingress(late, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    status, headers, err = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 503 and err["error_type"] == "overloaded" and "retry-after" in headers
    assert "could not start in time" in err["message"] and headers["x-overloaded"] == "ingress"  # HAProxy repeats it
    adm = ing._door.models["rerank"]
    assert adm.refused == 1 and adm.queued_tokens == 0


def test_a_tokenizer_backlog_is_refused_before_reading_the_body(ingress: Ingress, ranker: FakeHandle) -> None:
    """When the ingress's own CPU is the bottleneck (an H100 node: tokenizing whole abstracts), its tokenizer
    threads' queue is what grows: admission refuses on it too, or accepted requests wait seconds."""
    tok = ingress._door.tokenizer
    tok.observe(100_000, started=0.0, now=1.0)  # the threads tokenize 100,000 characters per second
    tok.admit(50_000)  # 0.5 s of text queued; the default budget is 0.25 s
    long_doc = "password reset instructions " * 100
    status, headers, body = call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": [long_doc]})
    assert status == 503 and body["error_type"] == "overloaded" and "retry-after" in headers
    assert ranker.calls == [] and tok.refused == 1
    short = call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert short[0] == 200 and tok.refused == 1  # a short body is tokenized on the event loop: not refused
    tok.release(50_000)
    assert call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": [long_doc]})[0] == 200
    assert tok.queued_tokens == 0  # the accepted request's characters left the queue


def test_the_tokenizer_queue_counts_characters_however_the_body_spells_them(ingress: Ingress) -> None:
    """The tokenizer threads' rate is in characters per second, so their queue is too. ``json.dumps`` writes
    each non-ASCII character as a 6-byte ``\\uXXXX``: counted in body bytes, such a request would hold 5-6
    times its work in the queue, and the door would refuse others for a wait that is not there."""
    from serve_app.deployments.ingress.door import PER_BYTE_SMOOTHING
    from serve_app.deployments.ingress.trace import Trace

    tok = ingress._door.tokenizer
    body = {"query": "q", "documents": ["密码重置说明 " * 500]}  # 3,500 characters, 18,500 bytes as sent
    raw = json.dumps(body).encode()
    chars = 1 + len(body["documents"][0])
    assert call(ingress, "POST", "/v1/rerank", body)[0] == 200
    assert ingress._door.chars_per_byte("/v1/rerank") == pytest.approx(chars / len(raw))  # learned for the route
    assert tok.queued_tokens == 0  # its characters left the queue at its model call
    trace = Trace(route="/v1/rerank")
    ingress._path.admit(_request({"content-length": str(len(raw))}), trace, "rerank")  # the next one, at the door
    assert tok.queued_tokens == trace.tokenizer_held == pytest.approx(chars, abs=1)  # not 18,500
    ingress._door.release(trace)
    assert tok.queued_tokens == 0
    learned = ingress._door.chars_per_byte("/v1/rerank")
    assert learned is not None
    ascii_body = {"query": "q", "documents": ["password reset instructions " * 100]}
    ascii_ratio = (1 + len(ascii_body["documents"][0])) / len(json.dumps(ascii_body).encode())
    assert call(ingress, "POST", "/v1/rerank", ascii_body)[0] == 200
    step = PER_BYTE_SMOOTHING * (ascii_ratio - learned)  # a moving average, as the tokens per byte
    assert ingress._door.chars_per_byte("/v1/rerank") == pytest.approx(learned + step)


def test_a_cross_encoders_query_counts_once_per_document_in_the_tokenizer_queue(tmp_path: Path) -> None:
    """A cross-encoder's tokenizer reads (query, document) pairs, so the query once per document: the tokenizer
    queue and the route's characters per byte count it so (they counted the documents alone)."""
    from serve_app.models.artifacts import builtin_model_dir

    src, cross = builtin_model_dir(), tmp_path / "cross"
    cross.mkdir()
    hf = json.loads((src / "config.json").read_text())
    (cross / "config.json").write_text(json.dumps(hf | {"architectures": ["BertForSequenceClassification"]}))
    (cross / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = load_config().model_dump(mode="json")
    rerank = next(m for m in cfg["models"] if m["task"] == "rerank")
    rerank.update(source=str(cross))
    cfg.update(model_placement="deployments", model_roots=[str(tmp_path)])

    sent: list[int] = []

    def one_score_per_pair(calls: list[RankCall]) -> list[Ranked]:
        sent.extend(len(c.seqs) for c in calls)
        return [Ranked(-c.seqs.lengths().astype(np.float32), "v1") for c in calls]

    ranker = FakeHandle(score_many=one_score_per_pair)
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    asyncio.run(ing.reconfigure(cfg))
    query, docs = "how do i reset my password " * 10, ["password reset instructions " * 100, "billing " * 50]
    body = {"query": query, "documents": docs}
    status, _, answer = call(ing, "POST", "/v1/rerank", body)
    assert status == 200 and [r["index"] for r in answer["results"]] == [1, 0], answer
    assert sent == [len(docs)]  # one (query, document) pair per document: the cross-encoder path
    pair_chars = sum(len(query) + len(d) for d in docs)
    assert ing._door.chars_per_byte("/v1/rerank") == pytest.approx(pair_chars / len(json.dumps(body).encode()))
    assert ing._door.tokenizer.queued_tokens == 0


def test_requests_arriving_together_are_refused_at_the_door_and_never_after_tokenizing() -> None:
    """Admission reserves each request's estimated cost at the door, so requests arriving together see each
    other: those over the budget are refused before their body is read, and an admitted one is never refused
    later, after its text was tokenized (on an H100 node at 4x overload, 1,700 of 9,000 refusals came after
    tokenizing: about 7 of its 16 cores spent on work thrown away)."""

    async def scenario() -> tuple[list[int], int, list[int], Ingress]:
        gate = asyncio.Event()

        async def slow(calls: list[RankCall]) -> list[Ranked]:
            await gate.wait()
            return shorter_is_better(calls)

        ranker = FakeHandle(score_many=slow)
        ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
        cfg = load_config().model_copy(update={"model_placement": "deployments"})
        await ing.reconfigure(cfg.model_dump(mode="json"))
        encoder = ing._path.versions.specs[ing.cfg.model_for("rerank").key].encoder
        tokenized: list[int] = []
        encode, lookup = encoder.encode, encoder.lookup

        def counted(texts: Sequence[str]) -> list[Encoded]:
            tokenized.append(len(texts))
            return encode(texts)

        def looked_up(texts: Sequence[str]) -> list[Encoded] | None:  # from the chunk cache: tokenized too
            found = lookup(texts)
            if found is not None:
                tokenized.append(len(texts))
            return found

        encoder.encode = counted  # type: ignore[method-assign]
        encoder.lookup = looked_up  # type: ignore[method-assign]
        ing._door.models["rerank"].observe(1000, started=0.0, now=1.0)  # the ranker answers 1,000 tokens a second
        body = {"query": "reset my password", "documents": ["how to reset a forgotten password"] * 4}
        calls = [asyncio.create_task(acall(ing, "POST", "/v1/rerank", body, body_after_s=0.01)) for _ in range(20)]
        for _ in range(3000):  # until every request is refused (done) or tokenized (admitted): at most 30 s
            if sum(c.done() for c in calls) + len(tokenized) >= len(calls):
                break
            await asyncio.sleep(0.01)
        gate.set()
        statuses = [status for status, _, _ in await asyncio.gather(*calls)]
        return statuses, sum(len(c[0]) for c in ranker.calls), tokenized, ing

    statuses, sent, tokenized, ing = asyncio.run(scenario())
    admitted = statuses.count(200)
    assert 1 <= admitted < 20 and statuses.count(503) == 20 - admitted
    assert sent == admitted  # every admitted request reached the ranker; no refused one did
    assert len(tokenized) == admitted  # no text of a refused request was tokenized
    assert ing._door.models["rerank"].queued_tokens == 0  # estimates and costs all left the queue


def test_the_wait_budget_covers_the_tokenizer_and_the_model_queues_together(ingress: Ingress) -> None:
    tok, model = ingress._door.tokenizer, ingress._door.models["rerank"]
    tok.observe(100_000, started=0.0, now=1.0)
    tok.reserve(15_000)  # 0.15 s of text queued
    model.observe(1000, started=0.0, now=1.0)
    model.reserve(150)  # 0.15 s of model work queued: each under the 0.25 s budget, together over it
    long_doc = "password reset instructions " * 100
    status, _, body = call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": [long_doc]})
    assert status == 503 and body["error_type"] == "overloaded"
    assert call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})[0] == 200  # inline: model only


def test_idle_tokenizer_threads_share_one_request_and_give_the_same_sequences(ranker: FakeHandle) -> None:
    docs = [f"document {i} about resetting a password, " * (10 + i) for i in range(9)]
    sent: dict[int, Sequences] = {}
    for threads in (1, 4):
        ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
        cfg = load_config().model_dump(mode="json")
        cfg.update(model_placement="deployments", tokenization={"threads": threads})
        asyncio.run(ing.reconfigure(cfg))
        used: set[str] = set()
        encode = ing._path.versions.specs[ing.cfg.model_for("rerank").key].encoder.encode

        def spy(
            texts: Sequence[str], encode: Callable[[Sequence[str]], list[Encoded]] = encode, used: set[str] = used
        ) -> list[Encoded]:
            used.add(threading.current_thread().name)
            time.sleep(0.05)  # a part outlasts a thread's wake-up: on a loaded machine one thread took them all
            return encode(texts)

        ing._path.versions.specs[ing.cfg.model_for("rerank").key].encoder.encode = spy  # type: ignore[method-assign]
        assert call(ing, "POST", "/v1/rerank", {"query": "reset", "documents": docs})[0] == 200
        assert (len(used) > 1) == (threads > 1)  # split over the idle threads, or whole on the one
        sent[threads] = ranker.calls[-1][0][0].seqs
    assert sent[4].ids.tolist() == sent[1].ids.tolist()  # the same rows, in order
    assert sent[4].offsets.tolist() == sent[1].offsets.tolist() and len(sent[1]) == 10


def test_queue_accounting_returns_to_zero_after_answers_and_failures(ingress: Ingress) -> None:
    for _ in range(3):
        call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert ingress._door.models["rerank"].queued_tokens == 0

    def full(*args: Any) -> Any:
        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)

    ingress._path.ranker = RemoteRanker(FakeHandle(score_many=full), calls_in_flight=4, name="ranker")  # type: ignore[arg-type]
    status, headers, body = call(ingress, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 503 and body["error_type"] == "overloaded" and "retry-after" in headers
    assert ingress._door.models["rerank"].queued_tokens == 0


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


# -- the API shapes client libraries call (the libraries themselves: tests/test_clients.py) ---------------


def test_cohere_v2_rerank_shape_and_aliases(ingress: Ingress) -> None:
    docs = ["a much longer document about resetting passwords", "short", "medium length text"]
    status, _, body = call(
        ingress, "POST", "/v2/rerank", {"model": "rerank-v3.5", "query": "reset", "documents": docs, "top_n": 2}
    )
    assert status == 200
    assert [r["index"] for r in body["results"]] == [1, 2]
    assert set(body["results"][0]) == {"index", "relevance_score"}
    assert body["meta"]["api_version"]["version"] == "2" and body["meta"]["tokens"]["input_tokens"] > 0
    assert len(body["id"]) == 32
    status, _, body = call(ingress, "POST", "/v2/rerank", {"query": "reset", "documents": docs})
    assert status == 422 and "model" in body["error"]  # v2 requires a model name, as Cohere does


def test_unknown_model_names_say_which_names_work_in_every_client_field(ingress: Ingress) -> None:
    status, _, body = call(ingress, "POST", "/v1/rerank", {"model": "bge-reranker", "query": "q", "documents": ["a"]})
    assert status == 404 and body["error_type"] == "model_not_found"
    assert "'all-MiniLM-L6-v2'" in body["error"] and "'rerank-v3.5'" in body["error"]
    assert body["message"] == body["detail"] == body["error"]  # Cohere/OpenAI read message, Jina reads detail


def test_max_tokens_per_doc_cuts_documents_not_the_query(ingress: Ingress, ranker: FakeHandle) -> None:
    long_doc = "password reset instructions for the account " * 5
    status, headers, _ = call(
        ingress, "POST", "/v1/rerank", {"query": "how do i reset my password", "documents": [long_doc, "ok"],
                                         "max_tokens_per_doc": 4},
    )  # fmt: skip
    assert status == 200 and headers["x-truncated-inputs"] == "1"
    (([sent],),) = ranker.calls
    lengths = sent.seqs.lengths().tolist()
    assert lengths[1] == 4 + 2  # [CLS] + 4 document tokens + [SEP]
    assert lengths[0] > 6 and lengths[2] == 3  # the query and the short document as they were


def test_openai_embeddings_float_and_base64(ingress: Ingress, ranker: FakeHandle) -> None:
    texts = ["one", "a longer second text"]
    status, _, body = call(ingress, "POST", "/v1/embeddings", {"input": texts, "model": "text-embedding-3-small"})
    assert status == 200 and body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    floats = np.array([d["embedding"] for d in body["data"]], np.float32)
    assert [d["index"] for d in body["data"]] == [0, 1] and floats.shape == (2, EMBEDDING_WIDTH)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    (([sent],),) = ranker.calls
    assert sent.output is RankerOutput.EMBEDDINGS and len(sent.seqs) == 2  # no query sequence
    status, _, body = call(ingress, "POST", "/v1/embeddings", {"input": texts, "encoding_format": "base64"})
    decoded = np.stack([np.frombuffer(__import__("base64").b64decode(d["embedding"]), "<f4") for d in body["data"]])
    np.testing.assert_array_equal(decoded, floats)


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"input": [[101, 2023]]}, 422, "unsupported_input"),  # tiktoken ids from LangChain's OpenAIEmbeddings
        ({"input": []}, 422, "validation_error"),
        ({"input": "x", "dimensions": 3}, 422, "validation_error"),
        ({"input": "x", "encoding_format": "int8"}, 422, "validation_error"),
        ({"input": "x", "model": "gpt-4o"}, 404, "model_not_found"),
    ],
)
def test_openai_embeddings_refusals(ingress: Ingress, body: dict[str, Any], status: int, error_type: str) -> None:
    got, _, answer = call(ingress, "POST", "/v1/embeddings", body)
    assert (got, answer["error_type"]) == (status, error_type)


def test_tei_embed_and_predict_shapes(ingress: Ingress) -> None:
    status, _, single = call(ingress, "POST", "/embed", {"inputs": "hello"})
    assert status == 200 and len(single) == 1 and len(single[0]) == EMBEDDING_WIDTH
    assert call(ingress, "POST", "/embed", {"inputs": "x", "normalize": False})[0] == 422
    status, _, one = call(ingress, "POST", "/predict", {"inputs": "what is my balance"})
    assert status == 200 and [p["label"] for p in one] == LABELS  # every label, best first
    assert one[0]["score"] == pytest.approx(0.7)
    status, _, batch = call(ingress, "POST", "/predict", {"inputs": [["a"], ["b"], ["c"]]})
    assert status == 200 and len(batch) == 3 and all(len(row) == len(LABELS) for row in batch)
    for pair in ({"inputs": ["a", "b"]}, {"inputs": [["a", "b"]]}):
        status, _, body = call(ingress, "POST", "/predict", pair)
        assert status == 422 and body["error_type"] == "unsupported_input"


def test_search_tokenizes_the_query_once_and_calls_each_model_once(ingress: Ingress, ranker: FakeHandle) -> None:
    intent = FakeHandle(classify_many=top_labels)
    ingress._path.intent = RemoteIntent(intent, calls_in_flight=4, name="intent")  # type: ignore[arg-type]
    docs = ["a much longer document about resetting passwords", "short", "medium length text"]
    status, headers, body = call(
        ingress, "POST", "/v1/search", {"query": "what is my balance", "documents": docs, "top_n": 2,
                                         "return_documents": True},
    )  # fmt: skip
    assert status == 200
    versions = sorted(headers["x-model-version"].split(","))  # both models, in the order they answered
    assert versions == ["all-MiniLM-L6-v2/v1", "minilm-clinc150-intent/v7"]
    assert body["intent"]["label"] == "balance" and len(body["intent"]["top_k"]) == 3
    assert [r["index"] for r in body["results"]] == [1, 2] and body["results"][0]["document"]["text"] == "short"
    assert body["models"]["ranker_version"] == "v1" and body["models"]["intent_version"] == "v7"
    (([ranked],),), (([classified],),) = ranker.calls, intent.calls
    query_tokens = ranked.seqs[0].ids  # the bi-encoder's first sequence is the query
    np.testing.assert_array_equal(classified.seqs[0].ids, query_tokens)


def test_openapi_documents_every_route_with_its_models(ingress: Ingress) -> None:
    status, _, doc = call(ingress, "GET", "/openapi.json")
    assert status == 200
    served = {p for _, p in ingress._routes} - {"/openapi.json", "/docs"}
    assert set(doc["paths"]) == served
    v2 = doc["paths"]["/v2/rerank"]["post"]
    assert v2["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("CohereV2RerankRequest")
    assert v2["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    assert {"message", "detail", "error", "error_type"} <= set(doc["components"]["schemas"]["ErrorBody"]["required"])


def test_docs_page(ingress: Ingress) -> None:
    async def docs() -> tuple[int, bytes]:
        scope = {"type": "http", "method": "GET", "path": "/docs", "root_path": "", "headers": [], "query_string": b""}
        response = await ingress(Request(scope))
        return response.status_code, bytes(response.body)

    status, html = asyncio.run(docs())
    assert status == 200 and b"swagger" in html.lower() and b"/openapi.json" in html


# -- access control -----------------------------------------------------------------------------


def keyed_ingress(ranker: FakeHandle, *keys: str) -> Ingress:
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels, info=lambda: {"ready": True}))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    data = cfg.model_dump(mode="json")
    data["auth"] = {"api_keys": list(keys)}
    asyncio.run(ing.reconfigure(data))
    return ing


def test_with_api_keys_every_route_but_the_probes_needs_one() -> None:
    from serve_app.config import api_key_digest

    ranker = FakeHandle(score_many=shorter_is_better, info=lambda: {"ready": True})

    # one key as plain text, one as its digest (what an operator may keep in the YAML instead)
    ing = keyed_ingress(ranker, "old-key-0123456789", api_key_digest("new-key-9876543210"))
    rerank = {"query": "q", "documents": ["a", "b"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic b2xkLWtleQ=="}):
        for method, path, body in [("POST", "/v1/rerank", rerank), ("GET", "/v1/models", None), ("POST", "/nope", {})]:
            status, got_headers, err = call(ing, method, path, body, headers)
            assert status == 401, (path, headers)
            assert got_headers["www-authenticate"].startswith("Bearer")
            assert err["error_type"] == "unauthorized" and err["message"] == err["error"] == err["detail"]
    assert ranker.calls == []  # nothing reached a model (not even /v1/models' info)
    for key in ("old-key-0123456789", "new-key-9876543210"):  # rotation: both keys work
        assert call(ing, "POST", "/v1/rerank", rerank, {"Authorization": f"Bearer {key}"})[0] == 200
        assert call(ing, "POST", "/nope", {}, {"Authorization": f"bearer {key}"})[0] == 404
    assert call(ing, "GET", "/health")[0] == 200
    assert call(ing, "GET", "/ready")[0] == 200  # probes stay open


def test_api_keys_are_kept_as_digests_and_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.api.auth import ApiKeys, bearer_token
    from serve_app.config import API_KEY_ENV, api_key_digest

    monkeypatch.setenv(API_KEY_ENV, " first-secret-key , second-secret-key,")
    cfg = load_config()
    assert cfg.auth.api_keys == (api_key_digest("first-secret-key"), api_key_digest("second-secret-key"))
    dumped = json.dumps(cfg.model_dump(mode="json"))  # what travels as user_config and shows in serve status
    assert "first-secret-key" not in dumped and "second-secret-key" not in dumped
    keys = ApiKeys(cfg.auth.api_keys)
    assert keys.allows("Bearer second-secret-key") and not keys.allows("Bearer second-secret-ke")
    assert not keys.allows("second-secret-key") and not keys.allows(None)
    assert bearer_token("  BEARER   tok  ") == "tok" and bearer_token("Bearer ") is None
    monkeypatch.delenv(API_KEY_ENV)
    assert not load_config().auth.enabled  # the default is an open service


# -- deadlines ----------------------------------------------------------------------------------


def test_a_request_past_its_deadline_gets_504_at_once_and_carries_its_deadline_downstream() -> None:
    import time

    seen: list[RankCall] = []
    ing = Ingress(slow_ranker(seen, 5.0), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    body = {"query": "q", "documents": ["a", "b"]}
    t0 = time.time()
    status, _, err = call(ing, "POST", "/v1/rerank", body, {"X-Request-Timeout-Ms": "150"})
    took = time.time() - t0
    assert status == 504 and err["error_type"] == "deadline_exceeded" and "150 ms" in err["message"]
    assert 0.15 <= took < 1.0
    assert 0 < seen[0].deadline - t0 <= 0.15 + 0.05  # the model can drop the rows once it passes
    # a client may shorten the deadline, never lengthen it past the configured one
    limit = cfg.limits.request_timeout_s
    assert ing._timeout_s(_request({"x-request-timeout-ms": str(limit * 10_000)})) == limit
    for bad in ("0", "-5", "soon", "nan", "inf"):
        status, _, err = call(ing, "POST", "/v1/rerank", body, {"X-Request-Timeout-Ms": bad})
        assert status == 400 and "X-Request-Timeout-Ms" in err["message"], bad


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw})


def test_the_model_dropping_an_expired_request_answers_504() -> None:
    from serve_app.core.backend import DeadlineExceeded

    def expired(calls: list[RankCall]) -> list[Any]:
        return [DeadlineExceeded() for _ in calls]

    ing = Ingress(FakeHandle(score_many=expired), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    status, _, err = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 504 and err["error_type"] == "deadline_exceeded"
    assert ing._door.models["rerank"].queued_tokens == 0


# -- a model replica lost -----------------------------------------------------------------------


class FakeReplicaActors:
    """Serve at the Ray boundary: named replica actors that answer ``was_initialized``, and the controller's
    ``serve.status()``.

    ``ready`` is what a replica answers; ``None`` means none is listed (the last one died, its name released);
    ``delay_s`` is how long an answer takes (a starved or unreachable replica answers late or never);
    ``states`` and ``status`` are what the controller reports of the deployment.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ray
        import ray.util
        from ray import serve

        self.ready: bool | None = True
        self.delay_s = 0.0
        self.asked = 0
        self.states = {"RUNNING": 1}
        self.status = "HEALTHY"
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray.util, "list_named_actors", self._list)
        monkeypatch.setattr(ray, "get_actor", lambda name, namespace: self)
        monkeypatch.setattr(serve, "status", self._serve_status)
        monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))

    def _list(self, all_namespaces: bool) -> list[dict[str, str]]:
        names = [{"name": "SERVE_REPLICA::other#Ranker#b", "namespace": "serve"}]  # another app's: not asked
        if self.ready is not None:
            names.append({"name": "SERVE_REPLICA::app#Ranker#a", "namespace": "serve"})
        return names

    def _serve_status(self) -> Any:
        from types import SimpleNamespace

        ranker = SimpleNamespace(status=self.status, replica_states=dict(self.states))
        return SimpleNamespace(applications={"app": SimpleNamespace(deployments={"Ranker": ranker})})

    @property
    def was_initialized(self) -> FakeMethod:
        async def answer() -> bool:
            self.asked += 1
            await asyncio.sleep(self.delay_s)
            return bool(self.ready)

        return FakeMethod(answer, [])


@pytest.fixture()
def replica_actors(monkeypatch: pytest.MonkeyPatch) -> FakeReplicaActors:
    return FakeReplicaActors(monkeypatch)


def test_a_call_lost_with_its_replica_is_retried_once_on_a_live_one(replica_actors: FakeReplicaActors) -> None:
    from ray.exceptions import ActorDiedError

    lost = [True]

    def dies_once(calls: list[RankCall]) -> list[Ranked]:
        if lost.pop() if lost else False:
            raise ActorDiedError()
        return shorter_is_better(calls)

    handle = FakeHandle(score_many=dies_once)
    ing = Ingress(handle, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    status, _, body = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["long one", "b"]})
    assert status == 200 and [r["index"] for r in body["results"]] == [1, 0]
    client = ing._path.ranker
    assert isinstance(client, RemoteRanker) and client.replica_failures == 1 and client.retries == 1
    assert len(handle.calls) == 2 and replica_actors.asked == 1  # call, retry; the live replica was asked once


def test_with_no_live_replica_calls_fail_fast_with_503_until_one_answers_again(
    replica_actors: FakeReplicaActors,
) -> None:
    import time

    from ray.exceptions import ActorDiedError

    replica_up = [False]
    replica_actors.ready = None  # the only replica died: its name is gone (the controller has not noticed)

    def score(calls: list[RankCall]) -> list[Ranked]:
        if not replica_up[0]:
            raise ActorDiedError()
        return shorter_is_better(calls)

    async def info() -> dict[str, Any]:
        if not replica_up[0]:
            await asyncio.sleep(10)  # the router holds it: no replica it knows can serve yet
        return {"ready": True}

    handle = FakeHandle(score_many=score, info=lambda: info())
    body = {"query": "q", "documents": ["a", "b"]}

    async def scenario() -> tuple[list[tuple[int, float, Any]], int, int, int, int]:
        ing = Ingress(handle, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
        cfg = load_config().model_copy(update={"model_placement": "deployments"})
        await ing.reconfigure(cfg.model_dump(mode="json"))
        ing._path.ranker.probe_every_s = 0.05  # type: ignore[attr-defined]
        out = []
        for _ in range(3):
            t0 = time.perf_counter()
            status, headers, err = await acall(ing, "POST", "/v1/rerank", body)
            out.append((status, time.perf_counter() - t0, (err, headers)))
        sent_while_down = sum(1 for args in handle.calls if args)  # score calls (info probes have no args)
        replica_actors.ready, replica_actors.states = False, {"STARTING": 1}  # the replacement, in its constructor
        status_while_starting = (await acall(ing, "POST", "/v1/rerank", body))[0]
        replica_actors.ready = True  # constructed; its reconfigure still loads the model
        await asyncio.sleep(0.3)
        status_while_loading = (await acall(ing, "POST", "/v1/rerank", body))[0]
        replica_up[0], replica_actors.states = True, {"RUNNING": 1}  # ... and now serves
        for _ in range(100):
            await asyncio.sleep(0.05)
            if ing._path.ranker.available:  # type: ignore[attr-defined]
                break
        status, _, _ = await acall(ing, "POST", "/v1/rerank", body)
        return out, sent_while_down, status_while_starting, status_while_loading, status

    refused, sent_while_down, while_starting, while_loading, after = asyncio.run(scenario())
    for status, took, (err, headers) in refused:
        assert status == 503 and err["error_type"] == "unavailable" and headers["retry-after"] == "1"
        assert took < 1.5  # the probe's bound, not the replacement's start time
    assert refused[1][1] < 0.2 and refused[2][1] < 0.2  # refused at once while no replica answers
    assert sent_while_down == 1  # only the first call reached the (dead) replica
    assert while_starting == while_loading == 503  # a replacement that cannot serve yet does not count
    assert after == 200


def test_a_stalled_call_waits_while_serve_replaces_replicas_and_is_refused_once_settled(
    replica_actors: FakeReplicaActors,
) -> None:
    """A stalled call whose probe times out is refused only while Serve's controller reports the deployment
    settled; during a deploy (``UPDATING``) it waits for the new replicas, as it did before fail-fast existed."""
    replica_actors.status = "UPDATING"
    replica_actors.delay_s = 10  # no replica answers in time (starved, or lost before the controller knew)

    async def slow(calls: list[RankCall]) -> list[Ranked]:  # the new replicas answer once the deploy is done;
        await asyncio.sleep(1.6 if replica_actors.status == "UPDATING" else 10)  # with none alive, never
        return shorter_is_better(calls)

    handle = FakeHandle(score_many=slow)
    body = {"query": "q", "documents": ["a", "b"]}

    async def scenario() -> tuple[int, int]:
        ing = Ingress(handle, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
        cfg = load_config().model_copy(update={"model_placement": "deployments"})
        await ing.reconfigure(cfg.model_dump(mode="json"))
        ing._path.ranker.probe_timeout_s = 0.3  # type: ignore[attr-defined]
        during_deploy = (await acall(ing, "POST", "/v1/rerank", body))[0]
        replica_actors.status = "HEALTHY"  # settled, yet no replica answers: it died before the controller noticed
        settled = (await acall(ing, "POST", "/v1/rerank", body))[0]
        return during_deploy, settled

    assert asyncio.run(scenario()) == (200, 503)


def test_a_call_stalled_behind_a_busy_replica_waits_and_is_answered(replica_actors: FakeReplicaActors) -> None:
    """A replica with its queue full is busy, not dead: the stalled call's probe finds it alive and initialized
    (asked outside the request queue), so the call waits for its answer instead of a 503."""

    async def busy(calls: list[RankCall]) -> list[Ranked]:
        await asyncio.sleep(1.3)  # stalls past ``stall_after_s`` twice (the first call: no typical time yet)
        return shorter_is_better(calls)

    ing = Ingress(FakeHandle(score_many=busy), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    status, _, _ = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert status == 200 and replica_actors.asked == 2 and ing._path.ranker.available  # type: ignore[attr-defined]


def test_a_slow_models_calls_check_its_replicas_only_past_a_few_typical_calls(
    replica_actors: FakeReplicaActors,
) -> None:
    """A model whose calls all take 0.8 s (ONNX Runtime on a CPU) is not probed on every call: past the first,
    a call checks the replicas only once it takes ``stall_factor`` typical calls (each probe costs the ingress
    CPU); a call that then stalls past that is still checked, and refused when no replica answers."""
    hang = False

    async def slow(calls: list[RankCall]) -> list[Ranked]:
        await asyncio.sleep(10 if hang else 0.8)
        return shorter_is_better(calls)

    async def scenario() -> tuple[list[int], int, float, int, float, bool]:
        nonlocal hang
        handle = FakeHandle(score_many=slow, info=lambda: {"ready": True})
        ing = Ingress(handle, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
        cfg = load_config().model_copy(update={"model_placement": "deployments"})
        await ing.reconfigure(cfg.model_dump(mode="json"))
        ing._path.ranker.probe_timeout_s = 0.3  # type: ignore[attr-defined]
        ing._path.ranker.probe_every_s = 0.05  # type: ignore[attr-defined]
        body = {"query": "q", "documents": ["a", "b"]}
        statuses = [(await acall(ing, "POST", "/v1/rerank", body))[0] for _ in range(4)]
        probes = replica_actors.asked
        stall_s = ing._path.ranker.stall_s()  # type: ignore[attr-defined]
        hang, replica_actors.ready = True, None  # its last replica died: the call is never answered
        t0 = time.perf_counter()
        dead = (await acall(ing, "POST", "/v1/rerank", body))[0]
        waited = time.perf_counter() - t0
        hang, replica_actors.ready = False, True  # a replacement serves: the model's recovery loop ends
        for _ in range(100):  # left running, that loop once kept asyncio.run from closing (CI, 900 s timeout)
            await asyncio.sleep(0.05)
            if ing._path.ranker.available:  # type: ignore[attr-defined]
                break
        return statuses, probes, stall_s, dead, waited, ing._path.ranker.available  # type: ignore[attr-defined]

    statuses, probes, stall_s, dead, waited, recovered = asyncio.run(scenario())
    assert statuses == [200] * 4
    assert probes == 1  # the first call, before a typical time was known (0.5 s): once, not once per call
    assert 1.9 < stall_s <= 2.0  # 4 x ~0.8 s, capped: a dead deployment is still found within seconds
    assert dead == 503 and stall_s <= waited < stall_s + 1.0
    assert recovered


def test_a_stalled_call_is_refused_while_the_only_replicas_are_still_starting(
    replica_actors: FakeReplicaActors,
) -> None:
    """After a node is lost Serve starts replacements; their actors answer before the model is loaded. With no
    replica RUNNING by the controller's word (and no deploy under way), a stalled call is refused at once."""
    replica_actors.states, replica_actors.status = {"STARTING": 1}, "UNHEALTHY"

    async def waits_for_a_replica(calls: list[RankCall]) -> list[Ranked]:
        await asyncio.sleep(10)  # Serve's router holds the call until a replica has started
        return shorter_is_better(calls)

    ing = Ingress(FakeHandle(score_many=waits_for_a_replica), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    t0 = time.perf_counter()
    status, _, err = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert status == 503 and err["error_type"] == "unavailable" and time.perf_counter() - t0 < 1.5


def test_a_replica_sets_pythons_collector_from_the_config_and_gives_it_back(ranker: FakeHandle) -> None:
    """``python_gc`` reaches every replica's process: the ingress's own, and each model deployment's config."""
    import gc

    from serve_app.deployments.python_gc import PYTHON_DEFAULT

    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    ing = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    try:
        asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
        assert gc.get_threshold() == (20_000, *PYTHON_DEFAULT[1:])
        python_default = cfg.model_copy(update={"python_gc": PythonGcConfig(gen0_threshold=None)})
        asyncio.run(ing.reconfigure(python_default.model_dump(mode="json")))
        assert gc.get_threshold() == PYTHON_DEFAULT
        for task in ("rerank", "classify"):  # what the Ranker and Intent deployments are sent
            sent = TaskServingConfig.model_validate(cfg.task_serving(task).model_dump(mode="json"))
            assert sent.python_gc.gen0_threshold == 20_000
    finally:
        gc.set_threshold(*PYTHON_DEFAULT)


def test_timing_headers_split_a_model_call_into_the_replicas_time_and_the_rest() -> None:
    """TEI's ``x-*-time`` headers and ``Server-Timing`` on an answer: the replica's own figures (it waited 10 ms
    for a batch that ran 20 ms, 35 ms in all) and the rest of the call, here 60 ms of transport, as the ingress
    saw it. An error answer carries none."""
    from serve_app.api.timing import parse_server_timing

    async def slow_replica(calls: list[RankCall]) -> list[Ranked]:
        await asyncio.sleep(0.095)  # 60 ms of hops around the replica's 35
        timing = ModelTiming(queue_s=0.010, inference_s=0.020, in_replica_s=0.035)
        return [Ranked(-c.seqs.lengths()[1:].astype(np.float32), "v1", timing) for c in calls]

    ing = Ingress(FakeHandle(score_many=slow_replica), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    status, headers, _ = call(ing, "POST", "/v1/rerank", {"query": "q", "documents": ["a b", "c"]})
    assert status == 200
    stages = parse_server_timing(headers["server-timing"])
    assert list(stages) == ["wait", "tokenize", "slot", "send", "queue", "inference", "total"]
    assert (stages["queue"], stages["inference"]) == (10.0, 20.0)  # the replica's figures, as sent
    assert stages["slot"] < 50  # one request: a call slot was free
    assert 60 <= stages["send"] < 60 + 200  # the call outside the replica: at least the fake's sleep beyond 35 ms
    parts = ("tokenize", "slot", "send", "queue", "inference")
    assert stages["total"] >= sum(stages[name] for name in parts)
    assert headers["x-inference-time"] == "20"
    # TEI's are whole milliseconds (rounded down) of the same figures: its queue is everything before the forward
    for name, ms in (("queue", stages["slot"] + stages["send"] + stages["queue"]), ("total", stages["total"]),
                     ("tokenization", stages["tokenize"])):  # fmt: skip
        assert abs(int(headers[f"x-{name}-time"]) - ms) <= 1

    status, headers, _ = call(ing, "POST", "/v1/rerank", {"query": 5})
    assert status == 422 and "server-timing" not in headers and "x-total-time" not in headers
