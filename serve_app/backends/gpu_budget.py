"""Fractional GPUs share one card with no isolation: each replica checks that it fits its share.

Ray's ``num_gpus: 0.25`` is bookkeeping only; four replicas land on one card, each with its own CUDA
context, and nothing stops one from taking the whole card. So after warm-up (when every bucket's
buffers, graphs and workspaces exist) a replica measures what it holds and refuses to serve if that
exceeds its fraction of the card minus a margin, with a message that says which knob to turn.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


class GpuBudgetExceeded(RuntimeError):
    pass


@dataclass(frozen=True)
class GpuBudget:
    fraction: float  # the replica's num_gpus
    total_bytes: int  # the card's memory
    used_bytes: int  # what this replica's process holds on the card
    margin: float  # share of the budget kept free for fragmentation and peaks

    @property
    def budget_bytes(self) -> int:
        return int(self.fraction * self.total_bytes * (1.0 - self.margin))

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "budget_bytes": self.budget_bytes,
            "used_mib": round(self.used_bytes / 2**20, 1),
            "budget_mib": round(self.budget_bytes / 2**20, 1),
        }


def check_budget(fraction: float, total_bytes: int, used_bytes: int, margin: float) -> GpuBudget:
    budget = GpuBudget(fraction, total_bytes, used_bytes, margin)
    if used_bytes > budget.budget_bytes:
        raise GpuBudgetExceeded(
            f"this replica holds {used_bytes / 2**20:.0f} MiB of GPU memory but num_gpus={fraction:g} of a "
            f"{total_bytes / 2**30:.1f} GiB card leaves it {budget.budget_bytes / 2**20:.0f} MiB "
            f"({margin:.0%} kept free): raise num_gpus, lower batching.max_batch_size or the largest bucket, "
            "or use a smaller precision"
        )
    return budget


def process_gpu_bytes() -> int | None:
    """GPU memory held by this process (CUDA context included), from NVML; None where NVML is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    index = int(visible) if visible.isdigit() else 0  # NVML counts physical devices, not visible ones
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory is not None]
        return int(sum(mine)) if mine else None
    except pynvml.NVMLError:
        return None
