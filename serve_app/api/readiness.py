"""Waiting for a started service: what scripts, tests and deploy automation poll before sending traffic."""

from __future__ import annotations

import time

import httpx


def wait_ready(url: str, timeout_s: float = 240.0) -> None:
    """Poll ``GET {url}/ready`` until it answers 200 (every model loaded and warmed up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")
