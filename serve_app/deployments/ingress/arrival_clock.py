"""The wait before the ingress's handler, from HAProxy's stamps, without trusting two nodes' clocks to agree.

HAProxy stamps a request with its node's clock (``api.http.ARRIVED_HEADER``); the ingress may run on another
node, and reads the stamp with its own. Taken as it is, a stamping clock 200 ms behind makes every request look
200 ms older, and at a 150 ms budget the ingress would refuse everything it is sent. So each HAProxy (by its
address) has a base (``core.peer_clocks``): the network, the parse, and the clocks' difference. A request's wait
is its offset less that base, which leaves what varies: the queueing in HAProxy, the socket and the event loop.
A queue that never once empties for the whole window is undercounted (the model queues still hold their own
budget).
"""

from __future__ import annotations

from serve_app.api.http import arrival_offset_s
from serve_app.core.peer_clocks import BASE_WINDOW_S, PeerClocks


class ArrivalClock:
    """Per HAProxy address, the base its stamps are read against (``wait_s``); ``bases_ms`` shows them."""

    def __init__(self, window_s: float = BASE_WINDOW_S) -> None:
        self._clocks = PeerClocks(window_s)

    def wait_s(self, peer: str, stamp: str | None, now_s: float) -> float:
        """Seconds the request from ``peer`` stamped ``stamp`` waited before the handler (0 without a stamp)."""
        offset = arrival_offset_s(stamp, now_s)
        if offset is None:
            return 0.0
        return offset - self._clocks.base_s(peer, offset, now_s)

    def bases_ms(self) -> dict[str, float]:
        """Each HAProxy's base in ms: a few tenths on one node; more, or below 0, is the clocks' difference."""
        return self._clocks.bases_ms()
