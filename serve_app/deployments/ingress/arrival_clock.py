"""The wait before the ingress's handler, from HAProxy's stamps, without trusting two nodes' clocks to agree.

HAProxy stamps a request with its node's clock (``api.http.ARRIVED_HEADER``); the ingress may run on another
node, and reads the stamp with its own. Taken as it is, a stamping clock 200 ms behind makes every request look
200 ms older, and at a 150 ms budget the ingress would refuse everything it is sent. So, as LEDBAT reads one-way
delays (RFC 6817), the least offset seen from each HAProxy (by its address) over the last ``BASE_WINDOW_S`` is
its base: the network, the parse, and the clocks' difference. A request's wait is its offset less that base,
which leaves what varies: the queueing in HAProxy, the socket and the event loop. A clock that steps is
followed within the window; a queue that never once empties for the whole window is undercounted (the model
queues still hold their own budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serve_app.api.http import arrival_offset_s

BASE_WINDOW_S = 10.0  # a peer's base is the least offset of the last 5-10 s (two halves, the older dropped)
# peers with a base of their own: HAProxy runs one per node, so this is a cluster of that many nodes. Stamps from
# peers beyond it count for nothing (anything that reaches the replica's port directly must not grow the table)
MAX_PEERS = 1024


@dataclass
class _Base:
    current: float  # least offset in the half-window that began at ``since``
    previous: float = math.inf  # least offset in the half before it
    since: float = 0.0

    def update(self, offset_s: float, now_s: float, half_s: float) -> float:
        """Take in one offset seen at ``now_s``; return the base (the least of both halves)."""
        if now_s - self.since >= half_s:
            self.previous = self.current if now_s - self.since < 2 * half_s else math.inf
            self.current, self.since = offset_s, now_s
        elif offset_s < self.current:
            self.current = offset_s
        return min(self.current, self.previous)


class ArrivalClock:
    """Per HAProxy address, the base its stamps are read against (``wait_s``); ``bases_ms`` shows them."""

    def __init__(self, window_s: float = BASE_WINDOW_S) -> None:
        self.half_s = window_s / 2
        self._bases: dict[str, _Base] = {}

    def wait_s(self, peer: str, stamp: str | None, now_s: float) -> float:
        """Seconds the request from ``peer`` stamped ``stamp`` waited before the handler (0 without a stamp)."""
        offset = arrival_offset_s(stamp, now_s)
        if offset is None:
            return 0.0
        base = self._bases.get(peer)
        if base is None:
            if len(self._bases) < MAX_PEERS:
                self._bases[peer] = _Base(offset, since=now_s)
            return 0.0  # the first from a peer is its own base
        return offset - base.update(offset, now_s, self.half_s)

    def bases_ms(self) -> dict[str, float]:
        """Each HAProxy's base in ms: a few tenths on one node; more, or below 0, is the clocks' difference."""
        return {peer: round(min(b.current, b.previous) * 1000, 2) for peer, b in self._bases.items()}
