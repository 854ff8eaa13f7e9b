"""One request's record on its way through the ingress: its deadline, what it holds in the queues, who answered."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serve_app.api.timing import RequestTiming
from serve_app.config import Task


@dataclass
class Trace:
    """One request's deadline, and what it touched (for its latency metric): the model versions that answered."""

    timeout_s: float = math.inf
    deadline: float = math.inf  # time.time() past which the client gets 504 and the models drop its rows
    served: list[tuple[str, str]] = field(default_factory=list)  # (model name, version)
    caller: str | None = None  # X-Caller-Id: a canary keeps a caller on one version
    route: str = ""  # the route's path (metrics, and the estimates admission learns per route)
    # admitted at the door: what this request holds in the queues until its work is done (``Door``)
    body_bytes: int = 0
    arrived: float = 0.0  # time.time() it reached HAProxy (or the door without a stamp); 0: not admitted there
    tokenizer_held: int = 0  # characters of text in the tokenizer threads' queue, until its model call
    text_measured: bool = False  # its text was parsed: what it holds there is its length, not an estimate
    models_held: dict[Task, int] = field(default_factory=dict)  # estimated padded tokens, until the call
    timing: RequestTiming = field(default_factory=RequestTiming)  # where its time went (response headers)

    def tags(self) -> tuple[str, str]:
        return ",".join(n for n, _ in self.served), ",".join(v for _, v in self.served)

    def header(self) -> str:
        """``X-Model-Version``: ``<name>/<version>`` of each model that answered, comma-separated."""
        return ",".join(f"{n}/{v}" for n, v in self.served)
