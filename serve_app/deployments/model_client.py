"""How the ingress reaches a model: through a Serve handle (own deployment) or in its own process.

Both expose the same awaitable methods, so the ingress, its admission control and the API code do
not know where a model runs. In-process placement removes the actor hop (pickling, routing, a second
process) that costs more than the model on a small CPU machine; own deployments are what fractional
GPUs, per-model autoscaling and engine hot swap per replica need.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from ray.serve.handle import DeploymentHandle

from serve_app.core.sequences import Sequences


class ModelClient(Protocol):
    async def info(self) -> dict[str, Any]: ...


class RankerClient(ModelClient, Protocol):
    async def score(self, seqs: Sequences, pairs: bool, raw_scores: bool) -> np.ndarray: ...


class IntentClient(ModelClient, Protocol):
    async def classify(self, seqs: Sequences, top_k: int) -> tuple[list[list[str]], np.ndarray]: ...


class _Remote:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def info(self) -> dict[str, Any]:
        return dict(await self._handle.info.remote())


class RemoteRanker(_Remote):
    async def score(self, seqs: Sequences, pairs: bool, raw_scores: bool) -> np.ndarray:
        return np.asarray(await self._handle.score.remote(seqs, pairs, raw_scores))


class RemoteIntent(_Remote):
    async def classify(self, seqs: Sequences, top_k: int) -> tuple[list[list[str]], np.ndarray]:
        labels, probs = await self._handle.classify.remote(seqs, top_k)
        return labels, probs
