"""Reading another node's timestamps with this node's clock, without trusting the two clocks to agree.

A stamp sent from another node (HAProxy's arrival stamp, an ingress's deadline and start-by times) is its
node's ``time.time()``. Read as it is, a sending clock 200 ms behind makes every stamp look 200 ms old. So, as
LEDBAT reads one-way delays (RFC 6817), the least offset (receipt by our clock less the stamp) seen from each
peer over the last ``BASE_WINDOW_S`` is its base: the clocks' difference and the quickest way here. A stamp plus
its peer's base is the same moment by our clock, give or take what the way here varies by. A clock that steps
is followed within the window; a way that never once runs quick for the whole window is undercounted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BASE_WINDOW_S = 10.0  # a peer's base is the least offset of the last 5-10 s (two halves, the older dropped)
# peers with a base of their own: one per node, so this is a cluster of that many nodes. A peer beyond it has
# each stamp read as if it arrived at once (anything that reaches a port directly must not grow the table)
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


class PeerClocks:
    """Per peer, the base its stamps are read against (``base_s``); ``bases_ms`` shows them."""

    def __init__(self, window_s: float = BASE_WINDOW_S) -> None:
        self.half_s = window_s / 2
        self._bases: dict[str, _Base] = {}

    def base_s(self, peer: str, offset_s: float, now_s: float) -> float:
        """Take in a stamp of ``peer`` that arrived ``offset_s`` after it by our clock, at ``now_s``; return the
        peer's base: its stamp plus that is our clock. The first from a peer is its own base."""
        base = self._bases.get(peer)
        if base is None:
            if len(self._bases) < MAX_PEERS:
                self._bases[peer] = _Base(offset_s, since=now_s)
            return offset_s
        return base.update(offset_s, now_s, self.half_s)

    def bases_ms(self) -> dict[str, float]:
        """Each peer's base in ms: a few tenths between clocks that agree; more, or below 0, is their difference."""
        return {peer: round(min(b.current, b.previous) * 1000, 2) for peer, b in self._bases.items()}
