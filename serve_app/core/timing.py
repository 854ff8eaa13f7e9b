"""Where a request's time went in a model call: in the replica (waiting, computing) and before the call left.

The replica measures its part on its own clock and sends it back with the answer, and the ingress adds how long
the request waited for a call slot, so a model call splits into both ends and the transport between them
without comparing two processes' clocks. The response carries it (``api/timing``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelTiming:
    queue_s: float = 0.0  # in the replica, not computing: waiting for a batch, for the device
    inference_s: float = 0.0  # the backend's time in the batches that computed it
    in_replica_s: float = 0.0  # from the call's arrival in the replica to its answer (0: not reported)
    slot_s: float = 0.0  # before the call left the ingress: waiting for one of its calls in flight (``Coalescer``)

    def after_slot(self, slot_s: float) -> ModelTiming:
        """This answer's timing, for a call that waited ``slot_s`` in the ingress before it left."""
        return ModelTiming(self.queue_s, self.inference_s, self.in_replica_s, slot_s)

    def longest(self, other: ModelTiming) -> ModelTiming:
        """Two answers for one request (two models, or versions): the slower of each."""
        return ModelTiming(
            max(self.queue_s, other.queue_s),
            max(self.inference_s, other.inference_s),
            max(self.in_replica_s, other.in_replica_s),
            max(self.slot_s, other.slot_s),
        )


UNTIMED = ModelTiming()  # an answer with no time in a model (all from the cache, or a replica that said nothing)
