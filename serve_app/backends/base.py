"""The one small interface every runtime implements; deployments and batching never see more."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serve_app.batching.buckets import PaddedBatch


@dataclass(frozen=True)
class BackendInfo:
    """What ``/v1/models`` reports about the active runtime."""

    name: str  # "onnxruntime" | "torch" | "tensorrt"
    device: str  # "cpu", "cuda:0 (NVIDIA H100 80GB HBM3)", ...
    precision: str
    fixed_shapes: bool  # True: batches are padded to a batch slot (TensorRT profiles, CUDA graphs)
    reason: str = ""  # why the fallback chain chose it
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
