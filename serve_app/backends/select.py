"""The fallback chain: TensorRT (an engine that fits this GPU) → PyTorch on the GPU → ONNX Runtime on the CPU.

Each link says why it was skipped; the chosen backend carries that reason into ``/v1/models`` and the
logs, so "why is this on the CPU?" has an answer without a debugger.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace

from serve_app.config import ModelServingConfig
from serve_app.core.backend import Backend, BackendUnavailable
from serve_app.models.artifacts import ModelArtifacts

log = logging.getLogger("ray.serve")


def cuda_device_count() -> int:
    """GPUs visible to this process, asked through cuda-python or torch if either is installed (no import otherwise).

    A broken or driverless CUDA install counts as no GPU: the chain then serves on the CPU and says so.
    """
    try:
        if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
            from cuda.bindings import runtime as cudart

            err, n = cudart.cudaGetDeviceCount()
            return int(n) if err == cudart.cudaError_t.cudaSuccess else 0
        if importlib.util.find_spec("torch") is not None:
            import torch

            return int(torch.cuda.device_count())
    except Exception as e:  # ImportError of a partial install, driver load failures
        log.warning("CUDA not usable here: %s", e)
    return 0


def _tensorrt(art: ModelArtifacts, cfg: ModelServingConfig) -> Backend:
    from serve_app.backends.tensorrt import load_tensorrt_backend

    return load_tensorrt_backend(art, cfg)


def _torch(art: ModelArtifacts, cfg: ModelServingConfig) -> Backend:
    if importlib.util.find_spec("torch") is None:
        raise BackendUnavailable("torch is not installed (pip install 'serve-app[gpu]')")
    from serve_app.backends.torch import TorchBackend

    return TorchBackend.create(art, cfg)


def _onnxruntime(art: ModelArtifacts, cfg: ModelServingConfig, reason: str) -> Backend:
    from serve_app.backends.onnxruntime import OnnxRuntimeBackend

    b = cfg.backend
    return OnnxRuntimeBackend(art.onnx_path, b.intra_op_threads, b.parallel_forwards, reason=reason)


def select_backend(art: ModelArtifacts, cfg: ModelServingConfig) -> Backend:
    kind = cfg.backend.kind
    if kind == "onnxruntime":
        return _onnxruntime(art, cfg, "configured")
    if kind == "tensorrt":
        return _tensorrt(art, cfg)  # explicit choice: fail loudly rather than fall back
    if kind == "torch":
        return _torch(art, cfg)

    skipped: list[str] = []
    if cuda_device_count() == 0:
        skipped.append("no CUDA GPU visible")
    else:
        for name, factory in (("tensorrt", _tensorrt), ("torch", _torch)):
            try:
                backend = factory(art, cfg)
            except Exception as e:  # auto must still serve: any failure of a link moves to the next one
                skipped.append(f"{name}: {e}")
                log.warning("backend %s skipped for %s: %s", name, art.name, e)
                continue
            backend.info = replace(backend.info, reason="; ".join(skipped) or "first choice")
            return backend
    return _onnxruntime(art, cfg, "; ".join(skipped))
