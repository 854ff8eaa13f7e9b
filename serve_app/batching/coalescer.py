"""Concurrent calls to a remote model leave the caller as one call.

A Serve handle call costs the model replica a fixed amount of Python (receive, deserialize, route
into ``@serve.batch``, reply, metrics) whatever it carries; on an H100 that, not the GPU, held one
intent replica near 500 single-text requests per second. So each ingress keeps at most
``max_in_flight`` calls out per model, and requests that arrive while they are all out leave
together in the next one (the same continuous batching as the model's own queue, one hop earlier).
The model deployment still sees its ongoing calls grow with load, which is what its autoscaling
follows.

A call answers each item with a result or an exception (an item can fail alone, e.g. past its
deadline). Under overload an item may also have to leave by a start-by time (``StartLimit``): one still
waiting then is refused at that moment, not sent. An item whose caller goes (cancelled: client gone or deadline)
before its call leaves is taken out and never sent (``abandoned``). When every caller of a call already sent has
gone, the call itself is cancelled, which Serve carries to the model replica, where its queued batch item is
dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)


class StartLimit(Protocol[T_contra]):
    """By when an item must leave (under overload), and what a caller still waiting then gets."""

    def start_by(self, item: T_contra) -> float:
        """``time.time()`` by which ``item`` must have left, or ``math.inf``."""

    def refuses_late(self, item: T_contra, now: float) -> bool:
        """Whether ``item``, not gone by ``now``, is refused then: from its start-by time on, for a while
        (``core.backend.refuses_late``)."""

    def held(self) -> bool:
        """Whether start-by times are held to now (only while the model refuses in earnest)."""

    def refusal(self) -> BaseException: ...


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        send: Callable[[list[T]], Coroutine[Any, Any, Sequence[R | BaseException]]],
        max_in_flight: int,
        max_items: int = 128,
        limit: StartLimit[T] | None = None,
    ) -> None:
        self._send = send
        self._limit = limit
        self.max_in_flight = max_in_flight
        self.max_items = max_items  # per call: bounds one message's size
        # each waiting item, its future (its result and when its call left, loop time), and the timer that
        # refuses it at its start-by time if it has not left by then
        self._pending: list[tuple[T, asyncio.Future[tuple[R, float]], asyncio.TimerHandle | None]] = []
        self.refused_late = 0  # items refused here at their start-by time
        self.abandoned = 0  # items whose caller left before they were sent: never sent
        self._in_flight = 0
        self._scheduled = False
        self.calls = 0
        self.items = 0

    def counts(self) -> dict[str, int]:
        """What left as calls, and what never left (``/v1/models``, per ingress replica)."""
        return {
            "calls": self.calls,
            "items": self.items,
            "refused_late": self.refused_late,
            "abandoned": self.abandoned,
        }

    async def call(self, item: T) -> R:
        result, _ = await self.call_timed(item)
        return result

    async def call_timed(self, item: T) -> tuple[R, float]:
        """``call``, and how long the item waited here for a call slot (its share of the response's ``slot``)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[R, float]] = loop.create_future()
        queued = loop.time()
        timer = None
        if self._limit is not None and (by := self._limit.start_by(item)) < math.inf:
            timer = loop.call_later(max(0.0, by - time.time()), self._expire, item, future)
        entry = (item, future, timer)
        self._pending.append(entry)
        self._schedule()
        try:
            result, left = await future
        except asyncio.CancelledError:
            self._abandon(entry)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return result, left - queued

    def _abandon(self, entry: tuple[T, asyncio.Future[tuple[R, float]], asyncio.TimerHandle | None]) -> None:
        """Its caller left: if it is still waiting, it never leaves (its call slot goes to the living)."""
        for i, waiting in enumerate(self._pending):
            if waiting is entry:
                del self._pending[i]
                self.abandoned += 1
                return

    def _expire(self, item: T, future: asyncio.Future[tuple[R, float]]) -> None:
        """An item's start-by time came while it waited here (a departed item's timer was cancelled)."""
        limit = self._limit
        if not future.done() and limit is not None and limit.held() and limit.refuses_late(item, time.time()):
            self.refused_late += 1
            future.set_exception(limit.refusal())

    def _schedule(self) -> None:
        # on the next loop turn, so that requests handled in this turn leave in the same call
        if self._pending and self._in_flight < self.max_in_flight and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        limit = self._limit
        held = limit is not None and limit.held()
        now = time.time() if held else 0.0  # read only while start-by times are held to
        while self._pending and self._in_flight < self.max_in_flight:
            leaving = self._pending[: self.max_items]
            self._pending = self._pending[self.max_items :]
            batch = []
            for i, f, timer in leaving:
                if timer is not None:
                    timer.cancel()
                if f.done():  # caller gone, or refused late
                    continue
                if held and limit is not None and limit.refuses_late(i, now):  # late before the overload was seen
                    self.refused_late += 1
                    f.set_exception(limit.refusal())
                    continue
                batch.append((i, f))
            if batch:
                self._in_flight += 1
                self.calls += 1
                self.items += len(batch)
                left = asyncio.get_running_loop().time()
                asyncio.get_running_loop().create_task(self._run(batch, left))

    async def _run(self, batch: list[tuple[T, asyncio.Future[tuple[R, float]]]], left: float) -> None:
        sending = asyncio.get_running_loop().create_task(self._send([item for item, _ in batch]))
        everyone_left = False

        def caller_gone(_: asyncio.Future[tuple[R, float]]) -> None:
            nonlocal everyone_left
            if not sending.done() and all(f.cancelled() for _, f in batch):
                everyone_left = True
                sending.cancel()

        for _, f in batch:
            f.add_done_callback(caller_gone)
        try:
            results = await sending
        except asyncio.CancelledError:
            for _, f in batch:
                f.cancel()
            if not everyone_left:
                raise  # cancelled from outside, not by its callers leaving
        except Exception as e:  # every caller of this call gets the error (e.g. 503 back-pressure)
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
        else:
            for (_, f), r in zip(batch, results, strict=True):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result((r, left))
        finally:
            for _, f in batch:
                f.remove_done_callback(caller_gone)
            self._in_flight -= 1
            self._schedule()
