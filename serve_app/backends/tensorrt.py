"""TensorRT backend: a validated engine, one execution context per (bucket, concurrency slot).

Written against the TensorRT 10/11 runtime API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``, ``set_optimization_profile_async``) through the flavor shim, and type-checked
against ``tensorrt-stubs``. Each context owns its stream, pinned host buffers and device buffers,
allocated once for its profile's largest shape, so a request never allocates; each fixed
(batch slot x bucket) shape is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.config import ModelServingConfig
from serve_app.core.backend import BackendInfo
from serve_app.core.sequences import PaddedBatch
from serve_app.core.timing import Processor
from serve_app.engine.manifest import EngineRefused, Manifest, Profile, check_compatible, engine_dir
from serve_app.engine.trt_shim import TRT, TensorRTUnavailable, compute_capability_name, import_tensorrt
from serve_app.models.artifacts import ModelArtifacts

if TYPE_CHECKING:  # the stubs describe the datacenter API; the RTX module has the same surface
    import tensorrt as trt_types

log = logging.getLogger("ray.serve")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _backend_unavailable(msg: str) -> Exception:
    from serve_app.core.backend import BackendUnavailable

    return BackendUnavailable(msg)


@dataclass
class _Slot:
    """One execution context with everything it needs to run without allocating."""

    context: trt_types.IExecutionContext
    profile: Profile
    stream: Any  # cuda_runtime.Stream
    host_in: dict[str, Any]  # name -> PinnedBuffer [max_batch, bucket] int64
    dev_in: dict[str, Any]  # name -> DeviceBuffer
    host_out: Any  # PinnedBuffer [max_batch, width] float32
    dev_out: Any  # DeviceBuffer
    graphs: dict[int, Any] = field(default_factory=dict)  # batch rows -> CudaGraph


class TensorRTBackend:
    def __init__(
        self, trt: TRT, manifest: Manifest, plan: bytes, output_name: str, cuda_graphs: bool, device: str
    ) -> None:
        from serve_app.backends import cuda_runtime as cr

        self._cr = cr
        self._trt = trt
        self.output_name = output_name
        self._logger = trt.logger()
        self._runtime: trt_types.Runtime = trt.module.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise _backend_unavailable("TensorRT could not deserialize the engine (see its log)")
        self._engine: trt_types.ICudaEngine = engine
        self._plan_bytes = len(plan)  # weights live on the device: the plan size bounds them
        out = next(t for t in manifest.io if t.mode == "output")
        self._width = int(out.shape[-1])
        self._cuda_graphs = cuda_graphs
        self._pools: dict[int, queue.Queue[_Slot]] = {}
        self._slots: list[_Slot] = []
        for p in manifest.profiles:
            slot = self._make_slot(p)
            self._slots.append(slot)
            self._pools.setdefault(p.bucket, queue.Queue()).put(slot)
        self.info = BackendInfo(
            name="tensorrt",
            device=device,
            precision=manifest.precision,
            fixed_shapes=True,
            processor=Processor.GPU,
            concurrency=len(self._slots),  # contexts are pooled per bucket: a busy bucket blocks only itself
            extra={
                "flavor": f"{manifest.flavor} {manifest.tensorrt_version}",
                "engine_sha256": manifest.plan_sha256[:16],
                "contexts": len(self._slots),
                "cuda_graphs": cuda_graphs,
                "device_memory_bytes": self.device_memory_bytes(),
            },
        )

    def _make_slot(self, p: Profile) -> _Slot:
        cr = self._cr
        context = self._engine.create_execution_context()
        stream = cr.Stream()
        context.set_optimization_profile_async(p.index, stream.ptr)
        max_b, length = p.max
        host_in = {n: cr.PinnedBuffer((max_b, length), np.dtype(np.int64)) for n in INPUTS}
        dev_in = {n: cr.DeviceBuffer(host_in[n].nbytes) for n in INPUTS}
        host_out = cr.PinnedBuffer((max_b, self._width), np.dtype(np.float32))
        dev_out = cr.DeviceBuffer(host_out.nbytes)
        for n in INPUTS:
            context.set_tensor_address(n, dev_in[n].ptr)
        context.set_tensor_address(self.output_name, dev_out.ptr)
        stream.synchronize()
        return _Slot(context, p, stream, host_in, dev_in, host_out, dev_out)

    def device_memory_bytes(self) -> int:
        """Activations of every context plus the I/O buffers (weights are counted by the caller)."""
        per_profile = sum(int(self._engine.get_device_memory_size_for_profile_v2(s.profile.index)) for s in self._slots)
        buffers = sum(s.dev_out.nbytes + sum(b.nbytes for b in s.dev_in.values()) for s in self._slots)
        return per_profile + buffers

    def gpu_memory(self) -> tuple[int, int] | None:
        """Contexts' activations and I/O buffers, plus the weights (bounded by the plan's size)."""
        return self.device_memory_bytes() + self._plan_bytes, self._cr.mem_info()[1]

    def _enqueue(self, slot: _Slot, rows: int, length: int) -> None:
        for n in INPUTS:
            slot.context.set_input_shape(n, (rows, length))
        graph = slot.graphs.get(rows)
        if graph is not None:
            graph.launch(slot.stream)
        elif not slot.context.execute_async_v3(slot.stream.ptr):
            raise RuntimeError(f"execute_async_v3 failed for shape ({rows}, {length})")

    def infer(self, batch: PaddedBatch) -> np.ndarray:
        rows, length = batch.shape
        pool = self._pools[length]
        slot = pool.get()  # blocks only while every context of this bucket is busy
        try:
            feeds = batch.feeds()
            for n in INPUTS:
                host = slot.host_in[n].array
                view = host.reshape(-1)[: rows * length].reshape(rows, length)  # contiguous prefix
                view[...] = feeds[n]
                slot.stream.h2d(slot.dev_in[n], slot.host_in[n], view.nbytes)
            self._enqueue(slot, rows, length)
            out_bytes = rows * self._width * 4
            slot.stream.d2h(slot.host_out, slot.dev_out, out_bytes)
            slot.stream.synchronize()
            flat = slot.host_out.array.reshape(-1)[: rows * self._width]
            return flat.reshape(rows, self._width)[: batch.rows].copy()
        finally:
            pool.put(slot)

    def warmup(self, shapes: list[tuple[int, int]]) -> None:
        """Run every shape once on every context; then capture it as a CUDA graph."""
        for rows, length in shapes:
            for slot in [s for s in self._slots if s.profile.bucket == length]:
                if rows > slot.profile.max[0]:
                    continue
                for n in INPUTS:
                    slot.host_in[n].array[...] = 0
                self._enqueue(slot, rows, length)
                slot.stream.synchronize()
                if self._cuda_graphs and rows not in slot.graphs:
                    slot.stream.begin_capture()
                    self._enqueue(slot, rows, length)
                    slot.graphs[rows] = slot.stream.end_capture()

    def close(self) -> None:
        for s in self._slots:
            s.stream.synchronize()
            for g in s.graphs.values():
                g.destroy()
            for b in [*s.host_in.values(), *s.dev_in.values(), s.host_out, s.dev_out]:
                b.free()
            s.stream.destroy()
            del s.context
        self._slots.clear()
        self._pools.clear()
        del self._engine


def load_tensorrt_backend(art: ModelArtifacts, cfg: ModelServingConfig) -> TensorRTBackend:
    """The engine for this model, precision and GPU, or BackendUnavailable saying why not."""
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as e:
        raise _backend_unavailable(str(e)) from None
    precision = cfg.backend.precision
    directory = engine_dir(art.directory, precision)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise _backend_unavailable(
            f"no {precision} engine for {art.name} {art.version} "
            f"(python -m serve_app.engine build --precision {precision})"
        )
    try:
        from serve_app.backends import cuda_runtime as cr
    except ImportError as e:
        raise _backend_unavailable(f"cuda-python is not installed ({e})") from None
    if cr.device_count() == 0:
        raise _backend_unavailable("no CUDA GPU visible")
    name, major, minor = cr.device_name_and_cc(0)
    manifest = Manifest.read(manifest_path)
    plan_path = Path(directory / manifest.plan_file)
    try:
        check_compatible(manifest, plan_path, trt.flavor, trt.version, compute_capability_name(major, minor))
    except EngineRefused as e:
        raise _backend_unavailable(str(e)) from None
    return TensorRTBackend(
        trt, manifest, plan_path.read_bytes(), art.output_name, cfg.backend.cuda_graphs, f"cuda:0 ({name})"
    )
