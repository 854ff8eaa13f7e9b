"""Re-ranking and intent classification on Ray Serve; ``serve run serve_app:graph`` starts the default."""

from __future__ import annotations

from typing import Any

__all__ = ["graph"]


def __getattr__(name: str) -> Any:
    # built lazily so that importing serve_app.api or serve_app.engine does not import Ray
    if name == "graph":
        from serve_app.config import load_config
        from serve_app.deployments.ray_runtime import apply_ray_env
        from serve_app.graph import build_app

        cfg = load_config()
        apply_ray_env(cfg.ray_serve)  # `serve run` imports this before it starts Ray
        return build_app(cfg)
    raise AttributeError(name)
