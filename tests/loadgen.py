"""Closed-loop HTTP load for the failure tests: callers send requests back to back and every answer is kept."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Answer:
    sent_at: float  # time.monotonic()
    seconds: float
    status: int  # 0: no HTTP answer (connection error)
    error_type: str | None = None
    model_version: str | None = None  # X-Model-Version of a 200


@dataclass
class Load:
    answers: list[Answer] = field(default_factory=list)
    resent: int = 0  # requests a closed keep-alive connection dropped unanswered, sent again as HTTP clients do

    def statuses(self) -> dict[int, int]:
        return dict(Counter(a.status for a in self.answers))

    def failed(self) -> dict[int, int]:
        return {s: n for s, n in self.statuses().items() if s != 200}

    def longest_s(self, after: float = 0.0) -> float:
        return max((a.seconds for a in self.answers if a.sent_at + a.seconds >= after), default=0.0)

    def summary(self) -> str:
        kinds = dict(Counter(a.error_type for a in self.answers if a.status != 200))
        return (
            f"{len(self.answers)} requests, failed {kinds or 'none'}, longest {self.longest_s():.2f} s, "
            f"{self.resent} resent after a closed connection"
        )


async def closed_loop(
    url: str,
    path: str,
    body: dict[str, Any],
    callers: int,
    during: Callable[[], Awaitable[None]],
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Load:
    """``callers`` clients post ``body`` back to back while ``during()`` runs, then stop. A request that a closed
    keep-alive connection dropped unanswered is sent once more, as HTTP clients do (counted in ``resent``)."""
    load = Load()
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers) as client:

        async def caller() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                try:
                    try:
                        r = await client.post(path, json=body)
                    except httpx.RemoteProtocolError:  # the proxy closed a reused connection without answering
                        load.resent += 1
                        r = await client.post(path, json=body)
                    status = r.status_code
                    kind = r.json().get("error_type") if status != 200 and r.content.startswith(b"{") else None
                    version = r.headers.get("x-model-version")
                except httpx.HTTPError as e:
                    status, kind, version = 0, type(e).__name__, None
                load.answers.append(Answer(t0, time.monotonic() - t0, status, kind, version))

        tasks = [asyncio.create_task(caller()) for _ in range(callers)]
        try:
            await during()
        finally:
            done.set()
            await asyncio.gather(*tasks)
    return load
