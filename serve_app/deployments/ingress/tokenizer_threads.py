"""Where the ingress tokenizes: short inputs on the event loop, long ones on this replica's worker threads.

The Rust tokenizer releases the GIL, so a few threads tokenize in parallel; a lone long request is split
over the threads that are idle rather than tokenized on one core while the others wait. The threads' rate
(characters per second while busy) is measured for the door's wait estimate (``Door.tokenizer``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from serve_app.api import errors
from serve_app.batching.admission import Admission
from serve_app.core.sequences import Encoded
from serve_app.deployments.ingress.trace import Trace

T = TypeVar("T")
INLINE_TOKENIZE_CHARS = 2_000  # below this a request is tokenized on the event loop; a thread hop costs more
# up to this, a request is first looked up in the chunk cache on the event loop (~20 us of CPU per 1,000 characters)
LOOKUP_ON_LOOP_CHARS = 100_000


class TokenizerThreads:
    """``threads`` worker threads of this replica's own, fed in characters."""

    def __init__(self, queue: Admission, measured: Callable[[Trace, int], None]) -> None:
        self._queue = queue  # the door's view of these threads: their rate is observed here
        self._measured = measured  # a request's text is parsed: its length in characters is known
        self._pool: ThreadPoolExecutor | None = None
        self.threads = 0
        self._busy = 0  # requests (or parts) on the threads or queued for them

    def resize(self, threads: int) -> None:
        """The tokenizers library's own thread pool is turned off: on an H100 node's 16 cores, 4 ingress
        replicas tokenized 13 % fewer requests per second with it, its threads spinning on cores the other
        requests needed (``scripts/results``)."""
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the library at each call
        if self._pool is None or self.threads != threads:
            old, self._pool = self._pool, ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
            self.threads = threads
            if old is not None:
                old.shutdown(wait=False)  # its queued requests still run

    async def run(
        self, texts: list[str], query: str | None, tokenize: Callable[[], T], trace: Trace, pairs: bool = False
    ) -> T:
        """``tokenize`` (over ``texts`` and ``query``) on the event loop if short, else on a thread. With
        ``pairs`` the tokenizer reads the query once per text, (query, text) by (query, text)."""
        chars = text_chars(texts, len(query or "")) if pairs else text_chars(texts) + len(query or "")
        self._measured(trace, chars)
        started = time.perf_counter()
        try:
            return await _named_errors(texts, query, self._on_threads(chars, tokenize))
        finally:
            trace.timing.tokenize_s += time.perf_counter() - started

    async def encode(
        self,
        texts: list[str],
        query: str | None,
        encode: Callable[[list[str]], list[Encoded]],
        trace: Trace,
        pair_query: str | None = None,
        lookup: Callable[[list[str]], list[Encoded] | None] | None = None,
    ) -> list[Encoded]:
        """``encode`` over ``texts`` (with ``query`` first, if given), split over the threads that are idle;
        whole when busy. ``pair_query``: a cross-encoder's query, which ``encode`` pairs with each text: its
        characters count once per text. ``lookup``: the same sequences from remembered chunks if all are known
        (``TextEncoder``), cheap enough to try on the event loop first: no thread hop, no tokenizer."""
        whole = texts if query is None else [query, *texts]
        per_text = len(pair_query or "")
        chars = text_chars(whole, per_text)
        self._measured(trace, chars)
        started = time.perf_counter()
        try:
            found = lookup(whole) if lookup is not None and chars <= LOOKUP_ON_LOOP_CHARS else None
            if found is not None:
                return found
            return await _named_errors(texts, query, self._split(whole, encode, per_text))
        finally:
            trace.timing.tokenize_s += time.perf_counter() - started

    async def _on_threads(self, chars: int, tokenize: Callable[[], T]) -> T:
        if chars <= INLINE_TOKENIZE_CHARS:
            return tokenize()
        return await self._pooled(chars, tokenize)

    async def _split(
        self, texts: list[str], encode: Callable[[list[str]], list[Encoded]], per_text: int = 0
    ) -> list[Encoded]:
        chars = text_chars(texts, per_text)
        parts = min(self.threads - self._busy, len(texts))
        if chars <= INLINE_TOKENIZE_CHARS or parts <= 1:
            return await self._on_threads(chars, lambda: encode(texts))
        bounds = np.linspace(0, len(texts), parts + 1).astype(int).tolist()
        pieces = [texts[a:b] for a, b in itertools.pairwise(bounds)]
        done = await asyncio.gather(
            *(self._pooled(text_chars(piece, per_text), functools.partial(encode, piece)) for piece in pieces)
        )
        return [e for part in done for e in part]

    async def _pooled(self, chars: int, work: Callable[[], T]) -> T:
        """``work`` on a thread. Its request was admitted at the door; here the threads' rate is measured
        (characters per second while busy), which the door's wait estimate divides by."""
        started = time.monotonic()
        self._busy += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            self._busy -= 1
        self._queue.observe(chars, started)
        return result


async def _named_errors(texts: list[str], query: str | None, tokenizing: Awaitable[T]) -> T:
    """Text that is not valid Unicode is a 422 naming it (the Rust tokenizer takes only text that encodes
    to UTF-8: not a lone surrogate)."""
    try:
        return await tokenizing
    except TypeError:
        bad = next((i for i, t in enumerate([query or "", *texts]) if not _utf8(t)), None)
        if bad is None:
            raise
        what = "query" if bad == 0 else f"input {bad - 1}"
        raise errors.ApiError(
            422, "validation_error", f"{what}: not valid Unicode text (a lone surrogate \\ud800-\\udfff)"
        ) from None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_chars(texts: list[str], per_text: int = 0) -> int:
    """Characters the tokenizer reads for ``texts``, each with ``per_text`` more (a cross-encoder's query)."""
    return sum(len(t) for t in texts) + per_text * len(texts)
