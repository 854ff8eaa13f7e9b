"""The chunk cache (``serve_app/models/chunk_cache.py``): the tokenizer's own ids, from remembered chunks."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ingress import FakeHandle, acall, shorter_is_better, top_labels
from test_ranking import _ASCII_WORDS, _WORDS, _reference, _tokenizer_path
from tokenizers import Tokenizer

from serve_app.config import load_config
from serve_app.deployments.ingress import Ingress
from serve_app.models.chunk_cache import MAX_CHUNK_CHARS, _split_points_that_join
from serve_app.models.tokenizer import TextEncoder

# what Python's str.split() splits at, some of which the BERT normalizer drops instead (\x0b, \x1c, \x85: the
# words either side are one word), lone accents that normalize to nothing (a chunk of no token), and words
SEPARATORS = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x1c", "\x85", "\xa0", "\u2028", "\u3000"])
CHUNK_WORDS = st.one_of(_WORDS, _ASCII_WORDS, st.sampled_from(["\u0301", "é", "e\u0301", "İstanbul", "ǅ", "ß"]))
JOINERS = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"  # Python splits at them; BERT drops them
CHUNK_TEXTS = st.lists(st.tuples(CHUNK_WORDS, SEPARATORS), max_size=120).map(
    lambda parts: "".join(w + s for w, s in parts)
)


@functools.cache
def _cached_encoder(max_length: int, entries: int = 1 << 16) -> TextEncoder:
    return TextEncoder(_tokenizer_path(), max_length, chunk_cache_entries=entries)


def _same(got: Any, reference: Tokenizer, texts: list[str]) -> None:
    for g, e in zip(got, reference.encode_batch(texts), strict=True):
        assert g.ids.tolist() == e.ids and g.type_ids.tolist() == e.type_ids
        assert g.truncated == bool(e.overflowing)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(CHUNK_TEXTS, min_size=1, max_size=4))
def test_texts_from_remembered_chunks_give_the_tokenizers_own_ids(texts: list[str]) -> None:
    """Learned on first sight, looked up after: the same ids, type ids and ``truncated`` as the tokenizer's
    own, at a truncation (24) that texts cross, fall short of, or reach only with chunks of no token."""
    enc = _cached_encoder(24)
    reference = _reference(_tokenizer_path(), 24)
    _same(enc.encode(texts), reference, texts)
    found = enc.lookup(texts)
    joined = any(c in t for t in texts for c in JOINERS)  # the cache does not take these texts
    if not joined and all(len(c) <= MAX_CHUNK_CHARS for t in texts for c in t.split()):
        assert found is not None
    if found is not None:
        _same(found, reference, texts)
    _same(enc.encode(texts), reference, texts)  # again, from the cache


def test_chunks_of_no_token_past_the_first_split_continue_into_the_rest() -> None:
    """``split`` stops after ``max_content`` chunks, which hold that many tokens unless some hold none (a lone
    accent): then the rest of the text is read too, and ``truncated`` is still exact."""
    enc, reference = _cached_encoder(24), _reference(_tokenizer_path(), 24)
    texts = [
        " ".join(["\u0301"] * 30 + ["cell"] * 22),  # 22 tokens: fits exactly
        " ".join(["\u0301"] * 30 + ["cell"] * 23),  # one past: truncated
        " ".join(["cell"] * 22 + ["\u0301"] * 5),  # 22 chunks and accents after: not truncated
        " ".join(["cell"] * 23),
        "",
        "   ",
    ]
    for _ in range(2):  # learned, then looked up
        got = enc.encode(texts)
        _same(got, reference, texts)
        assert [g.truncated for g in got] == [False, True, False, True, False, False]
    _same(enc.lookup(texts), reference, texts)


def test_a_chunk_too_long_to_remember_sends_its_text_to_the_tokenizer_whole() -> None:
    """A chunk over ``MAX_CHUNK_CHARS`` (a URL, base64) is not remembered, in the head or in the rest read after
    chunks of no token: its text is tokenized whole, with the same ids, and the cache does not grow by it."""
    enc, reference = _cached_encoder(24), _reference(_tokenizer_path(), 24)
    cache = enc.chunk_cache
    assert cache is not None
    long = "y" * (MAX_CHUNK_CHARS + 1)
    texts = [f"see {long} here", " ".join(["\u0301"] * 30 + [long] + ["cell"] * 5)]
    for _ in range(2):
        _same(enc.encode(texts), reference, texts)
        assert enc.lookup(texts) is None and long not in cache._ids


def test_only_the_part_of_a_text_its_tokens_come_from_is_read() -> None:
    """A character that joins words, or a chunk too long to remember, past the chunks that fill the truncation
    does not send the text to the tokenizer: it is looked up, with the tokenizer's ids and ``truncated``. The
    same inside that part does."""
    enc, reference = _cached_encoder(24), _reference(_tokenizer_path(), 24)
    cells = " ".join(["cell"] * 150)  # 150 tokens, 22 of them fill the truncation
    past = [f"{cells} a\x1cb", f"{cells} {'y' * (MAX_CHUNK_CHARS + 1)}"]
    inside = [f"cell a\x1cb {cells}", f"cell {'y' * (MAX_CHUNK_CHARS + 1)} {cells}"]
    _same(enc.encode(past + inside), reference, past + inside)
    found = enc.lookup(past)
    assert found is not None and all(e.truncated for e in found)
    _same(found, reference, past)
    assert enc.lookup(inside[:1]) is None and enc.lookup(inside[1:]) is None


def test_the_characters_split_at_that_join_words_are_found_by_asking_the_tokenizer() -> None:
    """For the BERT normalizer: the control characters Python calls whitespace (dropped, not a space)."""
    tok = Tokenizer.from_file(str(_tokenizer_path()))
    assert _split_points_that_join(tok) == JOINERS


def test_the_cache_is_bounded_and_forgets_its_oldest_chunks() -> None:
    enc = TextEncoder(_tokenizer_path(), 64, chunk_cache_entries=40)
    cache = enc.chunk_cache
    assert cache is not None
    reference = _reference(_tokenizer_path(), 64)
    first = "alpha beta gamma delta"
    enc.encode([first])
    for i in range(20):
        texts = [" ".join(f"w{i}x{j}" for j in range(10))]
        _same(enc.encode(texts), reference, texts)
        assert len(cache) <= 40
    assert enc.lookup([first]) is None  # forgotten: learned first
    _same(enc.encode([first]), reference, [first])
    enc.use_chunk_cache(0)
    assert enc.chunk_cache is None and enc.lookup([first]) is None


def test_a_text_of_more_chunks_than_the_cache_holds_gets_the_tokenizers_ids() -> None:
    """Its reading takes two steps (its first 205 chunks are accents, of no token), and learning the second's
    chunks forgets the first's: the text is tokenized whole rather than learned again and again."""
    accents = [chr(0x300 + a) + chr(0x300 + b) for a in range(15) for b in range(15)][:205]
    texts = [" ".join([*accents, *(f"w{i}x{j}" for j in range(60))]) for i in range(2)]
    enc = TextEncoder(_tokenizer_path(), 256, chunk_cache_entries=40)
    reference = _reference(_tokenizer_path(), 256)
    for _ in range(2):
        _same(enc.encode(texts), reference, texts)


def test_no_cache_for_a_tokenizer_that_looks_across_spaces_or_an_added_token_with_a_space(tmp_path: Path) -> None:
    import json

    data = json.loads(_tokenizer_path().read_text())
    spaced = {
        **data,
        "added_tokens": [*data["added_tokens"], {**data["added_tokens"][-1], "id": 30522, "content": "a b"}],
    }
    (tmp_path / "spaced.json").write_text(json.dumps(spaced))
    metaspace = {**data, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}}
    (tmp_path / "metaspace.json").write_text(json.dumps(metaspace))
    assert TextEncoder(_tokenizer_path(), 24, chunk_cache_entries=10).chunk_cache is not None
    assert TextEncoder(tmp_path / "spaced.json", 24, chunk_cache_entries=10).chunk_cache is None
    assert TextEncoder(tmp_path / "metaspace.json", 24, chunk_cache_entries=10).chunk_cache is None


class _Recording:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.calls = tok, list[str]()

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.tok, name)


def test_known_chunks_need_no_tokenizer_and_unknown_ones_are_tokenized_per_thread_kind() -> None:
    """On a worker thread the unknown chunks go to the tokenizer in one call that lets go of the GIL; on an
    event loop one by one, keeping it; once known, neither ``lookup`` nor ``encode`` calls the tokenizer."""
    enc = TextEncoder(_tokenizer_path(), 64, chunk_cache_entries=1000)
    cache = enc.chunk_cache
    assert cache is not None
    rec = _Recording(cache._tok)
    cache._tok = rec  # type: ignore[assignment]
    texts = ["the cell cycle", "naïve T cells"]
    assert enc.lookup(texts) is None and rec.calls == []
    threaded = [e.ids.tolist() for e in enc.encode(texts)]
    assert rec.calls == ["encode_batch_fast"]
    rec.calls.clear()

    async def on_loop() -> list[list[int]]:
        return [e.ids.tolist() for e in enc.encode(["cell cycle arrest", "T cells"])]

    asyncio.run(on_loop())
    assert rec.calls == ["encode"]  # "arrest" only
    rec.calls.clear()
    found = enc.lookup(texts)
    assert found is not None and [e.ids.tolist() for e in found] == threaded and rec.calls == []
    assert cache.as_dict()["hits"] >= 2 and cache.as_dict()["misses"] == 3


def test_real_texts_from_the_cache_give_the_packaged_tokenizers_ids(shared_data: Path) -> None:
    """SciFact abstracts (a quarter are not ASCII: Greek letters, dashes) and CLINC150 utterances."""
    from serve_app.evaluation.data import load_clinc150, load_scifact

    sf = load_scifact(shared_data, top_k=20)
    abstracts = [sf.corpus[d] for q in sorted(sf.candidates)[:40] for d in sf.candidates[q]]
    utterances = [t for t, _ in load_clinc150(shared_data)["val"][:2000]]
    enc = TextEncoder(_tokenizer_path(), 256, chunk_cache_entries=1 << 17)
    reference = _reference(_tokenizer_path(), 256)
    for texts in (abstracts, utterances):
        _same(enc.encode(texts), reference, texts)
        _same(enc.lookup(texts), reference, texts)
    assert not all(t.isascii() for t in abstracts)


def test_a_repeated_request_is_tokenized_from_the_cache_on_the_event_loop() -> None:
    """A re-rank past the event loop's inline limit is tokenized on a worker thread the first time (its
    unknown chunks in one call) and looked up on the event loop the next (no tokenizer call): the same
    sequences reach the model."""
    docs = [" ".join(f"document {i} on the cell cycle, part {j}." for j in range(40)) for i in range(6)]
    body = {"query": "what arrests the cell cycle?", "documents": docs}
    ranker = FakeHandle(score_many=shorter_is_better)
    ingress = Ingress(ranker, FakeHandle(classify_many=top_labels))  # type: ignore[arg-type]
    cfg = load_config().model_copy(update={"model_placement": "deployments"})
    asyncio.run(ingress.reconfigure(cfg.model_dump(mode="json")))
    spec = next(s for s in ingress._path.versions.specs.values() if s.model.task == "rerank")
    cache = spec.encoder.chunk_cache
    assert cache is not None
    rec = _Recording(cache._tok)
    cache._tok = rec  # type: ignore[assignment]

    async def once() -> tuple[int, dict[str, str], Any]:
        return await acall(ingress, "POST", "/v1/rerank", body)

    s1, _, b1 = asyncio.run(once())
    assert s1 == 200 and rec.calls and set(rec.calls) == {"encode_batch_fast"}  # on threads, not the loop
    assert cache.as_dict()["misses"] == 7  # the query and the six documents: each has a chunk of its own
    rec.calls.clear()
    s2, _, b2 = asyncio.run(once())
    assert s2 == 200 and b2["results"] == b1["results"] and rec.calls == [] and cache.as_dict()["hits"] == 7
    first, second = (c[0][0].seqs for c in ranker.calls)
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.offsets, second.offsets)
