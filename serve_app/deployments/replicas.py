"""Whether a deployment has a replica that is alive and ready: its replica actors asked directly, and its
controller's view.

A request through the deployment's handle cannot tell a dead deployment from a busy one: with every
replica at ``max_ongoing_requests`` it waits in Serve's router, exactly as it does when no replica is
left. So liveness is asked outside the request path: Serve names each replica actor
``SERVE_REPLICA::<app>#<deployment>#<id>`` in its namespace (a dead one's name is released within
0.1 s of a process kill), and each answers ``was_initialized`` on its own event loop, not behind the
requests it is computing. A replica lost with its node answers nothing: the bounded wait decides.

This leans on two Serve internals (the name prefix and ``was_initialized``, present since Ray 2.60,
the floor in ``pyproject.toml``); the kill, node and scale tests exercise them on a real cluster.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
from ray.serve._private.constants import SERVE_NAMESPACE


def node_id() -> str:
    """The Ray node this process runs on: whose clock its timestamps are (``core.peer_clocks``); "" outside Ray."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def replica_id() -> str | None:
    """The Serve replica this runs in (for models in process: the ingress's); None outside Serve (unit tests)."""
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


@dataclass(frozen=True)
class DeploymentView:
    """What Serve's controller says of a deployment. It learns of a death seconds late (health checks), but
    it alone knows whether a replica has finished starting (constructor and ``reconfigure``: model loaded)."""

    serving: int  # replicas RUNNING, or UPDATING (reconfigured in place while they serve)
    draining: int  # replicas STOPPING: they take no new call but finish the ones they have
    changing: bool  # a deploy or a scale is under way: replicas are replaced or added on purpose


class ServeReplicas:
    """One deployment seen from outside its request queue: its replica actors, and its controller's view."""

    def __init__(self, app_name: str, deployment_name: str) -> None:
        self._app_name, self._deployment_name = app_name, deployment_name
        self._prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app_name}#{deployment_name}#"
        # its own thread: the default executor tokenizes, and under load its queue would delay the answer
        self._lookup = ThreadPoolExecutor(2, thread_name_prefix=f"replicas-{deployment_name}")

    def _actors(self) -> list[Any]:
        """Live (or starting) replica actors; blocking GCS calls, run off the event loop."""
        if not ray.is_initialized():
            return []
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(self._prefix)
        ]
        actors = []
        for name in names:
            try:
                actors.append(ray.get_actor(name, namespace=SERVE_NAMESPACE))
            except ValueError:  # released between the listing and the lookup: it died
                continue
        return actors

    async def any_ready(self, timeout_s: float) -> bool:
        """True as soon as one replica answers that it has initialized; False if none does within ``timeout_s``."""
        try:
            return await asyncio.wait_for(self._any_ready(), timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            return False

    async def _any_ready(self) -> bool:
        actors = await asyncio.get_running_loop().run_in_executor(self._lookup, self._actors)
        pending = {asyncio.ensure_future(a.was_initialized.remote()) for a in actors}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(not f.cancelled() and f.exception() is None and f.result() for f in done):
                    return True
            return False
        finally:
            for f in pending:
                f.cancel()

    async def controller_view(self, timeout_s: float) -> DeploymentView | None:
        """The deployment as Serve's controller reports it; ``None`` if it did not answer in time."""
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._lookup, self._view), timeout_s
            )
        except (TimeoutError, asyncio.TimeoutError):
            return None

    def _view(self) -> DeploymentView | None:
        if not ray.is_initialized():
            return None
        try:
            deployment = serve.status().applications[self._app_name].deployments[self._deployment_name]
        except Exception:  # no such app or deployment (being deleted), or the controller failed to answer
            return None
        states = {str(getattr(k, "value", k)): int(n) for k, n in deployment.replica_states.items()}
        status = str(getattr(deployment.status, "value", deployment.status))
        return DeploymentView(
            serving=states.get("RUNNING", 0) + states.get("UPDATING", 0),
            draining=states.get("STOPPING", 0),
            changing=status in {"UPDATING", "UPSCALING", "DOWNSCALING"},
        )
