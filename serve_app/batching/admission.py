"""Admission control: refuse at once a request that would wait longer than the budget, instead of
queueing it behind work the model cannot finish in time (so accepted requests stay fast).

The ingress keeps one per model: its queue is the padded tokens it has sent and not had answered, its
rate the padded tokens per second answered while busy; the expected wait of a new request is
queue / rate. ``check`` runs before the request is tokenized, so most refusals cost almost nothing;
``admit`` checks again as it enqueues (nothing awaits in between), so requests that passed ``check``
together while the queue was empty cannot all get in. With several ingress replicas each sees its
share of the queue and of the rate, so the ratio still estimates the wait.

Two budgets. ``max_queue_wait_s`` holds a closed population of callers: 64 callers at fixed concurrency keep
about their own number of requests queued (on an H100 node 70-90 ms of re-ranking), and refusing them costs
each a Retry-After. Under sustained overload (open-loop arrivals above capacity) the queue sits at its budget
whatever it is, so that budget is only added latency: accepted requests waited up to 100 ms at 4x load. While
the refused demand of the last fraction of a second is at least ``overload_refused_ratio`` of the admitted,
the budget is ``overload_queue_wait_s`` instead; a closed population, refused a few per cent, never gets
there. (Facebook's queue "controlled delay" shortens the budget when the queue has not been empty for a
while; a closed population at saturation never empties it either, and lost 32-41 % of its throughput to a
30 ms budget.) Off unless configured: on an H100 node at 4x, 30 ms cut the accepted p50 from 95-97 to 37-38
ms but accepted 25-49 % fewer requests (``scripts/results/h100-2026-11-24-overload-budget/``).

The estimate bounds the mean wait, not the tail. ``overload_start_within_s`` (opt-in) bounds that too while
refusing in earnest: an admitted request must start computing within it of its arrival, or it is refused then
(``holds_start_by``; the ingress's call slots and the model replica hold requests to it), counted here as a
refusal (``refuse(..., started_late=True)``). Only until ``overload_late_refusal_s`` past that time: one held
to it only later (admitted before the overload was seen) is computed, not refused that late.

The short budget carries less than the long one: its shallow queue makes smaller calls and batches. So the
refusals it adds must not keep it in force when the demand is within what the long budget carried. The overload
is judged only while the demand (admitted + refused) is also at least ``1 + overload_refused_ratio`` times the
admissions the long budget carried lately (``_carried``, held while the overload lasts). Without that, classify
on H100 nodes at 1.0-1.3x its capacity fell into the mode on a burst of refusals and stayed there, answering
900-4,400 of 5,000-8,200 req/s offered in 19 of 57 points; as shipped it answered 83-100 % in all 21, and with
this rule 78-98 % in all 9 (``scripts/results/h100-2026-11-26-collapse/``).

Both overload budgets are sized for a GPU's batches. On a GPU node whose models fell back to ONNX Runtime, one
call takes longer than 20 ms: there the mode answered 16-21 % below the c=64 rate, its accepted p99 was 87-154 ms
and its refusals took up to 64 ms (``scripts/results/h100-2026-11-26-cpu-answers/``). So they hold only while the
model answers from a GPU: an answer computed on the CPU turns them off until the answers come from a GPU again,
for ``cpu_answer_hold_s`` at least (``computed_on``); the long budget alone applies meanwhile.

``Retry-After`` follows the overload: refused ÷ admitted requests over the last seconds is how many
seconds of capacity the refused callers stand for, so that is when they should come back (at least
1 s, at most ``max_retry_after_s``). A fixed 1 s let 64 closed-loop callers retry 60 times a second
against a re-ranker that admits 7, and answering those refusals cost 14 % of its throughput.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NoReturn

from serve_app.core.backend import Overloaded
from serve_app.core.durations import count_over, zero_counts
from serve_app.core.timing import Processor

ARRIVAL_SMOOTHING = 0.02  # weight of the newest request in the recent wait before the ingress


@dataclass
class Admission:
    max_queue_wait_s: float  # 0 disables admission control
    overload_queue_wait_s: float = 0.0  # the budget while refusing in earnest; 0: max_queue_wait_s throughout
    overload_start_within_s: float = 0.0  # ... and how soon after arriving an admitted request must start; 0: off
    overload_refused_ratio: float = 0.5  # refused : admitted (over overload_window_s) at which that begins
    overload_min_refused: float = 8.0  # and at least this many refused (decayed count): not one early refusal
    overload_window_s: float = 0.25  # time constant of those counts: an overload is seen within a fraction of it
    smoothing: float = 0.3  # weight of the newest rate sample
    queued_tokens: int = 0
    rate_tokens_per_s: float = 0.0  # 0 until the first batch finished: admit everything until then
    refused: int = 0
    min_sample_s: float = 0.05  # busy time a rate sample spans at least
    _last_done: float = field(default=0.0, repr=False)
    _busy_s: float = field(default=0.0, repr=False)
    _answered: int = field(default=0, repr=False)
    max_retry_after_s: int = 10
    demand_window_s: float = 2.0  # time constant of the admitted / refused rates behind Retry-After
    _recent_admitted: float = field(default=0.0, repr=False)
    _recent_refused: float = field(default=0.0, repr=False)
    _recent_at: float = field(default=0.0, repr=False)
    _fast_admitted: float = field(default=0.0, repr=False)
    _fast_refused: float = field(default=0.0, repr=False)
    # the most admitted (a decayed count, as ``_fast_admitted``) while not judged overloaded, forgotten over
    # ``carried_window_s`` then and held while it is: what the long budget carried
    _carried: float = field(default=0.0, repr=False)
    carried_window_s: float = 5.0
    # requests admitted or refused here, and the time they had waited before the ingress's handler ran
    # (HAProxy's stamp: ``Door.admit``), which the budget covers too
    arrivals: int = 0
    arrival_wait_s_total: float = 0.0
    arrival_wait_max_s: float = 0.0
    arrival_wait_recent_s: float = 0.0  # moving average over about the last 1 / ARRIVAL_SMOOTHING requests
    arrivals_over: dict[int, int] = field(default_factory=zero_counts)  # waits of 20, 50, 100 ms or more
    # the overload budgets are off while the model's latest computed answer came from a CPU, and until
    # ``_on_cpu_until`` (``time.monotonic()``) after any did: a replica on the CPU among others on GPUs
    cpu_answer_hold_s: float = 10.0
    _last_on_cpu: bool = field(default=False, repr=False)
    _on_cpu_until: float = field(default=0.0, repr=False)

    def expected_wait_s(self) -> float:
        if self.queued_tokens <= 0 or self.rate_tokens_per_s <= 0:
            return 0.0
        return self.queued_tokens / self.rate_tokens_per_s

    def overloaded(self) -> bool:
        """Refusing in earnest: the refused demand is at least ``overload_refused_ratio`` of the admitted, over
        ``overload_window_s`` (Retry-After's 2 s would leave the long budget for the first second of an
        overload). Both counts decay alike, so their ratio needs no update to the present. And the demand must
        exceed what the long budget carried by as much (``_carried``): the short budget's own refusals do not
        count as an overload."""
        refused, ratio = self._fast_refused, self.overload_refused_ratio
        return (
            refused >= self.overload_min_refused
            and refused >= ratio * self._fast_admitted
            and refused + self._fast_admitted >= (1 + ratio) * self._carried  # beyond what the long budget carried
        )

    def judges_overload(self) -> bool:
        """Whether the overload budgets apply (and anything reads ``overloaded``, whose counts cost a little per
        request): configured, and the model has not answered from a CPU lately (``computed_on``)."""
        configured = self.overload_queue_wait_s > 0 or self.overload_start_within_s > 0
        if not configured or self._last_on_cpu:
            return False
        return self._on_cpu_until == 0.0 or time.monotonic() >= self._on_cpu_until

    def computed_on(self, processor: Processor | None, now: float | None = None) -> None:
        """The model answered a request, computed on ``processor`` (None: not reported, as an answer from its
        cache). The overload budgets are off while the latest answer came from the CPU (an idle spell does not
        turn them on again), and for ``cpu_answer_hold_s`` after any did: a replica that fell back to ONNX
        Runtime keeps them off however many others answer from a GPU."""
        if processor is None:
            return
        self._last_on_cpu = processor is Processor.CPU
        if self._last_on_cpu:
            self._on_cpu_until = (time.monotonic() if now is None else now) + self.cpu_answer_hold_s

    def holds_start_by(self) -> bool:
        """Whether requests are held to start within ``overload_start_within_s`` of arriving now: only while
        refusing in earnest (a closed population at saturation keeps its whole queue)."""
        return self.overload_start_within_s > 0 and self.judges_overload() and self.overloaded()

    def budget_s(self) -> float:
        """The queueing time a request may be expected to wait now (0: admission control is off)."""
        if self.overload_queue_wait_s > 0 and self.judges_overload() and self.overloaded():
            return min(self.max_queue_wait_s, self.overload_queue_wait_s)
        return self.max_queue_wait_s

    def over_budget(self, wait_s: float) -> bool:
        budget = self.budget_s()
        return budget > 0 and wait_s > budget

    def check(self) -> None:
        """Raise ``Overloaded`` if a request arriving now would wait longer than the budget."""
        wait = self.expected_wait_s()
        if self.over_budget(wait):
            self.refuse(wait)

    def refuse(self, wait_s: float, budget_s: float | None = None, started_late: bool = False) -> NoReturn:
        """Count a refusal and raise it: a request expected to wait ``wait_s`` (here, or here and elsewhere)
        against ``budget_s`` (by default this queue's); ``started_late``: an admitted request that had waited
        ``wait_s`` without starting, against ``overload_start_within_s``."""
        if started_late:
            budget = self.overload_start_within_s
        else:
            budget = self.budget_s() if budget_s is None else budget_s
        self.refused += 1
        self._count(refused=1.0)
        raise Overloaded(wait_s, budget, self.retry_after_s(), started_late)

    def admit(self, cost: int) -> None:
        """Check again, then the request's ``cost`` padded tokens join the queue."""
        self.check()
        self.reserve(cost)

    def reserve(self, cost: int) -> None:
        """``cost`` joins the queue without a check: a request admitted at the door (its check covered it)."""
        self.queued_tokens += cost
        self._count(admitted=1.0)

    def resize(self, old: int, new: int) -> None:
        """A queued request's estimated cost became its known cost."""
        self.queued_tokens = max(0, self.queued_tokens + new - old)

    def _count(self, admitted: float = 0.0, refused: float = 0.0, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(0.0, now - self._recent_at)
        decay = math.exp(-elapsed / self.demand_window_s)
        self._recent_admitted = self._recent_admitted * decay + admitted
        self._recent_refused = self._recent_refused * decay + refused
        if self.judges_overload():  # only read in overload: no work per request without it
            fast = math.exp(-elapsed / self.overload_window_s)
            self._fast_admitted = self._fast_admitted * fast + admitted
            self._fast_refused = self._fast_refused * fast + refused
            if not self.overloaded():
                self._carried = max(self._fast_admitted, self._carried * math.exp(-elapsed / self.carried_window_s))
        self._recent_at = now

    def arrived(self, waited_s: float) -> None:
        """A request reached the door having waited ``waited_s`` since HAProxy held it (0: no stamp)."""
        self.arrivals += 1
        self.arrival_wait_s_total += waited_s
        self.arrival_wait_max_s = max(self.arrival_wait_max_s, waited_s)
        self.arrival_wait_recent_s += ARRIVAL_SMOOTHING * (waited_s - self.arrival_wait_recent_s)
        count_over(self.arrivals_over, waited_s)

    def retry_after_s(self) -> int:
        """Seconds a refused caller should wait: the refused demand in seconds of admitted capacity."""
        if self._recent_admitted < 1e-3:
            return 1 if self._recent_refused < 1 else self.max_retry_after_s
        seconds = math.floor(self._recent_refused / self._recent_admitted + 0.5)  # nearest whole second
        return max(1, min(self.max_retry_after_s, seconds))

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

    def as_dict(self) -> dict[str, float | int]:
        return {
            "max_queue_wait_ms": self.max_queue_wait_s * 1000,
            "overload_budgets_on": self.judges_overload(),  # configured, and the model answers from a GPU
            "queue_wait_budget_ms": round(self.budget_s() * 1000, 1),
            "refused": self.refused,
            "queued_tokens": self.queued_tokens,
            "rate_tokens_per_s": round(self.rate_tokens_per_s, 1),
            "expected_wait_ms": round(self.expected_wait_s() * 1000, 1),
            "retry_after_s": self.retry_after_s(),
            "arrivals": self.arrivals,
            "arrival_wait_s_total": round(self.arrival_wait_s_total, 4),
            "arrival_wait_max_ms": round(self.arrival_wait_max_s * 1000, 1),
            "arrival_wait_recent_ms": round(self.arrival_wait_recent_s * 1000, 2),
            **{f"arrivals_over_{ms}ms": n for ms, n in self.arrivals_over.items()},
        }
