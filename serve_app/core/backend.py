"""The one small interface every runtime implements, and the errors it raises.

Deployments and batching see nothing of a runtime but this; the error types live here, at the bottom,
so that a backend can raise them and the ingress can map them to HTTP without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from serve_app.core.sequences import PaddedBatch
from serve_app.core.timing import Processor
from serve_app.core.versions import ModelKey


class BackendError(RuntimeError):
    """A runtime failed to load or to run a batch."""


class BackendUnavailable(BackendError):
    """A link of the fallback chain cannot serve here; the message says why."""


class Overloaded(RuntimeError):
    """Admission control refused a request: its expected queueing time exceeds the budget.

    Answered by the ingress as 503 ``overloaded`` with ``Retry-After: retry_after_s``.
    """

    def __init__(
        self, expected_wait_s: float, budget_s: float, retry_after_s: int = 1, started_late: bool = False
    ) -> None:
        what = "waited" if started_late else "expected queueing time"
        super().__init__(f"{what} {expected_wait_s * 1000:.0f} ms exceeds {budget_s * 1000:.0f} ms")
        self.expected_wait_s = expected_wait_s
        self.budget_s = budget_s
        self.retry_after_s = retry_after_s
        self.started_late = started_late  # admitted, then not started in time (``StartedLate``)

    def __reduce__(self) -> tuple[type[Overloaded], tuple[float, float, int, bool]]:  # may cross a process boundary
        return (Overloaded, (self.expected_wait_s, self.budget_s, self.retry_after_s, self.started_late))


class DeadlineExceeded(RuntimeError):
    """A request's deadline passed before its rows were computed: they were dropped, not run.

    Answered by the ingress as 504 ``deadline_exceeded``.
    """

    def __init__(self, message: str = "the request's deadline passed before it was computed") -> None:
        super().__init__(message)


class StartedLate(RuntimeError):
    """A request admitted while its model was refusing in earnest had not started computing by its start-by
    time (``batching.overload_start_within_s`` after it arrived): it was dropped uncomputed, as Triton's queue
    policy rejects a request past its queue timeout.

    Answered by the ingress as a refusal (503 ``overloaded`` with ``Retry-After``), as at the door.
    """

    def __init__(self, message: str = "the request did not start computing within its overload budget") -> None:
        super().__init__(message)


def refuses_late(start_by: float, now: float, window_s: float) -> bool:
    """Whether a request held to ``start_by`` that has not started is refused (``StartedLate``) at ``now``
    (both ``time.time()``): from its start-by time for ``window_s`` (``batching.overload_late_refusal_s``).
    Later than that it is computed after all. That is a request admitted before the overload was seen, held
    to its time only once it had passed: refused now, its 503 would come as late as its answer, after its
    caller had waited for nothing."""
    return start_by <= now <= start_by + window_s


class ModelUnavailable(RuntimeError):
    """No replica of a model deployment can take a call now (it died and Serve is replacing it).

    Answered by the ingress as 503 ``unavailable`` with ``Retry-After`` at once, instead of queueing
    requests until a new replica has started.
    """

    def __init__(self, model: str, retry_after_s: int = 1) -> None:
        super().__init__(f"no live replica of {model}; Serve is replacing it")
        self.model = model
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[ModelUnavailable], tuple[str, int]]:
        return (ModelUnavailable, (self.model, self.retry_after_s))


class VersionNotReady(RuntimeError):
    """A call asked a model replica for a version it does not serve (not loaded yet, refused by its gate, or
    retired). ``ready`` lists what the replica serves, and ``configs`` their model configs (as JSON), so the
    caller can send the request there instead, even a version it has never seen (an old or a new ingress
    replica during a rolling update).
    """

    def __init__(self, model: ModelKey, ready: tuple[ModelKey, ...], configs: tuple[dict[str, Any], ...] = ()) -> None:
        served = ", ".join(str(k) for k in ready) or "none"
        super().__init__(f"{model} is not served by this replica (it serves: {served})")
        self.model = model
        self.ready = ready
        self.configs = configs

    def __reduce__(self) -> tuple[type[VersionNotReady], tuple[Any, ...]]:
        return (VersionNotReady, (self.model, self.ready, self.configs))


class GateFailed(BackendError):
    """A model version's backend does not reproduce the reference outputs of its probe set: it must not serve."""


@dataclass(frozen=True)
class BackendInfo:
    """What ``/v1/models`` reports about the active runtime."""

    name: str  # "onnxruntime" | "torch" | "tensorrt"
    device: str  # "cpu", "cuda:0 (NVIDIA H100 80GB HBM3)", ...
    precision: str
    fixed_shapes: bool  # True: batches are padded to a batch slot (TensorRT profiles, CUDA graphs)
    # what it computes on, set by the backend itself (not read from ``device``): its answers carry it, and the
    # ingress keeps its overload budgets only for answers computed on a GPU (``Admission.computed_on``)
    processor: Processor
    reason: str = ""  # why the fallback chain chose it
    concurrency: int = 1  # forwards that may run at once (TensorRT: its contexts; ONNX Runtime: parallel_forwards)
    # dynamic shapes: what one more forward costs, in padded tokens; a forward of mixed lengths is cut where
    # that saves more padding (None: never cut by length)
    forward_cost_tokens: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Backend(Protocol):
    info: BackendInfo
    output_name: str  # "embeddings" or "logits"

    def infer(self, batch: PaddedBatch) -> np.ndarray:
        """Blocking forward pass; returns float32 [batch.rows, width]. Called from a worker thread."""
        ...

    def warmup(self, shapes: list[tuple[int, int]]) -> None:
        """Run every (batch, length) shape once so the first request pays no compile/capture cost."""
        ...

    def gpu_memory(self) -> tuple[int, int] | None:
        """(bytes this backend holds on its GPU, the card's total bytes); None for CPU backends."""
        ...

    def close(self) -> None:
        """Release device memory and streams; the backend is not used afterwards."""
        ...
