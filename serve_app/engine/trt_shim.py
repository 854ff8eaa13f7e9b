"""One small shim over the two TensorRT flavors: datacenter ``tensorrt`` (10.x/11.x) and ``tensorrt_rtx``.

Both expose the same class names (Builder, OnnxParser, Runtime, ICudaEngine, ...); they differ in a few
places handled here: how targets are named (a GPU's compute capability vs. ahead-of-time targets),
timing caches (no-ops on RTX), and whether precision flags still exist (10.x only; 11.x and RTX are
strongly typed, so precision comes from the ONNX graph).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

Flavor = Literal["tensorrt", "tensorrt_rtx"]

# import names tried in order; the RTX wheel's module is ``tensorrt_rtx`` in some releases and
# ``tensorrt_rtx_bindings`` (with the libraries in ``tensorrt_rtx_libs``) in the PyPI wheels we use
_CANDIDATES: tuple[tuple[str, Flavor], ...] = (
    ("tensorrt", "tensorrt"),
    ("tensorrt_rtx", "tensorrt_rtx"),
    ("tensorrt_rtx_bindings", "tensorrt_rtx"),
)


class TensorRTUnavailable(ImportError):
    pass


@dataclass(frozen=True)
class TRT:
    """The imported module and what it is."""

    module: Any  # typed against tensorrt-stubs where installed; the RTX module has the same surface
    flavor: Flavor
    version: str

    @property
    def strongly_typed_only(self) -> bool:
        major = int(self.version.split(".")[0])
        return self.flavor == "tensorrt_rtx" or major >= 11

    def logger(self, verbose: bool = False) -> Any:
        trt = self.module
        return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)

    def network_flags(self) -> int:
        """STRONGLY_TYPED where the flavor knows the flag: harmless on 11/RTX, opt-in on 10.12+."""
        flags = 0
        creation = self.module.NetworkDefinitionCreationFlag
        if hasattr(creation, "STRONGLY_TYPED"):
            flags |= 1 << int(creation.STRONGLY_TYPED)
        return flags

    def set_targets(self, config: Any, targets: list[str]) -> list[str]:
        """RTX builds ahead of time for named compute capabilities (works with no GPU present).

        Datacenter TensorRT builds for the GPU it runs on; ``targets`` is then ignored and the
        caller records that GPU's compute capability instead.
        """
        if self.flavor != "tensorrt_rtx" or not targets:
            return []
        cc = self.module.ComputeCapability
        config.num_compute_capabilities = len(targets)
        for i, name in enumerate(targets):
            if not config.set_compute_capability(getattr(cc, name), i):
                raise ValueError(f"TensorRT-RTX refused compute capability {name}")
        return list(targets)

    def supports_timing_cache(self) -> bool:
        return self.flavor == "tensorrt"


def import_tensorrt(prefer: Flavor | None = None) -> TRT:
    errors = []
    for name, flavor in _CANDIDATES:
        if prefer is not None and flavor != prefer:
            continue
        try:
            mod: ModuleType = importlib.import_module(name)
        except ImportError as e:  # includes the libraries' own load failures
            errors.append(f"{name}: {e}")
            continue
        if not hasattr(mod, "Builder"):  # a stub package without the real libraries
            errors.append(f"{name}: no Builder (stub package?)")
            continue
        return TRT(module=mod, flavor=flavor, version=str(mod.__version__))
    raise TensorRTUnavailable("no TensorRT flavor importable: " + "; ".join(errors))


def compute_capability_name(major: int, minor: int) -> str:
    """(8, 9) -> "SM89", the naming of manifests and of TensorRT-RTX targets."""
    return f"SM{major}{minor}"
