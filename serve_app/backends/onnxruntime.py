"""ONNX Runtime on the CPU: the embedded default and the last link of the fallback chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve_app.backends.base import BackendInfo
from serve_app.batching.buckets import PaddedBatch


class OnnxRuntimeBackend:
    def __init__(self, onnx_path: Path, intra_op_threads: int = 1, reason: str = "") -> None:
        opts = ort.SessionOptions()
        # one replica = num_cpus threads; oversubscribing a core costs far more than it gains
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.output_name = self._session.get_outputs()[0].name
        self.info = BackendInfo(
            name="onnxruntime",
            device="cpu",
            precision="fp32",
            fixed_shapes=False,
            reason=reason,
            extra={"onnxruntime": ort.__version__, "intra_op_threads": intra_op_threads},
        )

    def infer(self, batch: PaddedBatch) -> np.ndarray:
        feeds = {k: v for k, v in batch.feeds().items() if k in self._inputs}
        (out,) = self._session.run([self.output_name], feeds)
        return np.asarray(out[: batch.rows], dtype=np.float32)

    def warmup(self, shapes: list[tuple[int, int]]) -> None:
        for rows, length in shapes:
            z = np.zeros((rows, length), dtype=np.int64)
            self.infer(PaddedBatch(z, np.ones_like(z), z, rows))

    def gpu_memory(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        del self._session
