"""Admission at the ingress's door: one decision per request, before its body is read.

A request's expected wait is the tokenizer threads' queue (characters) plus the longest of its models'
queues (padded tokens), each divided by the rate it is measured to drain at (``batching.admission``). An
admitted request joins those queues at once, its cost estimated from its body's size and learned per route,
so requests arriving together see each other; it leaves them as its text is tokenized and its model answers.
Once admitted it is not refused for its expected wait again: a refusal after tokenizing wastes the work
(measured on an H100 node at 4x overload: 1,700 of 9,000 refusals came after tokenizing, about 7 of its
16 cores). The one exception is opt-in: under sustained overload, a request that has not started computing
within ``batching.overload_start_within_s`` of its arrival is refused then (``start_by``, ``StartedLate``), while
the model answers from a GPU (``Admission.computed_on``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from serve_app.batching.admission import Admission
from serve_app.config import BatchingConfig, Task
from serve_app.core.backend import StartedLate
from serve_app.core.timing import ModelTiming
from serve_app.deployments.ingress.tokenizer_threads import INLINE_TOKENIZE_CHARS
from serve_app.deployments.ingress.trace import Trace


class Answer(Protocol):
    """A model's answer (``Ranked``, ``Classified``): its timing says what computed it."""

    @property
    def timing(self) -> ModelTiming: ...


T = TypeVar("T", bound=Answer)
# a model's queue holds an admitted request from the door on, at this estimate until its call: padded tokens
# per body byte (SciFact re-rank, whole abstracts: 0.19; a short classify body: about 1), learned per route and
# model from the first request on
INITIAL_TOKENS_PER_BYTE = 0.5
PER_BYTE_SMOOTHING = 0.2  # moving average of both per-byte ratios (tokens, characters)
# the tokenizer threads' queue is in characters (their rate is): a body's are estimated from its size at the
# door, learned per route (ASCII JSON: about 0.95 characters a byte; text sent as \uXXXX escapes, as
# json.dumps sends any non-ASCII: 1/6), and known once it is parsed
INITIAL_CHARS_PER_BYTE = 1.0


class Door:
    """The queues an ingress replica admits into: its tokenizer threads' and one per model."""

    def __init__(self) -> None:
        self.models: dict[Task, Admission] = {"rerank": Admission(0.0), "classify": Admission(0.0)}
        self.tokenizer = Admission(0.0)  # characters of admitted text not yet tokenized
        self._chars_per_byte: dict[str, float] = {}  # per route: see INITIAL_CHARS_PER_BYTE
        self._tokens_per_byte: dict[tuple[str, Task], float] = {}  # per (route, model): see INITIAL_TOKENS_PER_BYTE

    def configure(self, batching: BatchingConfig) -> None:
        for adm in (*self.models.values(), self.tokenizer):
            adm.max_queue_wait_s = batching.max_queue_wait_s
            adm.overload_queue_wait_s = batching.overload_queue_wait_s
            adm.overload_start_within_s = batching.overload_start_within_s
            adm.overload_window_s = batching.overload_window_s
            adm.overload_refused_ratio = batching.overload_refused_ratio

    def chars_per_byte(self, route: str) -> float | None:
        """What this replica has learned of ``route``'s bodies (None: nothing yet)."""
        return self._chars_per_byte.get(route)

    def admit(self, body_bytes: int | None, trace: Trace, *tasks: Task, waited_s: float = 0.0) -> None:
        """Admit a request of ``body_bytes`` (``Content-Length``; None if not sent) for ``tasks``, or raise
        ``Overloaded`` (503). The budget is ``batching.max_queue_wait_s`` (``overload_queue_wait_s`` while either
        queue is refusing in earnest: ``Admission.budget_s``), one for the whole path, and it covers ``waited_s``,
        the time the request already waited before it reached the door (HAProxy's stamp). A body of at most
        ``INLINE_TOKENIZE_CHARS`` bytes is tokenized on the event loop, so it skips the threads' queue."""
        tok = self.tokenizer
        threads = body_bytes is None or body_bytes > INLINE_TOKENIZE_CHARS
        tok_wait = tok.expected_wait_s() if threads else 0.0
        waits = {task: self.models[task].expected_wait_s() for task in tasks}
        slowest = max(tasks, key=waits.__getitem__)
        for task in tasks:
            self.models[task].arrived(waited_s)
        wait = waited_s + tok_wait + waits[slowest]
        budget = min(tok.budget_s(), self.models[slowest].budget_s())
        if budget > 0 and wait > budget:
            (tok if tok_wait > waits[slowest] else self.models[slowest]).refuse(wait, budget)
        trace.body_bytes = body_bytes or 0
        trace.arrived = time.time() - waited_s
        if threads and body_bytes:  # characters, estimated until the text is parsed (``measured``)
            held = max(1, int(body_bytes * self._chars_per_byte.get(trace.route, INITIAL_CHARS_PER_BYTE)))
            tok.reserve(held)
            trace.tokenizer_held = held
        for task in tasks:
            per_byte = self._tokens_per_byte.get((trace.route, task), INITIAL_TOKENS_PER_BYTE)
            estimate = int(trace.body_bytes * per_byte)
            self.models[task].reserve(estimate)
            trace.models_held[task] = estimate

    def measured(self, trace: Trace, chars: int) -> None:
        """A request's text is parsed: what it holds in the tokenizer threads' queue becomes its length in
        characters, and its route learns characters per body byte for the next estimates at the door."""
        if trace.text_measured or not trace.body_bytes:  # measured already, or not admitted at the door
            return
        trace.text_measured = True
        if trace.tokenizer_held:
            self.tokenizer.resize(trace.tokenizer_held, chars)
            trace.tokenizer_held = chars
        old = self._chars_per_byte.get(trace.route, chars / trace.body_bytes)
        self._chars_per_byte[trace.route] = old + PER_BYTE_SMOOTHING * (chars / trace.body_bytes - old)

    def tokenized(self, trace: Trace) -> None:
        """The request's text has left the tokenizer threads' queue."""
        if trace.tokenizer_held:
            self.tokenizer.release(trace.tokenizer_held)
            trace.tokenizer_held = 0

    def release(self, trace: Trace) -> None:
        """What a request still holds in the queues when it ends (failed, timed out, or never called a model)."""
        self.tokenized(trace)
        for task, held in trace.models_held.items():
            self.models[task].release(held)
        trace.models_held.clear()

    def start_by(self, task: Task, trace: Trace) -> tuple[float, bool]:
        """When (``time.time()``) the request's call to ``task``'s model must start computing, or be refused
        (``StartedLate``), and whether that holds now. It holds only while the model's queue refuses in earnest
        (``Admission.holds_start_by``; the model replica and the ingress's call slots hold every queued request
        to it from then on), only for a request admitted at the door, and only while the model answers from a GPU
        (``Admission.judges_overload``). ``math.inf``: never held to one."""
        adm = self.models[task]
        if not trace.arrived or adm.overload_start_within_s <= 0 or not adm.judges_overload():
            return math.inf, False
        return trace.arrived + adm.overload_start_within_s, adm.overloaded()  # ``holds_start_by``: the rest is checked

    async def call(self, task: Task, cost: int, call: Callable[[], Awaitable[T]], trace: Trace) -> T:
        """Make a model call of ``cost`` padded tokens, keeping the model's queue estimate current. A request
        admitted at the door has its estimate replaced by the known cost; any other call (a shadow's) is
        checked here (``Overloaded`` if its wait is over budget; nothing is sent). A call that did not start in
        time (``StartedLate``) is refused as at the door, and counted so."""
        adm = self.models[task]
        self.tokenized(trace)  # a model is called once the request's text is tokenized
        estimate = trace.models_held.pop(task, None)
        if estimate is None:
            adm.admit(cost)
        else:
            adm.resize(estimate, cost)
            if trace.body_bytes:  # learn this route's tokens per body byte for the next estimates
                key, ratio = (trace.route, task), cost / trace.body_bytes
                old = self._tokens_per_byte.get(key, ratio)
                self._tokens_per_byte[key] = old + PER_BYTE_SMOOTHING * (ratio - old)
        started = time.monotonic()
        try:
            result = await call()
        except StartedLate:
            adm.refuse(time.time() - trace.arrived, started_late=True)
        finally:
            adm.release(cost)
        adm.observe(cost, started)
        adm.computed_on(result.timing.processor)
        trace.timing.called(time.monotonic() - started)
        return result
