"""Backends side by side on the same padded batches: sequences per second and the ratio to the first one.

    python scripts/bench_backends.py                                  # CPU: onnxruntime
    python scripts/bench_backends.py --backends torch-eager torch-graphs onnxruntime   # on a GPU

Each (backend, shape) is warmed up, then timed over --iters forward passes; the median is reported.
Ratios are only meaningful within one run (same machine, same moment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from serve_app.config import Task, load_config
from serve_app.core.backend import Backend
from serve_app.core.sequences import PaddedBatch
from serve_app.models.artifacts import resolve


def make_backend(kind: str, task: Task) -> Backend:
    cfg = load_config()
    serving = cfg.serving(task)
    art = resolve(serving.model, serving.artifacts_dir)
    if kind == "onnxruntime":
        from serve_app.backends.onnxruntime import OnnxRuntimeBackend, available_cores

        return OnnxRuntimeBackend(art.onnx_path, available_cores())  # one forward at a time: every core
    from serve_app.backends.torch import TorchBackend

    graphs = kind == "torch-graphs"
    backend_cfg = serving.backend.model_copy(update={"cuda_graphs": graphs})
    return TorchBackend.create(art, serving.model_copy(update={"backend": backend_cfg}))


def time_shape(backend: Backend, rows: int, length: int, iters: int) -> float:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    batch = PaddedBatch(ids, mask, np.zeros_like(ids), rows)
    for _ in range(3):
        backend.infer(batch)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        backend.infer(batch)  # returns host numpy: includes copies and synchronization
        times.append(time.perf_counter() - t0)
    return rows / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["onnxruntime"])
    ap.add_argument("--task", choices=["rerank", "classify"], default="rerank")
    ap.add_argument("--shapes", nargs="+", default=["1x32", "32x32", "32x128", "32x256"])
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    results: dict[str, dict[str, float]] = {}
    for kind in args.backends:
        backend = make_backend(kind, args.task)
        results[kind] = {f"{r}x{n}": time_shape(backend, r, n, args.iters) for r, n in shapes}
        backend.close()
    base = args.backends[0]
    print(json.dumps({"task": args.task, "seq_per_s": results}))
    header = f"{'shape':>8} " + " ".join(f"{k:>22}" for k in args.backends)
    print(header)
    for s in results[base]:
        cells = [f"{results[k][s]:>10.0f} seq/s ({results[k][s] / results[base][s]:4.2f}x)" for k in args.backends]
        print(f"{s:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()
