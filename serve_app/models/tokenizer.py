"""Fast (Rust) tokenization that truncates to the largest bucket and never pads (batching pads).

On a worker thread, a call is one ``encode_batch_fast``: the same ids as ``encode_batch`` without character
offsets, which nothing here reads (17 % less CPU on SciFact abstracts: 8.4 against 7.1 ms per 21-text
request, 2 cores), and it lets go of the GIL while Rust works, so the event loop runs meanwhile. On an event
loop's thread, a call is ``encode`` per text, which keeps the GIL: the loop waits for the call anyway, and
taking the GIL back from a busy thread took 4.4 ms (2 cores) to 5.2 ms (H100 node) for one short text.

A WordPiece tokenizer's ``BertNormalizer`` on an ASCII text only drops control characters and lowercases,
which Python does for a fraction of the Rust normalizer's cost (it tracks the alignment of every character):
ASCII texts go to a copy of the tokenizer without a normalizer (SciFact re-rank requests: 20 % less CPU,
6.7 against 5.4 ms per 21-text request on 2 cores; 15 % on an H100 node's cores).

With a chunk cache (``serve_app.models.chunk_cache``, the ingress's), a text is assembled from the remembered
ids of its whitespace-separated chunks, and only unknown chunks reach the tokenizer: 0.5 ms per such request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from serve_app.core.sequences import Encoded
from serve_app.models.chunk_cache import ChunkCache
from serve_app.ranking.chunks import ChunkMap, window_spans

# Tokenizer parts that decide each word on its own (no rule looks across a space): the first tokens of a text
# cut at a space are the first tokens of the whole text. WordPiece: BERT, MiniLM, E5, BGE, GTE.
_WORD_LOCAL = {
    "normalizer": {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"},
    "pre_tokenizer": {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"},
    "model": {"WordPiece"},
}
# A long text is tokenized from its head, cut at a space after this many characters per token of the truncation;
# a head that falls short is continued piece by piece, each sized for the tokens still missing at the wider
# ratio. SciFact abstracts average 4.4 characters per token: at 4.5, ~40 % need a second piece
HEAD_CHARS_PER_TOKEN = 4.5
MORE_CHARS_PER_TOKEN = 8
# clean_text on ASCII drops the control characters, except tab, newline and carriage return (whitespace)
_ASCII_CONTROLS = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])


def _word_local(spec: dict[str, object]) -> bool:
    def local(part: object, kinds: set[str]) -> bool:
        if part is None:
            return True
        if not isinstance(part, dict):
            return False
        if part.get("type") == "Sequence":
            inner = part.get("normalizers", part.get("pretokenizers"))
            return isinstance(inner, list) and all(local(p, kinds) for p in inner)
        return part.get("type") in kinds

    return all(local(spec.get(key), kinds) for key, kinds in _WORD_LOCAL.items())


def _ascii_normalizer(spec: dict[str, Any]) -> Callable[[str], str] | None:
    """What the tokenizer's normalizer does to an ASCII text, in Python, if it is a ``BertNormalizer``
    (``handle_chinese_chars`` and ``strip_accents`` change no ASCII character); else None."""
    norm = spec.get("normalizer")
    if not isinstance(norm, dict) or norm.get("type") != "BertNormalizer":
        return None
    clean, lower = bool(norm.get("clean_text")), bool(norm.get("lowercase"))
    if clean and lower:
        return lambda text: text.translate(_ASCII_CONTROLS).lower()
    if clean:
        return lambda text: text.translate(_ASCII_CONTROLS)
    return str.lower if lower else str


def _on_event_loop() -> bool:
    """Whether this thread runs an asyncio event loop (the ingress tokenizes short inputs there)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class TextEncoder:
    def __init__(self, tokenizer_path: Path, max_length: int, chunk_cache_entries: int = 0) -> None:
        """``chunk_cache_entries``: remember the tokens of this many whitespace-separated chunks of text
        (``ChunkCache``; 0: none), for a tokenizer where no rule looks across a space."""
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(tokenizer_path))
        # a text far longer than the truncation is tokenized from its head, piece by piece, until it overflows
        # (the tokenizer's cost is per character; SciFact re-rank requests, 2 cores: 4.9 ms of CPU, against 5.5
        # with the head cut at 6 characters a token and tokenized again whole where that fell short, 6.7 uncut)
        spec = json.loads(self._tok.to_str())
        self._cut_chars = int(max_length * HEAD_CHARS_PER_TOKEN) if _word_local(spec) else None
        # the packaged tokenizer.json pads every text to 128 tokens: 2.7x the work for short texts
        self._tok.no_padding()
        self._whole = Tokenizer.from_str(self._tok.to_str())  # for windows: the whole text, then sliced
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first")
        self._whole.no_truncation()
        # ASCII texts: the same tokenizer without its normalizer, fed Python's normalization of the text.
        # Added tokens ([CLS], [MASK]...) are matched before normalizing: a text holding one takes the Rust path.
        self._ascii_norm = _ascii_normalizer(spec)
        self._ascii_lowercases = bool((spec.get("normalizer") or {}).get("lowercase"))
        added = [str(t["content"]) for t in spec.get("added_tokens", [])]
        if any(not a.isprintable() for a in added):
            self._ascii_norm = None
        self._added_lower = [a.lower() for a in added]
        self._plain = Tokenizer.from_str(self._tok.to_str())
        self._plain.normalizer = None  # the Rust normalizer is skipped; ``_ascii`` does its work
        # what the post-processor puts around one text's tokens ([CLS] ... [SEP]), for texts built from pieces
        alone, bare = self._tok.encode("a"), self._tok.encode("a", add_special_tokens=False)
        lead = alone.ids.index(bare.ids[0])
        trail = lead + len(bare.ids)
        self._frame = (
            (np.asarray(alone.ids[:lead], np.int64), np.asarray(alone.ids[trail:], np.int64)),
            (np.asarray(alone.type_ids[:lead], np.int64), np.asarray(alone.type_ids[trail:], np.int64)),
            bare.type_ids[0],
        )
        self._max_content = max_length - len(alone.ids) + len(bare.ids)  # a text's own tokens that fit
        self._chunkable = self._cut_chars is not None and ChunkCache.supports(spec)
        self.chunk_cache: ChunkCache | None = None
        self.use_chunk_cache(chunk_cache_entries)

    def use_chunk_cache(self, max_entries: int) -> None:
        """Remember up to ``max_entries`` chunks from now on (0: forget them and tokenize every text)."""
        if max_entries <= 0 or not self._chunkable:
            self.chunk_cache = None
        elif self.chunk_cache is None:
            chunks = Tokenizer.from_str(self._whole.to_str())  # no padding, no truncation, its own normalizer
            self.chunk_cache = ChunkCache(chunks, self._frame, self._max_content, max_entries)
        else:
            self.chunk_cache.max_entries = max_entries

    def lookup(self, texts: Sequence[str]) -> list[Encoded] | None:
        """``encode(texts)`` if every chunk of every text is remembered, else None: no tokenizer runs, so an
        event loop's thread may call it."""
        return self.chunk_cache.lookup(texts) if self.chunk_cache is not None else None

    @staticmethod
    def _wrap(e: Encoding) -> Encoded:
        return Encoded(
            ids=np.asarray(e.ids, dtype=np.int64),
            type_ids=np.asarray(e.type_ids, dtype=np.int64),
            truncated=bool(e.overflowing),
        )

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Each text on its own, truncated to ``max_length``: from the chunk cache where there is one (its
        unknown chunks tokenized and remembered), else whole (``_encode_whole``)."""
        texts = list(texts)
        if self.chunk_cache is None:
            return self._encode_whole(texts)
        out = self.chunk_cache.encode(texts, batch=not _on_event_loop())
        left = [i for i, e in enumerate(out) if e is None]
        if left:  # texts the cache does not take: a character that joins words, a chunk too long to keep
            for i, e in zip(left, self._encode_whole([texts[i] for i in left]), strict=True):
                out[i] = e
        return out  # type: ignore[return-value]  # every None was replaced

    def _encode_whole(self, texts: list[str]) -> list[Encoded]:
        """A text of more than ``_cut_chars`` characters is tokenized up to a space near there: if its head
        alone overflows the truncation, its tokens are the whole text's (no rule of this tokenizer looks across
        a space); if not, the rest is tokenized in pieces cut at spaces, each sized for the tokens still
        missing, until the tokens overflow or the text ends."""
        heads = [self._head(t) for t in texts]
        encodings = self._encodings(heads)
        out = [self._wrap(e) for e in encodings]
        short = [
            i
            for i, (h, t, e) in enumerate(zip(heads, texts, encodings, strict=True))
            if h is not t and not e.overflowing
        ]
        if short:
            continued = self._continued(
                [texts[i] for i in short], [out[i] for i in short], [len(heads[i]) for i in short]
            )
            for i, seq in zip(short, continued, strict=True):
                out[i] = seq
        return out

    def _continued(self, texts: list[str], heads: list[Encoded], ends: list[int]) -> list[Encoded]:
        """``texts`` whose heads (``heads``, whole sequences that did not overflow; the first ``ends``
        characters) fell short of the truncation, continued piece by piece from where each head ended."""
        (lead, trail), (lead_types, trail_types), content_type = self._frame
        contents = [[h.ids[len(lead) : len(h.ids) - len(trail)]] for h in heads]
        counts = [len(c[0]) for c in contents]
        todo = list(range(len(texts)))
        while todo:
            pieces: list[str] = []
            for i in todo:
                start, text = ends[i], texts[i]
                limit = (self._max_content + 1 - counts[i]) * MORE_CHARS_PER_TOKEN
                end = len(text) if len(text) - start <= limit else text.rfind(" ", start + limit // 2, start + limit)
                ends[i] = len(text) if end < 0 else end
                pieces.append(text[start : ends[i]])
            for i, e in zip(todo, self._encodings(pieces, special_tokens=False), strict=True):
                contents[i].append(np.asarray(e.ids, dtype=np.int64))
                counts[i] += len(e.ids)
            todo = [i for i in todo if counts[i] <= self._max_content and ends[i] < len(texts[i])]
        out = []
        for parts, count in zip(contents, counts, strict=True):
            ids = np.concatenate(parts)[: self._max_content]
            out.append(
                Encoded(
                    ids=np.concatenate([lead, ids, trail]),
                    type_ids=np.concatenate([lead_types, np.full(len(ids), content_type, np.int64), trail_types]),
                    truncated=count > self._max_content,
                )
            )
        return out

    def _encodings(self, inputs: Sequence[str | tuple[str, str]], special_tokens: bool = True) -> list[Encoding]:
        """Texts or (text, pair) tuples, each on the ASCII path or the tokenizer's own, in input order;
        ``special_tokens`` false: a text's own tokens only (a piece of a longer text)."""
        plain: list[int] = []
        normalized: list[str | tuple[str, str]] = []
        own: list[int] = []
        for i, item in enumerate(inputs):
            fast = self._ascii(item) if isinstance(item, str) else self._ascii_pair(item)
            if fast is None:
                own.append(i)
            else:
                plain.append(i)
                normalized.append(fast)
        out: list[Encoding | None] = [None] * len(inputs)
        for idx, encodings in (
            (plain, self._call(self._plain, normalized, special_tokens)),
            (own, self._call(self._tok, [inputs[i] for i in own], special_tokens)),
        ):
            for i, e in zip(idx, encodings, strict=True):
                out[i] = e
        return out  # type: ignore[return-value]  # every index was filled above

    @staticmethod
    def _call(tok: Tokenizer, inputs: list[str | tuple[str, str]], special_tokens: bool = True) -> list[Encoding]:
        if not inputs:
            return []
        if _on_event_loop():  # keep the GIL: see the module's docstring
            return [
                tok.encode(x, add_special_tokens=special_tokens)
                if isinstance(x, str)
                else tok.encode(*x, add_special_tokens=special_tokens)
                for x in inputs
            ]
        return tok.encode_batch_fast(inputs, add_special_tokens=special_tokens)

    def _ascii(self, text: str) -> str | None:
        """``text`` normalized in Python, or None where the tokenizer's own normalizer must run."""
        if self._ascii_norm is None or not text.isascii():
            return None
        out = self._ascii_norm(text)
        low = out if self._ascii_lowercases else out.lower()  # added tokens are looked for in any case: a
        return None if any(a in low for a in self._added_lower) else out  # superset of where the tokenizer looks

    def _ascii_pair(self, pair: tuple[str, str]) -> tuple[str, str] | None:
        first, second = self._ascii(pair[0]), self._ascii(pair[1])
        return None if first is None or second is None else (first, second)

    def _head(self, text: str) -> str:
        limit = self._cut_chars
        if limit is None or len(text) <= limit:
            return text
        space = text.rfind(" ", limit // 2, limit)
        return text if space < 0 else text[:space]

    def encode_pairs(self, query: str, documents: Sequence[str]) -> list[Encoded]:
        return [self._wrap(e) for e in self._encodings([(query, d) for d in documents])]

    def encode_windows(
        self,
        documents: Sequence[str],
        overlap: int,
        max_windows: int,
        query: str | None = None,
        max_doc_tokens: int | None = None,
    ) -> tuple[list[Encoded], ChunkMap]:
        """Every document as overlapping windows of at most ``max_length`` tokens instead of one truncated
        sequence; with ``query``, each window is a (query, window) pair (a cross-encoder's input).

        The text is tokenized whole, then sliced, so each window carries the special tokens a sequence of
        its own would: ``[CLS] window [SEP]``, or ``[CLS] query [SEP] window [SEP]`` (the query cut to half
        the length if longer). A window's ``truncated`` is set only where the windows stop before the end
        (``max_windows``, or ``max_doc_tokens``, which cuts the document first as Cohere's field does).
        """
        if query is None:
            encodings = self._whole.encode_batch_fast(list(documents))
        else:
            encodings = self._whole.encode_batch_fast([(query, d) for d in documents])
        seqs: list[Encoded] = []
        owner: list[int] = []
        for doc, e in enumerate(encodings):
            ids = np.asarray(e.ids, dtype=np.int64)
            types = np.asarray(e.type_ids, dtype=np.int64)
            special = np.asarray(e.special_tokens_mask, dtype=bool)
            if query is None:
                head = _leading(special)
            else:  # the first segment: [CLS] query [SEP], with the query cut to half the length if longer
                head = int((types == types[0]).sum())
            tail = _trailing(special)
            prefix_ids, prefix_types = ids[:head], types[:head]
            if query is not None and head > self.max_length // 2:
                keep = self.max_length // 2
                prefix_ids = np.concatenate([ids[: keep - 1], ids[head - 1 : head]])
                prefix_types = types[:keep]
            content_ids, content_types = ids[head : len(ids) - tail], types[head : len(ids) - tail]
            cut = max_doc_tokens is not None and len(content_ids) > max_doc_tokens
            if cut:
                content_ids, content_types = content_ids[:max_doc_tokens], content_types[:max_doc_tokens]
            width = self.max_length - len(prefix_ids) - tail
            spans, short = window_spans(len(content_ids), width, min(overlap, width - 1), max_windows)
            for start, end in spans:
                seqs.append(
                    Encoded(
                        ids=np.concatenate([prefix_ids, content_ids[start:end], ids[len(ids) - tail :]]),
                        type_ids=np.concatenate([prefix_types, content_types[start:end], types[len(ids) - tail :]]),
                        truncated=cut or short,
                    )
                )
                owner.append(doc)
        return seqs, ChunkMap(np.asarray(owner, dtype=np.int64), len(encodings))


def _leading(mask: np.ndarray) -> int:
    return int(np.argmin(mask)) if not mask.all() else len(mask)


def _trailing(mask: np.ndarray) -> int:
    return int(np.argmin(mask[::-1])) if not mask.all() else 0


def cap_document_tokens(seqs: Sequence[Encoded], limit: int, pairs: bool) -> list[Encoded]:
    """At most ``limit`` document tokens per sequence, special tokens not counted (Cohere's
    ``max_tokens_per_doc``). A pair keeps its whole first segment (``[CLS] query [SEP]``, type id 0);
    a single text keeps its ``[CLS]``. The closing ``[SEP]`` stays."""
    out: list[Encoded] = []
    for e in seqs:
        first = int((e.type_ids == 0).sum()) if pairs else 1
        if len(e) - first - 1 <= limit:
            out.append(e)
            continue
        keep = first + limit
        out.append(
            Encoded(
                ids=np.concatenate([e.ids[:keep], e.ids[-1:]]),
                type_ids=np.concatenate([e.type_ids[:keep], e.type_ids[-1:]]),
                truncated=True,
            )
        )
    return out
