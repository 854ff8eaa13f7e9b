"""A replica's pause figures (``deployments.pauses``): Python's collections and its event loop's lag."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest

from serve_app.deployments.pauses import LOOP_PROBE_S, ProcessPauses


@pytest.fixture
def pauses() -> Iterator[ProcessPauses]:
    """A fresh instance; its collector callback leaves this process's ``gc.callbacks`` afterwards."""
    watched = ProcessPauses()
    yield watched
    if watched.collector.on_gc in gc.callbacks:
        gc.callbacks.remove(watched.collector.on_gc)


def test_a_collection_is_counted_by_generation_with_its_time(pauses: ProcessPauses) -> None:
    async def run() -> None:
        pauses.watch()
        pauses.watch()  # again on the same loop: one callback, one probe
        assert gc.callbacks.count(pauses.collector.on_gc) == 1
        gc.collect(1)
        gc.collect()

    asyncio.run(run())
    seen = pauses.as_dict()["gc"]
    assert seen["collections"][1] >= 1 and seen["collections"][2] >= 1
    assert seen["pause_s_total"][2] > 0
    assert 0 < seen["pause_max_ms"][2] < 10_000


def test_a_blocked_event_loop_shows_as_lag_and_a_quiet_one_keeps_probing(pauses: ProcessPauses) -> None:
    async def run() -> None:
        pauses.watch()
        await asyncio.sleep(5 * LOOP_PROBE_S)
        quiet = pauses.loop.probes
        time.sleep(0.15)  # holds the loop: the probe wakes about 130 ms late
        await asyncio.sleep(3 * LOOP_PROBE_S)
        assert quiet >= 2 and pauses.loop.probes > quiet

    asyncio.run(run())
    loop = pauses.as_dict()["loop"]
    assert loop["lags_over_100ms"] >= 1 and loop["lags_over_50ms"] >= loop["lags_over_100ms"]
    assert 100 <= loop["lag_max_ms"] < 1_000
    assert loop["lag_s_total"] >= 0.1


def test_the_probe_moves_to_a_new_loop(pauses: ProcessPauses) -> None:
    """A replica whose loop was replaced (a test's second ``asyncio.run``) is measured on the new one."""

    async def count_probes() -> int:
        pauses.watch()
        before = pauses.loop.probes
        await asyncio.sleep(4 * LOOP_PROBE_S)
        return pauses.loop.probes - before

    assert asyncio.run(count_probes()) >= 1
    assert asyncio.run(count_probes()) >= 1
