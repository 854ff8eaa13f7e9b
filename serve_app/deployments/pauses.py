"""When a serving process stops answering for a while, why: Python's collector, or its event loop held.

Requests on some nodes wait 50-100 ms in front of the ingress's handler while its cores stay half idle
(``scripts/results/h100-2026-11-24-arrival/``). Two things in the process itself can do that: a collection of
Python's older generations (every object is walked, the GIL held), and anything else that holds the event
loop (a long callback, a thread holding the GIL). Each replica measures both, cheaply, and reports them in
``/v1/models``: the collector through ``gc.callbacks`` (two calls per collection), the loop by how late a
20 ms sleep wakes up (50 wake-ups a second). Totals and counts only grow, so a client can difference two
snapshots; the maxima are since the process started.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.core.durations import count_over, zero_counts

LOOP_PROBE_S = 0.02  # the loop probe's sleep: its lateness is the loop's lag


@dataclass
class CollectorPauses:
    """Python's collections by generation: how many, their summed and longest time."""

    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds_total: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    longest_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    over: dict[int, int] = field(default_factory=zero_counts)  # collections of any generation at or over N ms
    _started: float = field(default=0.0, repr=False)

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """``gc.callbacks`` entry: called at the start and the stop of every collection."""
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        gen, took = int(info["generation"]), now - self._started
        self.collections[gen] += 1
        self.seconds_total[gen] += took
        self.longest_s[gen] = max(self.longest_s[gen], took)
        count_over(self.over, took)

    def as_dict(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "pause_s_total": [round(s, 4) for s in self.seconds_total],
            "pause_max_ms": [round(s * 1000, 1) for s in self.longest_s],
            **{f"pauses_over_{ms}ms": n for ms, n in self.over.items()},
        }


@dataclass
class LoopLag:
    """How late the event loop ran a task that asked to wake up ``LOOP_PROBE_S`` later."""

    probes: int = 0
    lag_s_total: float = 0.0
    longest_s: float = 0.0
    over: dict[int, int] = field(default_factory=zero_counts)

    def record(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.probes += 1
        self.lag_s_total += lag_s
        self.longest_s = max(self.longest_s, lag_s)
        count_over(self.over, lag_s)

    async def run(self, every_s: float = LOOP_PROBE_S) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(every_s)
            self.record(loop.time() - asked - every_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "probes": self.probes,
            "lag_s_total": round(self.lag_s_total, 4),
            "lag_max_ms": round(self.longest_s * 1000, 1),
            **{f"lags_over_{ms}ms": n for ms, n in self.over.items()},
        }


class ProcessPauses:
    """This process's collector and the event loop that serves its requests, from the first ``watch`` on."""

    def __init__(self) -> None:
        self.collector = CollectorPauses()
        self.loop = LoopLag()
        self._probe: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """Start measuring, from a coroutine on the loop that serves requests. Called again on that loop:
        nothing more; on another (a new one, the old closed): the probe moves to it."""
        if self.collector.on_gc not in gc.callbacks:
            gc.callbacks.append(self.collector.on_gc)
        loop = asyncio.get_running_loop()
        if self._probe is not None and not self._probe.done() and self._probe.get_loop() is loop:
            return
        self._probe = loop.create_task(self.loop.run())  # held: loops keep weak refs

    def as_dict(self) -> dict[str, Any]:
        return {"gc": self.collector.as_dict(), "loop": self.loop.as_dict()}


PROCESS_PAUSES = ProcessPauses()  # one per process: an ingress with the models in it measures once
