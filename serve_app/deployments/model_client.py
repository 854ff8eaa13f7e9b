"""How the ingress reaches a model: through a Serve handle (own deployment) or in its own process.

Both expose the same awaitable methods, so the ingress, its admission control and the API code do
not know where a model runs. In-process placement removes the actor hop (pickling, routing, a second
process) that costs more than the model on a small CPU machine; own deployments are what fractional
GPUs, per-model autoscaling and engine hot swap per replica need.

A model replica can die under load (a node lost, an out-of-memory kill). Scoring is idempotent, so a
call lost with its replica is sent once more: Serve's router has already struck the dead replica, so
the retry lands on another. Serve's router also re-routes by itself a call that had not yet been
accepted, and with no replica left it holds the call until a replacement has started (measured: 10.6 s
on the 2-core machine). So a call that has not answered within its stall time asks whether any
replica is alive and initialized, bounded in time (``ServeReplicas``: outside the request queue, so a
replica that is merely busy, with its queue full, still counts as alive): with none, the call (and every
call until one is) is refused at once as ``ModelUnavailable`` (503) instead of waiting for the replacement.
It is up again when a replica is alive and a cheap ``info`` call through the handle is answered (with our
calls refused meanwhile, that call queues only behind other ingresses' work).

The controller's view is asked at the same time. While it reports a deploy or a scale (``UPDATING``,
``UPSCALING``, ``DOWNSCALING``), replicas are replaced on purpose and calls wait for them, as before
fail-fast existed (a replica loading a model can also be too starved to answer in time). Otherwise the
model is down when no replica is RUNNING (or UPDATING in place) or STOPPING (a replaced replica finishes
the calls it has): a replacement after a failure answers from its constructor, before ``reconfigure`` has
loaded the model. Else it is down when no actor answers: the controller learns of a death seconds late.

The stall time is ``stall_after_s`` or, for a model whose calls are slow, ``stall_factor`` times its typical
call, at most ``stall_cap_s``. A probe costs the ingress milliseconds of CPU (Serve's status, actor lookups),
and with a fixed 0.5 s every call of a slow model (ONNX Runtime on CPU: ~0.9 s per re-rank call) probed once
or twice: ingress CPU per request 18.7-21.2 ms with it, 9.4-9.6 ms without (2 cores, production layout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Generic, Protocol, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.batching.coalescer import Coalescer
from serve_app.core.backend import DeadlineExceeded, ModelUnavailable, StartedLate, refuses_late
from serve_app.deployments.encoder import Classified, ClassifyCall, RankCall, Ranked
from serve_app.deployments.replicas import ServeReplicas, node_id

log = logging.getLogger("ray.serve")


class ModelClient(Protocol):
    async def info(self) -> dict[str, Any]: ...


class RankerClient(ModelClient, Protocol):
    async def score(self, call: RankCall) -> Ranked: ...


class IntentClient(ModelClient, Protocol):
    async def classify(self, call: ClassifyCall) -> Classified: ...


class _Startable(Protocol):
    @property
    def start_by(self) -> float: ...  # time.time() by which it must start computing under overload, or inf


C = TypeVar("C", bound=_Startable)
R = TypeVar("R")


def never() -> bool:
    return False


class RemoteModel(Generic[C, R]):
    """A model deployment through its handle; concurrent requests share calls (``Coalescer``)."""

    probe_timeout_s = 1.0  # a live replica answers in milliseconds, even while it computes
    probe_every_s = 0.5  # while no replica is live: how often to ask again
    stall_after_s = 0.5  # a call slower than its stall time checks that a replica is alive (and again every as long)
    stall_factor = 4.0  # the stall time: this many typical calls, at least stall_after_s, at most stall_cap_s
    stall_cap_s = 2.0
    call_time_smoothing = 0.2  # weight of the newest answered call in the typical call time

    def __init__(self, handle: DeploymentHandle, calls_in_flight: int, name: str) -> None:
        """``name``: the deployment's, for logs and errors."""
        self._handle = handle
        self.name = name
        self._node = node_id()
        self.calls: Coalescer[C, R] = Coalescer(self._send_with_retry, calls_in_flight, limit=self)
        # whether start-by times are held to now (the ingress's admission: ``Admission.holds_start_by``)
        self.holds_start_by: Callable[[], bool] = never
        self.late_refusal_s = 0.0  # how long past its start-by time a request is still refused (the config's)
        self._replicas = ServeReplicas(handle.app_name, handle.deployment_name)
        self._probe: asyncio.Task[bool] | None = None  # running: whether a replica answers
        self._down = False  # the last probe found no live replica; a recovery loop is asking again
        self._recovery: asyncio.Task[None] | None = None
        self.replica_failures = 0  # calls lost with their replica
        self.retries = 0
        self.typical_call_s = 0.0  # smoothed time of an answered call, 0 until the first

    # the coalescer's ``StartLimit``: a request waiting for a call slot past its start-by time, under overload,
    # is refused then (it would only start later still)
    def start_by(self, item: C) -> float:
        return item.start_by

    def refuses_late(self, item: C, now: float) -> bool:
        return refuses_late(item.start_by, now, self.late_refusal_s)

    def held(self) -> bool:
        return self.holds_start_by()

    def refusal(self) -> BaseException:
        return StartedLate()

    def use_handle(self, handle: DeploymentHandle) -> None:
        """Send the next calls through ``handle``: the same deployment with other options (its transport).
        Calls already sent finish on the handle they went out on."""
        self._handle = handle

    def stall_s(self) -> float:
        """How long a call may go unanswered before it checks that a replica is alive."""
        return min(self.stall_cap_s, max(self.stall_after_s, self.stall_factor * self.typical_call_s))

    def _answered_in(self, seconds: float) -> None:
        a = self.call_time_smoothing
        self.typical_call_s = seconds if self.typical_call_s == 0 else a * seconds + (1 - a) * self.typical_call_s

    async def _send(self, calls: list[C]) -> list[R | DeadlineExceeded]:
        """One call of the deployment's method that answers several requests at once."""
        raise NotImplementedError

    def _sent(self) -> tuple[str, float]:
        """This node and the time by its clock, for the calls about to leave (their ``sent_from``, ``sent_at``):
        the replica reads their deadlines and start-by times with it (``core.peer_clocks``), whatever its own
        node's clock says."""
        return self._node, time.time()

    async def _send_with_retry(self, calls: list[C]) -> list[R | DeadlineExceeded]:
        await self._check_live()
        try:
            return await self._send_watched(calls)
        except RayActorError:  # the replica died (or is unreachable) with the call: scoring is idempotent
            self.replica_failures += 1
            log.warning("a %s replica was lost with a call of %d requests; retrying once", self.name, len(calls))
            self._start_probe()
            await self._check_live()
            self.retries += 1
            return await self._send_watched(calls)

    async def _send_watched(self, calls: list[C]) -> list[R | DeadlineExceeded]:
        """``_send``, abandoned (and refused) if it stalls while no replica answers a probe."""
        started = time.monotonic()
        sending = asyncio.get_running_loop().create_task(self._send(calls))
        try:
            while True:
                done, _ = await asyncio.wait({sending}, timeout=self.stall_s())
                if done:
                    result = sending.result()
                    self._answered_in(time.monotonic() - started)
                    return result
                self._start_probe()
                await self._check_live()  # raises ModelUnavailable if no replica answers
        finally:
            sending.cancel()  # a no-op once done; else the call stops waiting in Serve's router

    async def _check_live(self) -> None:
        """Pass at once when healthy; during a probe wait for its answer; raise while no replica is live."""
        if self._probe is not None:
            await asyncio.shield(self._probe)
        if self._down:
            raise ModelUnavailable(self.name)

    def _start_probe(self) -> None:
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._run_probe())

    async def _run_probe(self) -> bool:
        try:
            answers, view = await asyncio.gather(self._answers(), self._replicas.controller_view(self.probe_timeout_s))
            if view is not None and view.changing:
                alive = True  # a deploy or a scale replaces or adds replicas on purpose: calls wait for them
            elif view is not None and view.serving == view.draining == 0:
                alive = False  # a failure being repaired: replacements may answer, none has loaded its model
            else:
                alive = answers
            if not alive and not self._down:
                self._down = True
                log.warning(
                    "no live %s replica (actors answered: %s; controller: %s): refusing its calls",
                    self.name,
                    answers,
                    view,
                )
                self._recovery = asyncio.get_running_loop().create_task(self._recover())  # held: loops keep weak refs
            return alive
        finally:
            self._probe = None

    async def _answers(self) -> bool:
        return await self._replicas.any_ready(self.probe_timeout_s)

    async def _serves(self) -> bool:
        """A request through the handle is answered: the router knows a replica and its model is loaded
        (a replacement says it has initialized before its ``reconfigure`` has loaded the model)."""
        try:
            await asyncio.wait_for(self._handle.info.remote(), self.probe_timeout_s)
        except BackPressureError:  # queue full (other ingresses' calls): it serves
            return True
        except (TimeoutError, asyncio.TimeoutError, RayActorError):
            return False
        return True

    async def _recover(self) -> None:
        # while down no call of ours is queued, so the handle's probe waits only for a replica able to serve
        while not (await self._answers() and await self._serves()):
            await asyncio.sleep(self.probe_every_s)
        self._down = False
        log.warning("%s answers again", self.name)

    @property
    def available(self) -> bool:
        return not self._down

    async def info(self) -> dict[str, Any]:
        return dict(await self._handle.info.remote())


class RemoteRanker(RemoteModel[RankCall, Ranked]):
    async def _send(self, calls: list[RankCall]) -> list[Ranked | DeadlineExceeded]:
        node, at = self._sent()
        stamped = [replace(c, sent_from=node, sent_at=at) for c in calls]
        return list(await self._handle.score_many.remote(stamped))

    async def score(self, call: RankCall) -> Ranked:
        r, slot_s = await self.calls.call_timed(call)
        return Ranked(r.values, r.version, r.timing.after_slot(slot_s))


class RemoteIntent(RemoteModel[ClassifyCall, Classified]):
    async def _send(self, calls: list[ClassifyCall]) -> list[Classified | DeadlineExceeded]:
        node, at = self._sent()
        stamped = [replace(c, sent_from=node, sent_at=at) for c in calls]
        return list(await self._handle.classify_many.remote(stamped))

    async def classify(self, call: ClassifyCall) -> Classified:
        c, slot_s = await self.calls.call_timed(call)
        return Classified(c.labels, c.scores, c.version, c.timing.after_slot(slot_s))
