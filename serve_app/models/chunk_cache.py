"""Token ids of the whitespace-separated chunks of text, remembered, so a known chunk costs a dict lookup.

A WordPiece tokenizer (BERT, MiniLM, E5, BGE, GTE) decides each word on its own: no normalizer,
pre-tokenizer or model rule looks across whitespace. So a text's tokens are its chunks' tokens, chunk
after chunk (``"kinase,"`` is ``kinase`` ``,`` wherever it stands), and a chunk seen once need not be
tokenized again. Text repeats its words: after 2,591 SciFact abstracts, 90.6 % of the chunks of the other
2,592 were already known. A text whose chunks are all known is assembled by a ``bytes.join`` of their ids,
reading only as far as its truncation needs (SciFact re-rank requests of 21 whole abstracts, 2 cores: 0.5 ms,
against 5.1 ms in the Rust tokenizer); a text with unknown chunks has them tokenized by the tokenizer itself,
all of a call's at once.

The cache is bounded: past ``max_entries`` the oldest half is forgotten, and a chunk over ``MAX_CHUNK_CHARS``
is never remembered. It is one per ingress replica and tokenizer, shared by its threads (dict operations are
atomic under the GIL; learning takes a lock).
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from serve_app.core.sequences import Encoded

IDS = np.dtype(np.int32)  # a vocabulary's ids fit; what ``Sequences`` carries anyway
# longer chunks (a URL, base64, a long hyphenated run) are not remembered: a text holding one is tokenized whole.
# This bounds the cache's memory: at most ~600 bytes an entry (key, ids, dict slot), ~150 for English words
MAX_CHUNK_CHARS = 100
# a text is read in steps, each splitting off this many chunks per token still missing: ``split`` makes a string
# of every chunk it splits off and the lookup hashes it, so chunks past the truncation are pure cost. SciFact
# abstracts hold 0.64 chunks a token, paragraphs of English prose (licence texts) 0.80; 98.6 % of the abstracts
# are read in one step (97 % of those with more chunks than it reads). Against one chunk a token: a SciFact
# re-rank request of 21 whole abstracts took 0.46-0.52 ms of lookup instead of 0.70-0.71 (2 cores, best of 9
# passes over 300)
CHUNKS_PER_TOKEN = 0.8
# (lead ids, trail ids), (lead type ids, trail type ids), the type id of a text's own tokens
Frame = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], int]


def _split_points_that_join(tok: Tokenizer) -> str:
    """Characters Python's ``str.split()`` splits at but this tokenizer does not treat as a space between
    two words (the BERT normalizer drops control characters such as ``\\x0b`` or ``\\x1c``: ``a\\x1cb`` is
    one word there). Found by asking the tokenizer, for every character Python calls whitespace."""
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    apart = tok.encode("x y", add_special_tokens=False).ids
    return "".join(c for c in spaces if tok.encode(f"x{c}y", add_special_tokens=False).ids != apart)


class _Unknown(Exception):
    """A chunk of ``chunks`` is not remembered: the step of a text's reading that starts at character ``start``."""

    def __init__(self, chunks: list[str], start: int) -> None:
        super().__init__()
        self.chunks, self.start = chunks, start


class ChunkCache:
    """Single texts (no pairs), each ``[frame] tokens [frame]`` truncated to ``max_content`` of its own."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        frame: Frame,
        max_content: int,
        max_entries: int,
    ) -> None:
        """``tokenizer``: the model's, without padding or truncation (it tokenizes the unknown chunks);
        ``frame``: the special tokens the post-processor puts before and after a single text's own
        (``[CLS]``, ``[SEP]``), their type ids, and the type id of the text's own tokens."""
        self._tok = tokenizer
        (lead, trail), (lead_types, trail_types), self._content_type = frame
        self._lead, self._trail = np.asarray(lead, IDS).tobytes(), np.asarray(trail, IDS).tobytes()
        self._lead_types, self._trail_types = np.asarray(lead_types, IDS), np.asarray(trail_types, IDS)
        self._types: dict[int, np.ndarray] = {}  # ``_type_ids``
        self.max_content = max_content
        self.max_entries = max_entries
        self._ids: dict[str, bytes] = {}
        self._learning = threading.Lock()
        self._joiners = _split_points_that_join(tokenizer)
        self.hits = 0  # texts assembled from known chunks alone
        self.misses = 0  # texts with a chunk to tokenize

    @staticmethod
    def supports(spec: dict[str, Any]) -> bool:
        """Whether the tokenizer (its ``tokenizer.json``) has no added token holding whitespace: one is matched
        in the raw text, across chunks."""
        added = spec.get("added_tokens") or []
        return isinstance(added, list) and not any(any(ch.isspace() for ch in str(a["content"])) for a in added)

    def __len__(self) -> int:
        return len(self._ids)

    def _assemble(self, text: str) -> Encoded | None:
        """The text from its remembered chunks, read in steps: each splits off the chunks likely to hold the
        tokens still missing (``CHUNKS_PER_TOKEN``), until one token past ``max_content`` (``truncated``) or the
        text's end. None if a character ``split`` would wrongly split at lies where it was read; ``_Unknown``
        (the step's chunks) if a chunk there is not remembered."""
        known, joiners, limit = self._ids.__getitem__, self._joiners, self.max_content
        parts: list[bytes] = []
        count, rest, bound = 0, text, 0
        while True:
            # at least twice the last step's chunks: chunks of no token (lone accents) cannot make it crawl
            bound = max(int((limit + 1 - count) * CHUNKS_PER_TOKEN) + 1, 2 * bound)
            chunks = rest.split(None, bound)
            after = chunks.pop() if len(chunks) > bound else None
            end = len(rest) - len(after) if after is not None else len(rest)
            if any(rest.find(c, 0, end) >= 0 for c in joiners):  # a few: one ``find`` each beats a regex 3x
                return None
            try:
                part = b"".join(map(known, chunks))
            except KeyError:
                raise _Unknown(chunks, len(text) - len(rest)) from None
            parts.append(part)
            count += len(part) // IDS.itemsize
            if after is None or count > limit:
                break
            rest = after
        n = min(count, limit)
        content = parts[0] if len(parts) == 1 else b"".join(parts)
        ids = np.frombuffer(self._lead + content[: n * IDS.itemsize] + self._trail, IDS)
        return Encoded(ids=ids, type_ids=self._type_ids(n), truncated=count > limit)

    def _type_ids(self, n: int) -> np.ndarray:
        """The type ids of a text of ``n`` tokens of its own, framed: one read-only array per length, shared."""
        types = self._types.get(n)
        if types is None:
            types = np.concatenate([self._lead_types, np.full(n, self._content_type, IDS), self._trail_types])
            types.setflags(write=False)
            self._types[n] = types
        return types

    def lookup(self, texts: Sequence[str]) -> list[Encoded] | None:
        """Every text from known chunks, or None at the first that is not (nothing is tokenized here: cheap
        enough for an event loop's thread)."""
        out = []
        try:
            for text in texts:
                found = self._assemble(text)
                if found is None:
                    return None
                out.append(found)
        except _Unknown:
            return None
        self.hits += len(out)
        return out

    def encode(self, texts: Sequence[str], batch: bool = True) -> list[Encoded | None]:
        """Every text, its unknown chunks tokenized and remembered; None for a text the cache cannot take
        (a character ``split`` would wrongly split at, a chunk too long to remember), which the caller tokenizes
        whole. ``batch``: the unknown chunks in one call that lets go of the GIL (a worker thread); else one by
        one, keeping it (an event loop's thread, which would wait to take the GIL back from busy threads:
        ``serve_app.models.tokenizer``)."""
        out: list[Encoded | None] = [None] * len(texts)
        unknown: dict[int, _Unknown] = {}  # text -> the step of its reading that needs learning
        for i, text in enumerate(texts):
            try:
                out[i] = found = self._assemble(text)
            except _Unknown as e:
                unknown[i] = e
            else:
                self.hits += found is not None
        self.misses += len(unknown)
        while unknown:  # a text's later steps may hold unknown chunks of their own: learn, read again
            unknown = {i: e for i, e in unknown.items() if max(map(len, e.chunks)) <= MAX_CHUNK_CHARS}
            self._learn((c for e in unknown.values() for c in e.chunks), batch)
            learned, unknown = unknown, {}
            for i, step in learned.items():
                try:
                    out[i] = self._assemble(texts[i])
                except _Unknown as e:
                    if e.start > step.start:  # else its chunks were forgotten meanwhile: tokenized whole
                        unknown[i] = e
        return out

    def _learn(self, chunks: Iterable[str], batch: bool) -> None:
        """Tokenize the chunks not known yet and remember them."""
        known = self._ids
        new = list({c for c in chunks if c not in known and len(c) <= MAX_CHUNK_CHARS})
        if not new:
            return
        if batch:
            encodings = self._tok.encode_batch_fast(new, add_special_tokens=False)
        else:
            encodings = [self._tok.encode(c, add_special_tokens=False) for c in new]
        learned = {c: np.asarray(e.ids, IDS).tobytes() for c, e in zip(new, encodings, strict=True)}
        with self._learning:
            if len(known) + len(learned) > self.max_entries:  # forget the oldest half (dicts keep their order)
                for old in list(itertools.islice(known, max(len(known) // 2, len(learned)))):
                    del known[old]
            known.update(learned)

    def as_dict(self) -> dict[str, int]:
        return {"entries": len(self._ids), "max_entries": self.max_entries, "hits": self.hits, "misses": self.misses}
