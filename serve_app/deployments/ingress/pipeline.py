"""The request path every route shares, whatever its client's shape: admit at the door, read, tokenize on this
replica with the chosen version's tokenizer, call the model, and say what it cost.

The routes (``dialects``) only parse their client's body and shape the answer; ``Ingress`` owns this object and
configures it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Literal

import numpy as np
from starlette.requests import Request

from serve_app.api import errors, schemas
from serve_app.api.http import ARRIVED_HEADER, check_texts, read_body
from serve_app.batching.buckets import bucket_lengths
from serve_app.config import AppConfig, ModelConfig, Task
from serve_app.core.sequences import Encoded, Sequences
from serve_app.deployments.encoder import Classified, ClassifyCall, RankCall, RankerOutput
from serve_app.deployments.ingress.arrival_clock import ArrivalClock
from serve_app.deployments.ingress.door import Door
from serve_app.deployments.ingress.rerank import Reranked, RerankInput, RerankSequences, reranked_agreement
from serve_app.deployments.ingress.tokenizer_threads import TokenizerThreads
from serve_app.deployments.ingress.trace import Trace
from serve_app.deployments.ingress.versions import Versions, VersionSpec
from serve_app.deployments.model_client import IntentClient, RankerClient
from serve_app.models.tokenizer import cap_document_tokens
from serve_app.ranking.chunks import ChunkMap, aggregate
from serve_app.ranking.fusion import fuse
from serve_app.rollout.agreement import top1_agreement

Classification = tuple[list[Encoded], Classified, schemas.Usage]  # the inputs' sequences, the answer, its usage
ModelCalls = Literal["in_process", "actor", "grpc"]  # how model calls travel: no hop, Ray actor calls, Serve's gRPC


class Pipeline:
    """One ingress replica's request path; its models are clients of either placement (``model_client``)."""

    ranker: RankerClient  # set by ``Ingress``: in-process models at once, handles' clients on the first config
    intent: IntentClient

    def __init__(self, door: Door, versions: Versions) -> None:
        self.door = door
        self.versions = versions
        self.model_calls: ModelCalls = "in_process"  # reported per ingress replica in ``/v1/models``
        self.tokenizer = TokenizerThreads(door.tokenizer, door.measured)
        self.arrivals = ArrivalClock()
        self.counts_arrival_wait = False  # HAProxy's stamp is read (``Ingress.reconfigure`` decides)
        self._cfg: AppConfig | None = None

    def configure(self, cfg: AppConfig, counts_arrival_wait: bool) -> None:
        self.versions.load(cfg)
        self.tokenizer.resize(cfg.tokenizer_threads())
        self.door.configure(cfg.batching)
        self.counts_arrival_wait = counts_arrival_wait
        self._cfg = cfg

    @property
    def cfg(self) -> AppConfig:
        assert self._cfg is not None, "configure() runs before the first request"
        return self._cfg

    # -- what every route does first --------------------------------------------------------------

    def admit(self, request: Request, trace: Trace, *tasks: Task) -> None:
        """Admit a request at the door, before its body is read (a refusal costs almost nothing), or refuse
        it with 503 there: the one admission decision (``Door``)."""
        size = request.headers.get("content-length")
        waited = 0.0
        if self.counts_arrival_wait:
            peer = request.client.host if request.client else ""
            waited = trace.timing.wait_s = self.arrivals.wait_s(peer, request.headers.get(ARRIVED_HEADER), time.time())
        self.door.admit(int(size) if size is not None and size.isdigit() else None, trace, *tasks, waited_s=waited)

    def read(self, request: Request) -> Awaitable[bytes]:
        return read_body(request, self.cfg.limits.max_body_bytes)

    def check_model(self, task: Task, requested: str | None) -> ModelConfig:
        """The task's model, if ``requested`` (a client's ``model`` field) names it or one of its aliases."""
        model = self.cfg.model_for(task)
        if not model.answers_to(requested):
            names = ", ".join(repr(n) for n in (model.name, *model.aliases))
            raise errors.ApiError(404, "model_not_found", f"model {requested!r} is not served here; use one of {names}")
        return model

    def check_documents(self, query: str, texts: list[str]) -> None:
        check_texts([query], self.cfg.limits, 1, "query")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_documents, "documents")

    def check_dimensions(self, requested: int | None, width: int) -> None:
        if requested is not None and requested != width:
            raise errors.ApiError(
                422,
                "validation_error",
                f"dimensions: {self.cfg.model_for('rerank').name} embeds in {width} dimensions only",
            )

    # -- the three things the models do -----------------------------------------------------------

    async def rerank(self, req: RerankInput, trace: Trace) -> Reranked:
        """Score every document, windows aggregated per document, fused with the first stage if it was sent."""

        async def work(spec: VersionSpec, t: Trace) -> Reranked:
            return await self._score_documents(req, await self._encode_rerank(spec, req, t), spec, t)

        return await self.versions.routed("rerank", trace, work, reranked_agreement)

    async def embed(self, texts: list[str], truncate: bool, trace: Trace) -> tuple[np.ndarray, schemas.Usage]:
        async def work(spec: VersionSpec, t: Trace) -> tuple[np.ndarray, schemas.Usage]:
            if spec.pairs:
                raise errors.ApiError(
                    400, "unsupported_model",
                    f"{spec.model.name} is a cross-encoder: it scores pairs, it has no embeddings",
                )  # fmt: skip
            if not texts:
                raise errors.ApiError(422, "validation_error", "input: must not be empty")
            check_texts(texts, self.cfg.limits, self.cfg.limits.max_inputs, "input")
            encoded = await self._tokenize(spec, texts, t)
            self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
            packed = Sequences.pack(encoded)
            start_by, held = self.door.start_by("rerank", t)
            call = RankCall(packed, False, RankerOutput.EMBEDDINGS, t.deadline, spec.model.key, start_by, held)
            ranked = await self.door.call("rerank", self._cost(packed), lambda: self.ranker.score(call), t)
            t.served.append((spec.model.name, ranked.version))
            t.timing.replied(ranked.timing)
            return ranked.values, _usage(packed)

        return await self.versions.routed("rerank", trace, work)  # embeddings are not shadowed: nothing to rank

    async def classify(
        self, texts: list[str], truncate: bool, top_k: int | None, raw_scores: bool, what: str, trace: Trace
    ) -> Classification:
        """``texts`` classified; ``what`` names the field in errors."""

        async def work(spec: VersionSpec, t: Trace) -> Classification:
            encoded = await self._encode_inputs(spec, texts, truncate, what, t)
            result, usage = await self._classify_texts(spec, encoded, top_k, raw_scores, t)
            return encoded, result, usage

        return await self.versions.routed("classify", trace, work, _top1_agreement)

    # -- tokenizing -------------------------------------------------------------------------------

    async def _tokenize(
        self, spec: VersionSpec, texts: list[str], trace: Trace, query: str | None = None
    ) -> list[Encoded]:
        enc = spec.encoder
        if query is not None:
            return await self.tokenizer.encode(texts, None, lambda part: enc.encode_pairs(query, part), trace, query)
        return await self.tokenizer.encode(texts, None, enc.encode, trace, lookup=enc.lookup)

    @staticmethod
    def _refuse_truncation(truncate: bool, encoded: list[Encoded], max_len: int) -> None:
        if not truncate:
            for i, e in enumerate(encoded):
                if e.truncated:
                    raise errors.ApiError(
                        413, "input_too_long", f"input {i} exceeds {max_len} tokens and truncate is false"
                    )

    async def _encode_rerank(self, spec: VersionSpec, req: RerankInput, trace: Trace) -> RerankSequences:
        chunking = spec.model.chunking.enabled if req.chunking is None else req.chunking
        encoded, chunks = await self._encode_documents(
            spec, req.query, req.texts, req.truncate, trace, req.max_doc_tokens, chunking
        )
        return RerankSequences(encoded, chunks, chunking)

    async def _encode_documents(
        self,
        spec: VersionSpec,
        query: str,
        texts: list[str],
        truncate: bool,
        trace: Trace,
        max_doc_tokens: int | None = None,
        chunking: bool = False,
    ) -> tuple[list[Encoded], ChunkMap]:
        """The ranker's sequences: (query, document) pairs, or the query first and then each document; with
        ``chunking``, every window of each document. Also which document each scored sequence belongs to."""
        self.check_documents(query, texts)
        if chunking:
            encoded, chunks = await self._tokenize_windows(spec, query, texts, max_doc_tokens, trace)
        elif spec.pairs:
            encoded, chunks = await self._tokenize(spec, texts, trace, query), ChunkMap.one_each(len(texts))
            if max_doc_tokens is not None:
                encoded = cap_document_tokens(encoded, max_doc_tokens, pairs=True)
        else:
            # the query and the documents together; errors name the document
            encoded = await self.tokenizer.encode(texts, query, spec.encoder.encode, trace, lookup=spec.encoder.lookup)
            chunks = ChunkMap.one_each(len(texts))
            if max_doc_tokens is not None:
                encoded = [encoded[0], *cap_document_tokens(encoded[1:], max_doc_tokens, pairs=False)]
        self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
        return encoded, chunks

    async def _tokenize_windows(
        self, spec: VersionSpec, query: str, texts: list[str], max_doc_tokens: int | None, trace: Trace
    ) -> tuple[list[Encoded], ChunkMap]:
        c, limit = spec.model.chunking, self.cfg.limits.max_chunks_per_request
        enc = spec.encoder
        pair_query = query if spec.pairs else None

        def windows() -> tuple[list[Encoded], ChunkMap]:
            return enc.encode_windows(texts, c.overlap_tokens, c.max_chunks_per_document, pair_query, max_doc_tokens)

        seqs, chunks = await self.tokenizer.run(texts, query, windows, trace, pairs=pair_query is not None)
        if pair_query is None:  # a bi-encoder's first sequence is the query
            seqs = [*await self._tokenize(spec, [query], trace), *seqs]
        if chunks.chunks > limit:
            raise errors.ApiError(
                413, "too_many_chunks",
                f"the documents make {chunks.chunks} windows; the limit is {limit} per request "
                "(send fewer or shorter documents, or chunking: false)",
            )  # fmt: skip
        return seqs, chunks

    async def _encode_inputs(
        self, spec: VersionSpec, texts: list[str], truncate: bool, what: str, trace: Trace
    ) -> list[Encoded]:
        if not texts:
            raise errors.ApiError(422, "validation_error", f"{what}: must not be empty")
        check_texts(texts, self.cfg.limits, self.cfg.limits.max_inputs, what)
        encoded = await self._tokenize(spec, texts, trace)
        self._refuse_truncation(truncate, encoded, self.cfg.batching.buckets[-1])
        return encoded

    # -- model calls ------------------------------------------------------------------------------

    async def _score_documents(
        self, req: RerankInput, seqs: RerankSequences, spec: VersionSpec, trace: Trace
    ) -> Reranked:
        ranker = spec.model
        scores, usage = await self._rank(spec, seqs.encoded, req.raw_scores, trace)
        usage.chunks = seqs.chunks.chunks
        if seqs.chunked:  # a document counts once, however many of its windows were cut
            usage.truncated_inputs = seqs.documents_cut(spec.pairs)
        model = aggregate(scores, seqs.chunks, ranker.chunking.aggregation)
        if req.first_stage is None:
            return Reranked(model.tolist(), None, usage)
        return Reranked(fuse(model, req.first_stage, ranker.fusion).tolist(), model.tolist(), usage)

    async def _rank(
        self, spec: VersionSpec, encoded: list[Encoded], raw_scores: bool, trace: Trace
    ) -> tuple[np.ndarray, schemas.Usage]:
        packed = Sequences.pack(encoded)
        output = RankerOutput.RAW_SCORES if raw_scores else RankerOutput.SCORES
        start_by, held = self.door.start_by("rerank", trace)
        call = RankCall(packed, spec.pairs, output, trace.deadline, spec.model.key, start_by, held)
        ranked = await self.door.call("rerank", self._cost(packed), lambda: self.ranker.score(call), trace)
        trace.served.append((spec.model.name, ranked.version))
        trace.timing.replied(ranked.timing)
        return ranked.values, _usage(packed)

    async def _classify_texts(
        self, spec: VersionSpec, encoded: list[Encoded], top_k: int | None, raw_scores: bool, trace: Trace
    ) -> tuple[Classified, schemas.Usage]:
        packed = Sequences.pack(encoded)
        start_by, held = self.door.start_by("classify", trace)
        call = ClassifyCall(packed, top_k, raw_scores, trace.deadline, spec.model.key, start_by, held)
        result = await self.door.call("classify", self._cost(packed), lambda: self.intent.classify(call), trace)
        trace.served.append((spec.model.name, result.version))
        trace.timing.replied(result.timing)
        return result, _usage(packed)

    def _cost(self, packed: Sequences) -> int:
        """A model call's cost in padded tokens: what it holds in the model's queue (``Door.call``) while it runs."""
        return int(bucket_lengths(packed.lengths(), self.cfg.batching.buckets).sum())


def _usage(packed: Sequences) -> schemas.Usage:
    return schemas.Usage(total_tokens=packed.total_tokens, truncated_inputs=int(packed.truncated.sum()))


def _top1_agreement(serving: Classification, shadow: Classification) -> float:
    return top1_agreement([labels[0] for labels in serving[1].labels], [labels[0] for labels in shadow[1].labels])
