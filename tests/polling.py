"""Waiting for a cluster to reach a state: one helper for every test that starts, scales or kills something."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.25) -> float:
    """Seconds until ``predicate()`` held; ``TimeoutError`` naming ``what`` if it did not within ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
