"""Admission control: refuse at once a request that would wait longer than the budget, instead of
queueing it behind work the model cannot finish in time (so accepted requests stay fast).

The ingress keeps one per model: its queue is the padded tokens it has sent and not had answered, its
rate the padded tokens per second answered while busy; the expected wait of a new request is
queue / rate. The decision is taken before the request is tokenized, so a refusal costs almost
nothing. With several ingress replicas each sees its share of the queue and of the rate, so the
ratio still estimates the wait.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serve_app.core.backend import Overloaded


@dataclass
class Admission:
    max_queue_wait_s: float  # 0 disables admission control
    smoothing: float = 0.3  # weight of the newest rate sample
    queued_tokens: int = 0
    rate_tokens_per_s: float = 0.0  # 0 until the first batch finished: admit everything until then
    refused: int = 0
    min_sample_s: float = 0.05  # busy time a rate sample spans at least
    _last_done: float = field(default=0.0, repr=False)
    _busy_s: float = field(default=0.0, repr=False)
    _answered: int = field(default=0, repr=False)

    def expected_wait_s(self) -> float:
        if self.queued_tokens <= 0 or self.rate_tokens_per_s <= 0:
            return 0.0
        return self.queued_tokens / self.rate_tokens_per_s

    def check(self) -> None:
        """Raise ``Overloaded`` if a request arriving now would wait longer than the budget."""
        wait = self.expected_wait_s()
        if self.max_queue_wait_s > 0 and wait > self.max_queue_wait_s:
            self.refused += 1
            raise Overloaded(wait, self.max_queue_wait_s)

    def admit(self, cost: int) -> None:
        """An accepted request's ``cost`` padded tokens join the queue."""
        self.queued_tokens += cost

    def release(self, cost: int) -> None:
        """An accepted request has its answer, or failed, or its caller went away: it leaves the queue."""
        self.queued_tokens = max(0, self.queued_tokens - cost)

    def observe(self, cost: int, started: float, now: float | None = None) -> None:
        """A request of ``cost`` tokens sent at ``started`` (``time.monotonic``) has been answered.

        Answers come in bursts (a batch answers all its requests at once), so the rate is sampled over at
        least ``min_sample_s`` of busy time, never from the gap between two answers of one batch.
        """
        now = time.monotonic() if now is None else now
        # overlapping requests: count only the time since the previous answer
        self._busy_s += max(0.0, now - max(started, self._last_done))
        self._answered += cost
        self._last_done = now
        if self._busy_s >= self.min_sample_s and self._answered > 0:
            sample = self._answered / self._busy_s
            a = self.smoothing
            old = self.rate_tokens_per_s
            self.rate_tokens_per_s = sample if old == 0 else a * sample + (1 - a) * old
            self._busy_s, self._answered = 0.0, 0

    def as_dict(self) -> dict[str, float]:
        return {
            "max_queue_wait_ms": self.max_queue_wait_s * 1000,
            "refused": self.refused,
            "queued_tokens": self.queued_tokens,
            "rate_tokens_per_s": round(self.rate_tokens_per_s, 1),
            "expected_wait_ms": round(self.expected_wait_s() * 1000, 1),
        }
