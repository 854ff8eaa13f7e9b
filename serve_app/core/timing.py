"""Where a request's time went in a model call: in the replica (waiting, computing) and before the call left.

The replica measures its part on its own clock and sends it back with the answer, and the ingress adds how long
the request waited for a call slot, so a model call splits into both ends and the transport between them
without comparing two processes' clocks. The response carries it (``api/timing``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Processor(Enum):
    """What a backend computes on. The ingress's overload budgets are sized for a GPU's batch times
    (``batching.admission``): a model answering from the CPU (the fallback chain's last link) keeps the long one."""

    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class ModelTiming:
    queue_s: float = 0.0  # in the replica, not computing: waiting for a batch, for the device
    inference_s: float = 0.0  # the backend's time in the batches that computed it
    in_replica_s: float = 0.0  # from the call's arrival in the replica to its answer (0: not reported)
    slot_s: float = 0.0  # before the call left the ingress: waiting for one of its calls in flight (``Coalescer``)
    # what the backend that computed it runs on; None: not reported (nothing computed, or a replica of a version
    # before this field: a plain field with a default, so both sides of a rolling update unpickle each other's)
    processor: Processor | None = None

    def after_slot(self, slot_s: float) -> ModelTiming:
        """This answer's timing, for a call that waited ``slot_s`` in the ingress before it left."""
        return ModelTiming(self.queue_s, self.inference_s, self.in_replica_s, slot_s, self.processor)

    def longest(self, other: ModelTiming) -> ModelTiming:
        """Two answers for one request (two models, or versions): the slower of each."""
        return ModelTiming(
            max(self.queue_s, other.queue_s),
            max(self.inference_s, other.inference_s),
            max(self.in_replica_s, other.in_replica_s),
            max(self.slot_s, other.slot_s),
            self.processor or other.processor,
        )


UNTIMED = ModelTiming()  # an answer with no time in a model (all from the cache, or a replica that said nothing)
