"""Waiting for a started service: what scripts, tests and deploy automation poll before sending traffic."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def wait_ready(
    url: str, timeout_s: float = 240.0, path: str = "/ready", alive: Callable[[], bool] | None = None
) -> None:
    """Poll ``GET {url}{path}`` until it answers 200 (here: every model loaded and warmed up). ``alive``: a
    server this process started; once it says False, waiting is over (its exit is the error, not a timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"{url}: the server exited before it was ready")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")
