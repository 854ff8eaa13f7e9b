"""How the ingress reaches a model: through a Serve handle (own deployment) or in its own process.

Both expose the same awaitable methods, so the ingress, its admission control and the API code do
not know where a model runs. In-process placement removes the actor hop (pickling, routing, a second
process) that costs more than the model on a small CPU machine; own deployments are what fractional
GPUs, per-model autoscaling and engine hot swap per replica need.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from ray.serve.handle import DeploymentHandle

from serve_app.batching.coalescer import Coalescer
from serve_app.deployments.encoder import Classified, ClassifyCall, RankCall, Ranked


class ModelClient(Protocol):
    async def info(self) -> dict[str, Any]: ...


class RankerClient(ModelClient, Protocol):
    async def score(self, call: RankCall) -> Ranked: ...


class IntentClient(ModelClient, Protocol):
    async def classify(self, call: ClassifyCall) -> Classified: ...


C = TypeVar("C")
R = TypeVar("R")


class RemoteModel(Generic[C, R]):
    """A model deployment through its handle; concurrent requests share calls (``Coalescer``)."""

    def __init__(self, handle: DeploymentHandle, calls_in_flight: int) -> None:
        self._handle = handle
        self.calls: Coalescer[C, R] = Coalescer(self._send, calls_in_flight)

    async def _send(self, calls: list[C]) -> list[R]:
        """One call of the deployment's method that answers several requests at once."""
        raise NotImplementedError

    async def info(self) -> dict[str, Any]:
        return dict(await self._handle.info.remote())


class RemoteRanker(RemoteModel[RankCall, Ranked]):
    async def _send(self, calls: list[RankCall]) -> list[Ranked]:
        return list(await self._handle.score_many.remote(calls))

    async def score(self, call: RankCall) -> Ranked:
        return await self.calls.call(call)


class RemoteIntent(RemoteModel[ClassifyCall, Classified]):
    async def _send(self, calls: list[ClassifyCall]) -> list[Classified]:
        return list(await self._handle.classify_many.remote(calls))

    async def classify(self, call: ClassifyCall) -> Classified:
        return await self.calls.call(call)
