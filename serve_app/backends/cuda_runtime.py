"""The CUDA layer under the TensorRT backend, on cuda-python 13 (``cuda.bindings.runtime``).

Pinned host buffers and device buffers are allocated once for each context's largest shape; copies are
asynchronous on that context's own non-blocking stream; a fixed (batch slot x bucket) shape can be
captured as a CUDA graph and replayed. Every call's status is checked: cuda-python returns errors, it
does not raise them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cuda.bindings import runtime as cudart


class CudaError(RuntimeError):
    pass


def check(result: tuple[Any, ...]) -> Any:
    """Unwrap ``(err, value...)``; raise with the error's name when it is not cudaSuccess."""
    err, *rest = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise CudaError(f"CUDA error {int(err)}: {name.decode() if isinstance(name, bytes) else name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_count() -> int:
    err, n = cudart.cudaGetDeviceCount()
    return int(n) if err == cudart.cudaError_t.cudaSuccess else 0


def device_name_and_cc(device: int = 0) -> tuple[str, int, int]:
    props = check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").strip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, int(props.major), int(props.minor)


def mem_info() -> tuple[int, int]:
    """(free, total) bytes on the current device."""
    free, total = check(cudart.cudaMemGetInfo())
    return int(free), int(total)


@dataclass
class DeviceBuffer:
    nbytes: int
    ptr: int = 0

    def __post_init__(self) -> None:
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFree(self.ptr))
            self.ptr = 0


@dataclass
class PinnedBuffer:
    """Page-locked host memory (fast, truly asynchronous copies), viewed as a numpy array."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    ptr: int = 0
    array: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        nbytes = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        self.ptr = int(check(cudart.cudaMallocHost(nbytes)))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(memoryview(raw), dtype=self.dtype).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def free(self) -> None:
        if self.ptr:
            del self.array
            check(cudart.cudaFreeHost(self.ptr))
            self.ptr = 0


class Stream:
    def __init__(self) -> None:
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def h2d(self, dst: DeviceBuffer, src: PinnedBuffer, nbytes: int) -> None:
        check(
            cudart.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle)
        )

    def d2h(self, dst: PinnedBuffer, src: DeviceBuffer, nbytes: int) -> None:
        check(
            cudart.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle)
        )

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.handle))

    def begin_capture(self) -> None:
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(self.handle, mode))

    def end_capture(self) -> CudaGraph:
        graph = check(cudart.cudaStreamEndCapture(self.handle))
        return CudaGraph(graph)

    def destroy(self) -> None:
        check(cudart.cudaStreamDestroy(self.handle))


class CudaGraph:
    """A captured sequence of work on one stream, replayed with a single launch."""

    def __init__(self, graph: Any) -> None:
        self._graph = graph
        self._exec = check(cudart.cudaGraphInstantiate(graph, 0))

    def launch(self, stream: Stream) -> None:
        check(cudart.cudaGraphLaunch(self._exec, stream.handle))

    def destroy(self) -> None:
        check(cudart.cudaGraphExecDestroy(self._exec))
        check(cudart.cudaGraphDestroy(self._graph))
