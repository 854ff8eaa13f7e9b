"""ONNX Runtime on the CPU: the embedded default and the last link of the fallback chain."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from serve_app.core.backend import BackendInfo
from serve_app.core.sequences import PaddedBatch
from serve_app.core.timing import Processor


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), which is what a container or Ray gives it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


FORWARD_COST_TOKENS_PER_THREAD = 20


class OnnxRuntimeBackend:
    """One session, run by ``parallel_forwards`` callers at once, each forward on ``intra_op_threads`` threads.

    On a small CPU, forwards side by side on one thread each beat one forward on every core: measured on 2
    cores (CLINC150 texts, all-MiniLM-L6-v2), two one-thread forwards at once ran 655-713 texts/s at 1-16 rows
    per forward, one two-thread forward 361-524 (a forward of a few short rows gains little from a second
    thread). A session is safe to run from several threads.
    """

    def __init__(
        self,
        onnx_path: Path,
        intra_op_threads: int | Literal["auto"] = "auto",
        parallel_forwards: int | Literal["auto"] = 1,
        reason: str = "",
    ) -> None:
        threads = 1 if intra_op_threads == "auto" else intra_op_threads
        forwards = max(1, available_cores() // threads) if parallel_forwards == "auto" else parallel_forwards
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between forwards: on a small machine the spinning threads would take the cores
        # the ingress needs to parse and tokenize the next requests
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.output_name = self._session.get_outputs()[0].name
        self.info = BackendInfo(
            name="onnxruntime",
            device="cpu",
            precision="fp32",
            fixed_shapes=False,
            processor=Processor.CPU,  # CPUExecutionProvider only: the GPU paths are TensorRT's and torch's
            reason=reason,
            concurrency=forwards,
            # measured on 2 cores (scripts/bench.py reports it per machine): a forward's fixed part, about 3 ms of
            # per-operator dispatch, is worth ~40 padded tokens; the work per token shrinks with the threads
            forward_cost_tokens=FORWARD_COST_TOKENS_PER_THREAD * threads,
            extra={"onnxruntime": ort.__version__, "intra_op_threads": threads, "parallel_forwards": forwards},
        )

    def infer(self, batch: PaddedBatch) -> np.ndarray:
        feeds = {k: v for k, v in batch.feeds().items() if k in self._inputs}
        (out,) = self._session.run([self.output_name], feeds)
        return np.asarray(out[: batch.rows], dtype=np.float32)

    def warmup(self, shapes: list[tuple[int, int]]) -> None:
        """Every shape once, ``parallel_forwards`` at a time (one-thread forwards one after another made a
        replica's start 2 s slower per model on 2 cores)."""

        def run(shape: tuple[int, int]) -> None:
            z = np.zeros(shape, dtype=np.int64)
            self.infer(PaddedBatch(z, np.ones_like(z), z, shape[0]))

        with ThreadPoolExecutor(self.info.concurrency) as pool:
            list(pool.map(run, sorted(shapes, key=lambda s: -s[0] * s[1])))

    def gpu_memory(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        del self._session
