"""Counting waits and pauses at or over a few fixed durations: one set of thresholds and one way to count, for
every figure that reports them (the wait before the ingress, event-loop lags, collections, the bench's own)."""

from __future__ import annotations

COUNTED_MS = (20, 50, 100)  # a wait or pause is counted at each of these it reaches


def zero_counts() -> dict[int, int]:
    return dict.fromkeys(COUNTED_MS, 0)


def count_over(counts: dict[int, int], seconds: float) -> None:
    """Add ``seconds`` to each threshold it reaches (below the first, the common case, one comparison)."""
    ms = seconds * 1000
    if ms < COUNTED_MS[0]:
        return
    for threshold in COUNTED_MS:
        if ms >= threshold:
            counts[threshold] += 1
