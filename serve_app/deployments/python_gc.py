"""Python's garbage collector in a serving process, set from the config (``python_gc``) by each replica."""

from __future__ import annotations

import gc

from serve_app.config import PythonGcConfig

PYTHON_DEFAULT = gc.get_threshold()  # as this process started (700, 10, 10)


def apply_python_gc(cfg: PythonGcConfig) -> None:
    """Collect the youngest generation every ``gen0_threshold`` net allocations (``None``: Python's own). The
    process is the replica's alone (one replica per Ray worker process), so this is a process setting."""
    gen0 = PYTHON_DEFAULT[0] if cfg.gen0_threshold is None else cfg.gen0_threshold
    gc.set_threshold(gen0, *PYTHON_DEFAULT[1:])
