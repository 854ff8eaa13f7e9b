"""Ray Serve's throughput switches from the config, as environment defaults for a Ray started here."""

from __future__ import annotations

import os

from serve_app.config import RayServeRuntime
from serve_app.deployments.haproxy_launcher import haproxy_binary, haproxy_edits, install_launcher


def ray_env(runtime: RayServeRuntime) -> dict[str, str]:
    """The environment of a Ray that serves this config. Resending lost requests, HAProxy without its line
    per request, or shedding in HAProxy also writes the HAProxy launcher that adds their lines
    (``haproxy_launcher``) and points Ray at it."""
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if runtime.throughput_optimized else "0",
        # with actor calls too: a later config may turn gRPC on without restarting Ray
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(runtime.grpc_max_message_bytes),
    }
    binary = haproxy_binary()
    haproxy = runtime.haproxy == "on" or (runtime.haproxy == "auto" and binary is not None)
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if haproxy else "0"
    if not haproxy:
        return env
    if runtime.resend_lost_requests:
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = "conn-failure empty-response"
        env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"] = str(runtime.haproxy_bufsize)
        env["RAY_SERVE_HAPROXY_RETRIES"] = str(runtime.haproxy_retries)
    if not runtime.haproxy_request_log:  # Ray's per-request HAProxy metrics: a log line each, parsed in Python
        env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] = "0"
    edits = haproxy_edits(runtime)
    if edits and binary is not None:  # no binary here: Ray will fail to find one too, and say so
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(install_launcher(binary, edits))
    return env


def apply_ray_env(runtime: RayServeRuntime) -> dict[str, str]:
    """Set the switches unless already set; only a Ray started afterwards in this process tree sees them."""
    env = ray_env(runtime)  # once: it finds the haproxy binary and writes the launcher
    for name, value in env.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in env}
