"""Score fusion, long-document windows and the score cache, without a cluster: the math by hand, windows on
the real tokenizer, and the cache inside the real in-process models (ONNX Runtime) across a version swap."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ingress import acall, call
from tokenizers import Tokenizer

from serve_app.batching.row_cache import RowCache, sequence_keys
from serve_app.config import AppConfig, FusionConfig, ScoreCacheConfig, load_config
from serve_app.core.backend import DeadlineExceeded, StartedLate
from serve_app.core.sequences import Encoded, Sequences
from serve_app.core.timing import Processor
from serve_app.deployments.encoder import RankCall, Ranker
from serve_app.deployments.ingress import Ingress
from serve_app.models.artifacts import resolve, tokenizer_spec
from serve_app.models.tokenizer import MORE_CHARS_PER_TOKEN, TextEncoder
from serve_app.ranking.chunks import ChunkMap, aggregate, window_spans
from serve_app.ranking.fusion import fuse

# -- fusion: against a hand computation --------------------------------------------------------------------


def test_z_linear_fusion_by_hand() -> None:
    model, bm25 = [0.9, 0.1, 0.5], [2.0, 8.0, 5.0]
    # model: mean 0.5, population std sqrt((0.16 + 0.16 + 0) / 3); bm25: mean 5, std sqrt((9 + 9 + 0) / 3)
    sm, sb = math.sqrt(0.32 / 3), math.sqrt(6.0)
    zm = [0.4 / sm, -0.4 / sm, 0.0]
    zb = [-3 / sb, 3 / sb, 0.0]
    expected = [0.7 * a + 0.3 * b for a, b in zip(zm, zb, strict=True)]
    got = fuse(model, bm25, FusionConfig(method="z_linear", weight=0.7))
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert fuse(model, bm25, FusionConfig(weight=1.0)).argsort().tolist() == [1, 2, 0]  # the model's order
    assert fuse(model, bm25, FusionConfig(weight=0.0)).argsort().tolist() == [0, 2, 1]  # the first stage's


def test_rrf_fusion_by_hand() -> None:
    model, bm25 = [0.9, 0.1, 0.5], [2.0, 8.0, 5.0]  # model ranks 1, 3, 2; first-stage ranks 3, 1, 2
    got = fuse(model, bm25, FusionConfig(method="rrf", weight=0.5, rrf_k=60))
    assert got.tolist() == pytest.approx([0.5 / 61 + 0.5 / 63, 0.5 / 63 + 0.5 / 61, 0.5 / 62 + 0.5 / 62])
    ties = fuse([1.0, 1.0], [1.0, 1.0], FusionConfig(method="rrf", weight=0.5, rrf_k=1))
    assert ties.tolist() == [1.0 / 2, 1.0 / 3]  # equal scores: the input order ranks first, as responses sort


def test_fusion_of_constant_scores_falls_back_to_the_other_signal() -> None:
    assert fuse([0.3, 0.3, 0.3], [1.0, 3.0, 2.0], FusionConfig(weight=0.6)).argsort().tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="2 first-stage scores for 3 documents"):
        fuse([0.1, 0.2, 0.3], [1.0, 2.0], FusionConfig())


# -- windows ---------------------------------------------------------------------------------------------


@given(length=st.integers(0, 3000), width=st.integers(2, 300), data=st.data())
@settings(max_examples=300, deadline=None)
def test_windows_cover_the_whole_text_with_the_configured_overlap(length: int, width: int, data: Any) -> None:
    overlap = data.draw(st.integers(0, width - 1))
    spans, short = window_spans(length, width, overlap, max_windows=10_000)
    assert not short and spans[0][0] == 0 and spans[-1][1] == length
    assert all(0 < e - s <= width or length == 0 for s, e in spans)
    for (_, prev_end), (start, _) in itertools.pairwise(spans):
        assert prev_end - start == overlap  # each window repeats exactly `overlap` tokens, no gap
    capped, short = window_spans(length, width, overlap, max_windows=2)
    assert capped == spans[:2] and short == (len(spans) > 2)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    spec = tokenizer_spec(load_config().model_for("rerank"), 256)
    return TextEncoder(spec.tokenizer_path, 64)


LONG = " ".join(f"word{i} is followed by another sentence about topic {i % 7}." for i in range(60))


def test_text_windows_on_the_real_tokenizer_rebuild_the_whole_text(encoder: TextEncoder) -> None:
    spec = tokenizer_spec(load_config().model_for("rerank"), 256)
    (whole,) = TextEncoder(spec.tokenizer_path, 100_000).encode([LONG])
    content = whole.ids[1:-1].tolist()
    seqs, chunks = encoder.encode_windows([LONG, "short text"], overlap=16, max_windows=100)
    assert chunks.documents == 2 and chunks.owner.tolist() == [0] * (chunks.chunks - 1) + [1]
    windows = [s for s, d in zip(seqs, chunks.owner, strict=True) if d == 0]
    assert len(windows) > 5 and all(len(w) <= 64 for w in windows)
    assert all(w.ids[0] == whole.ids[0] and w.ids[-1] == whole.ids[-1] for w in windows)  # [CLS] ... [SEP]
    rebuilt = windows[0].ids[1:-1].tolist()
    for w in windows[1:]:
        inner = w.ids[1:-1].tolist()
        assert inner[:16] == rebuilt[-16:]  # the overlap
        rebuilt += inner[16:]
    assert rebuilt == content and not any(w.truncated for w in windows)
    (short,) = [s for s, d in zip(seqs, chunks.owner, strict=True) if d == 1]
    assert short.ids.tolist() == encoder.encode(["short text"])[0].ids.tolist()  # a short text is one sequence
    capped, _ = encoder.encode_windows([LONG], overlap=16, max_windows=3)
    assert len(capped) == 3 and all(c.truncated for c in capped)


# words the head cut must not change: punctuation, accents, CJK (split per character), control characters,
# a word over WordPiece's 100-character limit ([UNK]), runs of spaces and newlines
_WORDS = st.sampled_from(
    ["the", "cell", "p53-dependent", "(n=12)", "Ünïcødé", "naïve", "細胞", "x" * 120, "a.b,c;", "\t", "\n", "", "\x00"]
)
_TEXTS = st.lists(_WORDS, min_size=0, max_size=400).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(_TEXTS, min_size=1, max_size=4))
def test_long_texts_tokenized_from_their_head_give_the_whole_texts_tokens(texts: list[str]) -> None:
    """``encode`` cuts a text far past its truncation at a space, and continues one that fell short in pieces
    cut at spaces: its sequences equal the whole text's, and ``truncated`` still says whether anything was
    cut."""
    cut = _encoder(24)  # cuts texts over 108 characters, continues in pieces of up to 200
    assert cut._cut_chars == 108
    reference = _reference(_tokenizer_path(), 24)
    for got, e in zip(cut.encode(texts), reference.encode_batch(texts), strict=True):
        assert got.ids.tolist() == e.ids and got.type_ids.tolist() == e.type_ids
        assert got.truncated == bool(e.overflowing)


# text with few tokens per character (runs of spaces, long words): the head falls short of the truncation and
# the rest is tokenized in pieces, some ASCII and some not, some without a space where the piece should end
_SPARSE_TEXTS = st.lists(st.tuples(_WORDS, st.integers(1, 60)), max_size=80).map(
    lambda words: "".join(w + " " * n for w, n in words)
)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(_SPARSE_TEXTS, min_size=1, max_size=4))
def test_texts_continued_in_pieces_give_the_whole_texts_tokens(texts: list[str]) -> None:
    cut = _encoder(24)
    reference = _reference(_tokenizer_path(), 24)
    for got, e in zip(cut.encode(texts), reference.encode_batch(texts), strict=True):
        assert got.ids.tolist() == e.ids and got.type_ids.tolist() == e.type_ids
        assert got.truncated == bool(e.overflowing)


def test_a_text_continued_to_exactly_the_truncation_or_one_token_past_it() -> None:
    """22 tokens fit a 24-token sequence ([CLS] and [SEP]): 22 words spread over several pieces are whole;
    23 are truncated."""
    cut = _encoder(24)
    reference = _reference(_tokenizer_path(), 24)
    spread = ["cell" + " " * 50 for _ in range(23)]
    texts = ["".join(spread[:22]), "".join(spread), "".join(spread[:22]).rstrip(), "".join(spread).rstrip()]
    for text in texts:  # a short head, and more text after it than one piece takes: two pieces or more
        head = cut._head(text)
        in_head = len(reference.encode(head).ids) - 2
        assert head is not text and in_head <= 3 and len(text) - len(head) > (23 - in_head) * MORE_CHARS_PER_TOKEN
    got = cut.encode(texts)
    for g, e in zip(got, reference.encode_batch(texts), strict=True):
        assert g.ids.tolist() == e.ids and g.truncated == bool(e.overflowing)
    assert [g.truncated for g in got] == [False, True, False, True] and len(got[0]) == 24


# ASCII the Python normalizer must treat as the Rust one: every control character (tab, newline and carriage
# return are whitespace, the others are dropped), capitals, and the added tokens in any case (matched before
# normalizing: such a text must take the Rust path)
_ASCII_WORDS = st.one_of(
    st.text(st.characters(max_codepoint=127), max_size=12),
    st.sampled_from(["[MASK]", "[mask]", "[CLS]", "[Sep]", "a[PAD]b", "[UNK", "x" * 120, "p53-Dependent", "\x0b\x0c"]),
)
_ASCII_TEXTS = st.lists(_ASCII_WORDS, max_size=300).map(" ".join)


@functools.cache
def _tokenizer_path() -> Path:
    return tokenizer_spec(load_config().model_for("rerank"), 256).tokenizer_path


@functools.cache  # built once: the property tests below run hundreds of examples
def _encoder(max_length: int) -> TextEncoder:
    return TextEncoder(_tokenizer_path(), max_length)


@functools.cache
def _reference(path: Path, max_length: int) -> Tokenizer:
    reference = Tokenizer.from_file(str(path))
    reference.no_padding()
    reference.enable_truncation(max_length)
    return reference


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(_ASCII_TEXTS, min_size=1, max_size=6), query=_ASCII_TEXTS)
def test_ascii_texts_normalized_in_python_give_the_rust_normalizers_tokens(texts: list[str], query: str) -> None:
    """ASCII texts skip the Rust normalizer; their ids equal the packaged tokenizer's, alone and as pairs, on
    both the GIL-holding path (small inputs) and the batch path."""
    enc = _encoder(128)
    reference = _reference(_tokenizer_path(), 128)
    for got, e in zip(enc.encode(texts), reference.encode_batch(texts), strict=True):
        assert got.ids.tolist() == e.ids and got.truncated == bool(e.overflowing)
    pairs = [(query, t) for t in texts]
    for got, e in zip(enc.encode_pairs(query, texts), reference.encode_batch(pairs), strict=True):
        assert got.ids.tolist() == e.ids and got.type_ids.tolist() == e.type_ids


def test_real_texts_on_the_ascii_path_give_the_packaged_tokenizers_ids(shared_data: Path) -> None:
    """SciFact abstracts and CLINC150 utterances, mostly ASCII: the same ids as the tokenizer's own path."""
    from serve_app.evaluation.data import load_clinc150, load_scifact

    sf = load_scifact(shared_data, top_k=20)
    abstracts = [sf.corpus[d] for q in sorted(sf.candidates)[:40] for d in sf.candidates[q]]
    utterances = [t for t, _ in load_clinc150(shared_data)["val"][:2000]]
    spec = tokenizer_spec(load_config().model_for("rerank"), 256)
    enc = TextEncoder(spec.tokenizer_path, 256)
    reference = _reference(spec.tokenizer_path, 256)
    for texts in (abstracts, utterances):
        assert sum(enc._ascii(t) is not None for t in texts) > len(texts) / 2  # the path under test is taken
        got = [e.ids.tolist() for e in enc.encode(texts)]
        assert got == [e.ids for e in reference.encode_batch(texts)]
        query = sf.queries[sorted(sf.candidates)[0]]
        got = [e.ids.tolist() for e in enc.encode_pairs(query, texts[:50])]
        assert got == [e.ids for e in reference.encode_batch([(query, t) for t in texts[:50]])]


class _Recording:
    """The real tokenizer, with the names of the methods called on it written down."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.tok, name)


def test_on_an_event_loop_the_tokenizer_keeps_the_gil_and_on_a_thread_it_lets_go() -> None:
    """``encode_batch_fast`` lets go of the GIL, and an event loop that takes it back waits for whichever
    thread holds it; ``encode`` keeps it. The ids are the same either way."""
    spec = tokenizer_spec(load_config().model_for("rerank"), 256)
    enc = TextEncoder(spec.tokenizer_path, 64)
    texts = ["what is my balance", "Ünïcødé text"]  # one on the ASCII path, one on the Rust normalizer's
    enc._plain, enc._tok = _Recording(enc._plain), _Recording(enc._tok)  # type: ignore[assignment]

    async def on_loop() -> list[list[int]]:
        return [e.ids.tolist() for e in enc.encode(texts)]

    looped = asyncio.run(on_loop())
    assert enc._plain.calls == enc._tok.calls == ["encode"]  # type: ignore[attr-defined]
    enc._plain.calls.clear(), enc._tok.calls.clear()  # type: ignore[attr-defined]
    threaded = [e.ids.tolist() for e in enc.encode(texts)]
    assert enc._plain.calls == enc._tok.calls == ["encode_batch_fast"]  # type: ignore[attr-defined]
    assert looped == threaded == [e.ids for e in _reference(spec.tokenizer_path, 64).encode_batch(texts)]


def test_the_ascii_path_is_off_for_other_normalizers(tmp_path: Path) -> None:
    spec = tokenizer_spec(load_config().model_for("rerank"), 256)
    data = json.loads(spec.tokenizer_path.read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert TextEncoder(spec.tokenizer_path, 24)._ascii("Hello") == "hello"
    assert TextEncoder(tmp_path / "tokenizer.json", 24)._ascii("Hello") is None


def test_the_head_cut_is_off_for_tokenizers_that_look_across_spaces(tmp_path: Path) -> None:
    spec = tokenizer_spec(load_config().model_for("rerank"), 256)
    data = json.loads(spec.tokenizer_path.read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert TextEncoder(spec.tokenizer_path, 24)._cut_chars == 108
    assert TextEncoder(tmp_path / "tokenizer.json", 24)._cut_chars is None


def test_pair_windows_repeat_the_query_in_every_window(encoder: TextEncoder) -> None:
    query = "which topic follows word7"
    (q,) = encoder.encode([query])
    seqs, chunks = encoder.encode_windows([LONG], overlap=8, max_windows=100, query=query)
    assert chunks.chunks == len(seqs) > 3
    for s in seqs:
        first = int((s.type_ids == 0).sum())
        assert s.ids[:first].tolist() == q.ids.tolist() and len(s) <= 64 and s.type_ids[-1] == 1
    long_query = " ".join(["question"] * 100)
    seqs, _ = encoder.encode_windows([LONG], overlap=8, max_windows=2, query=long_query)
    assert all(int((s.type_ids == 0).sum()) == 32 and len(s) <= 64 for s in seqs)  # the query takes half at most


def test_aggregation_by_hand() -> None:
    scores = np.array([0.2, 0.9, 0.4, 0.5, 0.1])
    chunks = ChunkMap(np.array([0, 0, 0, 1, 2]), 3)
    assert aggregate(scores, chunks, "max").tolist() == [0.9, 0.5, 0.1]
    assert aggregate(scores, chunks, "mean").tolist() == pytest.approx([0.5, 0.5, 0.1])
    assert aggregate(scores, chunks, "first").tolist() == [0.2, 0.5, 0.1]


# -- the cache -------------------------------------------------------------------------------------------


def _seqs(*rows: list[int]) -> Sequences:
    return Sequences.pack([Encoded(np.array(r), np.zeros(len(r), np.int64), False) for r in rows])


def test_row_cache_is_a_bounded_lru_keyed_by_content() -> None:
    cache = RowCache(max_entries=2)
    a, b, c = sequence_keys(_seqs([1, 2], [1, 3], [1, 2, 0]))
    assert len({a, b, c}) == 3 and sequence_keys(_seqs([1, 2]))[0] == a
    type_b = Sequences.pack([Encoded(np.array([1, 2]), np.array([0, 1]), False)])
    assert sequence_keys(type_b)[0] != a  # the segment ids are part of the key
    cache.store([a, b], np.array([[1.0], [2.0]], np.float32))
    assert [r is not None for r in cache.lookup([a])] == [True]  # a is now the most recent
    cache.store([c], np.array([[3.0]], np.float32))  # evicts b, the least recently used
    assert [r is not None for r in cache.lookup([a, b, c])] == [True, False, True]
    assert cache.as_dict() == {"max_entries": 2, "entries": 2, "lookups": 4, "hits": 3, "hit_rate": 0.75}


@pytest.fixture(scope="module")
def v2_ranker(app_config: AppConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another version of the ranker: the packaged graph with its word embeddings nudged (other scores)."""
    art = resolve(app_config.model_for("rerank"), app_config.artifacts_dir)
    graph = onnx.load(str(art.onnx_path))
    init = next(i for i in graph.graph.initializer if i.name.startswith("word_emb"))
    weights = onnx.numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0, 0.02, weights.shape).astype(weights.dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(weights + noise, init.name))
    root = tmp_path_factory.mktemp("models")
    onnx.save(graph, str(root / "ranker-v2.onnx"))
    (root / "tokenizer.json").write_bytes(art.tokenizer_path.read_bytes())
    return root / "ranker-v2.onnx"


def _config(
    app_config: AppConfig, source: str = "builtin", cache: int = 1000, roots: tuple[str, ...] = ()
) -> AppConfig:
    ranker = app_config.model_for("rerank").model_copy(
        update={"source": source, "score_cache": ScoreCacheConfig(max_entries=cache)}
    )
    return app_config.with_serving(ranker).model_copy(update={"model_roots": (*app_config.model_roots, *roots)})


RERANK = {"query": "how do I reset my password", "documents": ["Open Settings, choose Reset.", "Sunny today.", "Pw"]}


def _scores(response: tuple[int, Any, Any]) -> list[float]:
    status, _, body = response
    assert status == 200, body
    return [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]


@pytest.mark.usefixtures("outside_replica")
def test_the_cache_answers_repeats_and_never_serves_another_versions_scores(
    app_config: AppConfig, v2_ranker: Path
) -> None:
    v1, v2 = _config(app_config), _config(app_config, str(v2_ranker), roots=(str(v2_ranker.parent),))

    async def scenario() -> dict[str, Any]:
        ing = Ingress()
        await ing.reconfigure(v1.model_dump(mode="json"))
        out: dict[str, Any] = {"v1": [_scores(await acall(ing, "POST", "/v1/rerank", RERANK)) for _ in range(2)]}
        out["v1_cache"] = _info(await acall(ing, "GET", "/v1/models"))
        await ing.reconfigure(v2.model_dump(mode="json"))  # the swap: a new version, a new (empty) cache
        await ing.loaded()
        out["v2"] = [_scores(await acall(ing, "POST", "/v1/rerank", RERANK)) for _ in range(2)]
        out["v2_cache"] = _info(await acall(ing, "GET", "/v1/models"))
        fresh = Ingress()
        await fresh.reconfigure(_config(v2, str(v2_ranker), cache=0).model_dump(mode="json"))
        out["v2_uncached"] = _scores(await acall(fresh, "POST", "/v1/rerank", RERANK))
        return out

    out = asyncio.run(scenario())
    (v1_first, v1_again), (v2_first, v2_again) = out["v1"], out["v2"]
    assert v1_again == v1_first  # the repeat came from the cache: bit-identical
    assert out["v1_cache"]["score_cache"] == {
        "max_entries": 1000, "entries": 4, "lookups": 8, "hits": 4, "hit_rate": 0.5
    }  # fmt: skip
    assert out["v2_cache"]["digest"] != out["v1_cache"]["digest"]  # the same label, other weights: reloaded
    assert out["v2_cache"]["score_cache"]["lookups"] == 8 and out["v2_cache"]["score_cache"]["hits"] == 4
    assert max(abs(a - b) for a, b in zip(v1_first, v2_first, strict=True)) > 1e-3  # another model's scores
    assert v2_first == v2_again and v2_first == pytest.approx(out["v2_uncached"], abs=1e-6)  # none of v1's


def _info(response: tuple[int, Any, Any]) -> dict[str, Any]:
    return next(m for m in response[2]["models"] if m["task"] == "rerank")


@pytest.mark.usefixtures("outside_replica")
def test_fusion_and_chunking_through_the_real_in_process_model(app_config: AppConfig) -> None:
    """The routes fuse first-stage scores (either way of sending them) and score windows of long documents."""
    cfg = _config(app_config, cache=0)
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_chunks_per_request": 50})})
    long_doc = "Weather report: sunny and warm all week. " * 40 + "To reset your password, open Settings. " * 4
    docs = ["The weather is sunny today.", long_doc, "Password resets are done in Settings."]
    first_stage = [3.0, 1.0, 2.0]

    async def scenario() -> dict[str, Any]:
        ing = Ingress()
        await ing.reconfigure(cfg.model_dump(mode="json"))
        q = "how do I reset my password"

        async def rerank(path: str, **body: Any) -> tuple[int, Any, Any]:
            return await acall(ing, "POST", path, {"query": q, **body})

        objects = [{"text": d, "score": s} for d, s in zip(docs, first_stage, strict=True)]
        return {
            "plain": await rerank("/v1/rerank", documents=docs),
            "fused": await rerank("/v1/rerank", documents=docs, first_stage_scores=first_stage),
            "objects": await rerank("/v2/rerank", model="rerank-v3.5", documents=objects),
            "tei": await rerank("/rerank", texts=docs, first_stage_scores=first_stage),
            "chunked": await rerank("/v1/rerank", documents=docs, chunking=True),
            "too_many": await rerank("/v1/rerank", documents=[long_doc] * 30, chunking=True),
            "misaligned": await rerank("/v1/rerank", documents=docs, first_stage_scores=[1.0]),
        }

    out = asyncio.run(scenario())
    plain = _scores(out["plain"])
    fused_body = out["fused"][2]
    model = [r["model_score"] for r in sorted(fused_body["results"], key=lambda r: r["index"])]
    assert model == pytest.approx(plain, abs=1e-6)
    expected = fuse(plain, first_stage, cfg.model_for("rerank").fusion)
    assert _scores(out["fused"]) == pytest.approx(expected.tolist(), abs=1e-6)
    assert [r["relevance_score"] for r in out["objects"][2]["results"]] == pytest.approx(
        sorted(expected.tolist(), reverse=True), abs=1e-6
    )
    assert [r["score"] for r in out["tei"][2]] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)
    assert "model_score" not in out["plain"][2]["results"][0]
    assert out["plain"][2]["usage"]["chunks"] == 3 and out["plain"][2]["usage"]["truncated_inputs"] == 1
    chunked = out["chunked"][2]
    assert chunked["usage"]["chunks"] > 3 and chunked["usage"]["truncated_inputs"] == 0
    scores = _scores(out["chunked"])
    # the password sentence sits past the first 256 tokens: only windows see it
    assert scores[1] > plain[1] + 0.1 and scores[0] == pytest.approx(plain[0], abs=1e-6)
    assert out["too_many"][0] == 413 and out["too_many"][2]["error_type"] == "too_many_chunks"
    assert out["misaligned"][0] == 422 and "1 scores for 3 documents" in out["misaligned"][2]["message"]


@pytest.mark.parametrize(
    ("first_stage", "status"),
    [
        ([1e308, -1e308, 0.0], 200),  # finite but extreme: fused scores stay finite
        ([1, 2, 3], 200),  # integers are numbers
        (["1", 2, 3], 422),
        ([True, 2, 3], 422),
        ([1.0, 2.0], 422),
        (None, 200),
    ],
)
def test_first_stage_scores_are_validated(fake_ingress: Ingress, first_stage: Any, status: int) -> None:
    body: dict[str, Any] = {"query": "reset", "documents": ["a", "bb", "ccc"]}
    if first_stage is not None:
        body["first_stage_scores"] = first_stage
    got, _, answer = call(fake_ingress, "POST", "/v1/rerank", body)
    assert got == status, answer
    if status == 200:
        assert all(math.isfinite(r["relevance_score"]) for r in answer["results"])
    nan = b'{"query": "reset", "documents": ["a", "b"], "first_stage_scores": [NaN, 1]}'
    assert call(fake_ingress, "POST", "/v1/rerank", nan)[0] == 422


@pytest.fixture()
def fake_ingress() -> Ingress:
    from test_ingress import FakeHandle, shorter_is_better, top_labels

    ing = Ingress(FakeHandle(score_many=shorter_is_better), FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ing.reconfigure(cfg.model_dump(mode="json")))
    return ing


@pytest.mark.parametrize("chunking", [False, True])
def test_a_lone_surrogate_is_a_422_naming_the_input_with_or_without_windows(
    fake_ingress: Ingress, chunking: bool
) -> None:
    body = b'{"query": "reset", "documents": ["fine", "bad \\ud800 text"], "chunking": %s}' % (
        b"true" if chunking else b"false"
    )
    status, _, answer = call(fake_ingress, "POST", "/v1/rerank", body)
    assert status == 422 and answer["message"].startswith("input 1: not valid Unicode text"), answer


@pytest.mark.usefixtures("outside_replica")
def test_the_model_replica_holds_a_coalesced_call_to_its_earliest_start_by_time(app_config: AppConfig) -> None:
    """Under overload (``batching.overload_start_within_s``) one reply answers a coalesced call, so the model
    replica holds the call to its earliest request's start-by time: queued behind a long forward, the call is
    refused whole, uncomputed (``StartedLate``), before that forward ends, though its second request could have
    waited 10 s. A request already past its start-by time when its call arrives is refused there, while the
    rest of its call is computed; with no call held (no ingress under overload), the same request is computed,
    and so is one past its time by more than ``overload_late_refusal_s`` (its refusal would come as late as its
    answer)."""
    cfg = _config(app_config, cache=0)
    one_thread = {"kind": "onnxruntime", "intra_op_threads": 1, "parallel_forwards": 1}  # the long forward: ~1 s
    cfg = cfg.model_copy(
        update={
            "batching": cfg.batching.model_copy(update={"max_concurrent_batches": 1, "overload_late_refusal_s": 0.5}),
            "backend": cfg.backend.model_copy(update=one_thread),  # on any machine, GPU or many cores
        }
    )
    tok = TextEncoder(tokenizer_spec(cfg.model_for("rerank"), 256).tokenizer_path, 256)

    def rank_call(texts: list[str], start_by: float = math.inf, held: bool = False) -> RankCall:
        return RankCall(Sequences.pack(tok.encode(texts)), pairs=False, start_by=start_by, held=held)

    long_texts = ["a long document about the weather, the sea and the mountains " * 30] * 16  # 16 x 256 tokens
    short = ["how do I reset my password", "Open Settings, choose Reset."]

    async def scenario() -> tuple[list[Any], list[Any], list[Any] | StartedLate, list[str]]:
        ranker = Ranker()
        await ranker.reconfigure(cfg.task_serving("rerank").model_dump(mode="json"))
        order: list[str] = []

        async def tracked(name: str, calls: list[RankCall]) -> list[Any] | StartedLate:
            try:
                return await ranker.score_many(calls)
            except StartedLate as e:  # the call's one reply: the ingress refuses each of its requests
                return e
            finally:
                order.append(name)

        unheld = await ranker.score_many([rank_call(short, time.time() - 0.1)])
        now = time.time()
        receipt = await ranker.score_many(
            [
                rank_call(short, now - 0.1, held=True),
                rank_call(short, now + 10.0),
                rank_call(short, now - 1.0, held=True),
            ]
        )
        long = asyncio.create_task(tracked("long", [rank_call(long_texts)]))
        await asyncio.sleep(0.01)  # the long forward runs; the coalesced call queues behind it
        now = time.time()
        coalesced = tracked("coalesced", [rank_call(short, now + 0.02, held=True), rank_call(short, now + 10.0)])
        held_out, long_out = await asyncio.gather(coalesced, long)
        assert isinstance(long_out, list) and not isinstance(long_out[0], RuntimeError)
        return unheld, receipt, held_out, order

    unheld, receipt, coalesced, order = asyncio.run(scenario())
    assert not isinstance(unheld[0], RuntimeError) and unheld[0].values.shape == (1,)  # the query, one document
    assert unheld[0].timing.processor is Processor.CPU  # ONNX Runtime: the ingress keeps its long budget
    assert isinstance(receipt[0], StartedLate) and not isinstance(receipt[1], RuntimeError)
    assert receipt[1].values == pytest.approx(unheld[0].values, abs=1e-6)  # computed
    assert receipt[2].values == pytest.approx(unheld[0].values, abs=1e-6)  # 1 s past its time: computed too
    assert isinstance(coalesced, StartedLate)
    assert order.index("coalesced") < order.index("long")  # refused at its earliest time, not after the forward


@pytest.mark.usefixtures("outside_replica")
def test_the_model_replica_reads_a_calls_times_by_the_clock_of_the_node_that_sent_it(app_config: AppConfig) -> None:
    """An ingress on another node stamps its calls' deadlines and start-by times by its own clock, and says when
    each call left (``RankCall.sent_from``, ``sent_at``). The model replica reads them with that node's base
    (``core.peer_clocks``): from a node whose clock is 2 s behind, a request with 1 s to go is computed, where
    read as it is it had expired 1 s ago; a request truly past its start-by time (by its sender's clock) is
    still refused. From the replica's own node, or unstamped, the times are read as they are."""
    cfg = _config(app_config, cache=0)
    cfg = cfg.model_copy(update={"batching": cfg.batching.model_copy(update={"overload_late_refusal_s": 1.0})})
    tok = TextEncoder(tokenizer_spec(cfg.model_for("rerank"), 256).tokenizer_path, 256)
    short = ["how do I reset my password", "Open Settings, choose Reset."]

    def behind() -> float:  # the other node's clock
        return time.time() - 2.0

    def rank_call(
        node: str | None, deadline: float = math.inf, start_by: float = math.inf, held: bool = False
    ) -> RankCall:
        seqs = Sequences.pack(tok.encode(short))
        return RankCall(seqs, False, deadline=deadline, start_by=start_by, held=held, sent_from=node, sent_at=behind())

    async def scenario() -> dict[str, list[Any]]:
        ranker = Ranker()
        await ranker.reconfigure(cfg.task_serving("rerank").model_dump(mode="json"))
        own = ranker._node  # "" outside Ray
        late, in_time = behind() - 0.05, behind() + 10.0
        return {
            "other node": await ranker.score_many([rank_call("node-b", behind() + 1.0)]),
            "other node, late": await ranker.score_many(
                [rank_call("node-b", start_by=late, held=True), rank_call("node-b", start_by=in_time)]
            ),
            "own node": await ranker.score_many([rank_call(own, behind() + 1.0)]),
            "unstamped": await ranker.score_many([rank_call(None, behind() + 1.0)]),
            "info": [await ranker.info()],
        }

    out = asyncio.run(scenario())
    assert not isinstance(out["other node"][0], RuntimeError) and out["other node"][0].values.shape == (1,)
    late, in_time = out["other node, late"]
    assert isinstance(late, StartedLate) and not isinstance(in_time, RuntimeError)
    assert in_time.values == pytest.approx(out["other node"][0].values, abs=1e-6)
    assert isinstance(out["own node"][0], DeadlineExceeded) and isinstance(out["unstamped"][0], DeadlineExceeded)
    (version,) = out["info"][0]["versions"]
    assert version["ingress_clock_base_ms"]["node-b"] == pytest.approx(2000.0, abs=100.0)  # shown in /v1/models
