"""CPU tokenizer deployment: batches whole requests into one Rust ``encode_batch`` call per model."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ray import serve

from serve_app.batching.buckets import Encoded
from serve_app.config import AppConfig
from serve_app.models.artifacts import tokenizer_spec
from serve_app.models.tokenizer import TextEncoder


@dataclass(frozen=True)
class TokenizeJob:
    model: str  # "ranker" | "intent"
    texts: list[str]
    query: str | None = None  # set for cross-encoders: every text is paired with it


class Tokenizer:
    def __init__(self) -> None:
        self._encoders: dict[str, TextEncoder] = {}
        self._pairs: dict[str, bool] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(user_config)
        largest = cfg.batching.buckets[-1]
        for role in ("ranker", "intent"):
            spec = tokenizer_spec(getattr(cfg, role), largest)
            self._encoders[role] = TextEncoder(spec.tokenizer_path, spec.max_length)
            self._pairs[role] = spec.pairs
        self.encode.set_max_batch_size(cfg.tokenizer.max_batch_size)  # type: ignore[attr-defined]
        self.encode.set_batch_wait_timeout_s(cfg.tokenizer.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def needs_pairs(self, role: str) -> bool:
        return self._pairs[role]

    def _run(self, jobs: list[TokenizeJob]) -> list[list[Encoded]]:
        results: list[list[Encoded]] = [[] for _ in jobs]
        singles: dict[str, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.query is not None:
                results[i] = self._encoders[job.model].encode_pairs(job.query, job.texts)
            else:
                singles[job.model].append(i)
        for role, idx in singles.items():
            flat = [t for i in idx for t in jobs[i].texts]
            encoded = self._encoders[role].encode(flat)
            start = 0
            for i in idx:
                n = len(jobs[i].texts)
                results[i] = encoded[start : start + n]
                start += n
        return results

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def encode(self, jobs: list[TokenizeJob]) -> list[list[Encoded]]:
        return await asyncio.to_thread(self._run, jobs)
