"""Which version of a route's model answers a request.

- **Canary**: ``canary.weight`` percent of requests go to the canary. A request with a caller key
  (``X-Caller-Id``) lands on a point of [0, 100) fixed by a hash of (model, canary version, caller), so a
  caller keeps its version for the whole rollout, and every ingress replica agrees (no shared state).
  Without a key the point is random.
- **Shadow**: ``shadow.share`` of requests are also scored by the shadow version, in the background.
- **Versions a replica does not serve** (still loading during a deploy, refused by its gate, retired): the
  replica answers ``VersionNotReady`` with what it serves; the request goes there instead, and the router
  sends that version's next requests to the replacement for ``redirect_s`` instead of asking again.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from serve_app.config import RouteConfig
from serve_app.core.versions import ModelKey


def caller_point(model: str, canary_version: str, caller: str) -> float:
    """A caller's fixed point in [0, 100): the same on every ingress replica and every restart."""
    digest = hashlib.blake2b(f"{model}\0{canary_version}\0{caller}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


@dataclass(frozen=True)
class Choice:
    model: ModelKey  # the version that answers
    shadow: ModelKey | None  # a version that also scores the request, its answer discarded


class VersionRouter:
    redirect_s = 1.0  # how long a version a replica did not serve is sent elsewhere before it is asked again

    def __init__(self, route: RouteConfig, rng: random.Random | None = None) -> None:
        self.route = route
        self._rng = rng or random.Random()
        self._redirects: dict[ModelKey, tuple[ModelKey, float]] = {}  # not served -> (instead, until)
        self.answered: Counter[str] = Counter()  # version label -> requests it answered (this ingress replica)

    def choose(self, caller: str | None) -> Choice:
        route = self.route
        version = route.version
        canary = route.canary
        if canary is not None and canary.version != route.version and canary.weight > 0:
            point = caller_point(route.model, canary.version, caller) if caller else self._rng.random() * 100
            if point < canary.weight:
                version = canary.version
        chosen = self._redirected(ModelKey(route.model, version))
        shadow = None
        if route.shadow is not None and route.shadow.version != chosen.version:
            if route.shadow.share >= 1 or self._rng.random() < route.shadow.share:
                shadow = ModelKey(route.model, route.shadow.version)
        return Choice(chosen, shadow)

    def _redirected(self, key: ModelKey) -> ModelKey:
        found = self._redirects.get(key)
        if found is None:
            return key
        instead, until = found
        if time.monotonic() >= until:
            del self._redirects[key]
            return key
        return instead

    def instead_of(
        self, missing: ModelKey, ready: Collection[ModelKey], known: Collection[ModelKey]
    ) -> ModelKey | None:
        """A version the replica serves (``ready``) and this ingress can tokenize for (``known``), to answer
        a request ``missing`` could not: the route's serving version, its previous one, its canary, then any."""
        route = self.route
        preferred = [route.version, route.previous, route.canary.version if route.canary else None]
        candidates = [ModelKey(route.model, v) for v in preferred if v is not None]
        candidates += sorted(ready)
        for key in candidates:
            if key != missing and key in ready and key in known:
                self._redirects[missing] = (key, time.monotonic() + self.redirect_s)
                return key
        return None
