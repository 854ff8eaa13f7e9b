"""The ``Ingress`` deployment: HTTP routes in, answers out; the Serve-facing shell around the request path.

It dispatches each request to its route (``dialects``: one module per client's shape), bounds it by its
deadline, and maps every failure to a JSON error: whatever a client can cause is a 4xx; a full downstream
queue or an admission refusal is a 503 with ``Retry-After`` at once (never a hang); nothing a client sends
produces a 500. The path the routes share (admit, tokenize, call the model) is ``pipeline.Pipeline``.

Where the models run is the config's ``model_placement``: their own deployments (handles passed in; GPUs,
per-model autoscaling) or this process (no handles; the laptop default, where an actor hop costs more than
the model). The ingress code is the same for both (``model_client``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, routes
from serve_app.api.auth import ApiKeys
from serve_app.api.routes import Route
from serve_app.config import AppConfig, AuthConfig, Task, env_api_keys
from serve_app.core.backend import DeadlineExceeded, ModelUnavailable, Overloaded, VersionNotReady
from serve_app.deployments.encoder import EncoderServer, Intent, Ranker
from serve_app.deployments.haproxy_launcher import launcher_stamps
from serve_app.deployments.ingress.dialects import cohere, native, openai, operations, tei
from serve_app.deployments.ingress.door import Door
from serve_app.deployments.ingress.pipeline import ModelCalls, Pipeline
from serve_app.deployments.ingress.trace import Trace
from serve_app.deployments.ingress.versions import Versions
from serve_app.deployments.model_client import RemoteIntent, RemoteModel, RemoteRanker
from serve_app.deployments.pauses import PROCESS_PAUSES
from serve_app.deployments.python_gc import apply_python_gc
from serve_app.deployments.telemetry import RefusalReason, ingress_metrics

log = logging.getLogger("ray.serve")
UNMATCHED = "unmatched"  # the route tag of requests to no route (keeps the metric's tag values bounded)
Handler = Callable[[Request, Trace], Awaitable[Response]]
RouteFunction = Callable[[Pipeline, Request, Trace], Awaitable[Response]]
ROUTE_FUNCTIONS: dict[Route, RouteFunction] = {
    routes.TEI_RERANK: tei.rerank,
    routes.TEI_EMBED: tei.embed,
    routes.TEI_PREDICT: tei.predict,
    routes.TEI_INFO: operations.tei_info,
    routes.COHERE_V1_RERANK: cohere.v1_rerank,
    routes.COHERE_V2_RERANK: cohere.v2_rerank,
    routes.OPENAI_EMBEDDINGS: openai.embeddings,
    routes.MODELS: operations.models,
    routes.CLASSIFY: native.classify,
    routes.SEARCH: native.search,
    routes.HEALTH: operations.health,
    routes.READY: operations.ready,
    routes.OPENAPI: operations.openapi_document,
    routes.DOCS: operations.docs,
}
assert set(ROUTE_FUNCTIONS) == set(routes.ALL), "every declared route has a handler"


class Ingress:
    """The HTTP deployment: each route admitted at the door, tokenized here, answered by the models."""

    def __init__(self, ranker: DeploymentHandle | None = None, intent: DeploymentHandle | None = None) -> None:
        # no handles: the models live in this process and reconfigure loads them (model_placement: ingress);
        # handles: reconfigure wraps them in clients that share calls between concurrent requests
        self._local: dict[Task, EncoderServer] = {}
        self._handles = (ranker, intent)
        self._metrics = ingress_metrics()
        self._door = Door()
        self._path = Pipeline(self._door, Versions(self._metrics))
        if ranker is None or intent is None:
            self._path.ranker, self._path.intent = local_ranker, local_intent = Ranker(), Intent()
            self._local = {"rerank": local_ranker, "classify": local_intent}
        self._keys = ApiKeys()
        self._routes: dict[tuple[str, str], tuple[Route, Handler]] = {
            (r.method, r.path): (r, functools.partial(f, self._path)) for r, f in ROUTE_FUNCTIONS.items()
        }
        self._paths = {r.path for r in routes.ALL}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(user_config)
        apply_python_gc(cfg.python_gc)
        PROCESS_PAUSES.watch()
        for task, server in self._local.items():  # in-process models: the first load before serving, later
            await server.reconfigure(cfg.task_serving(task).model_dump(mode="json"))  # ones in the background
        ranker, intent = self._handles
        path = self._path
        if ranker is not None and intent is not None:
            by_reference = not cfg.ray_serve.grpc_between_deployments  # Ray actor calls, or Serve's gRPC
            transport: ModelCalls = "actor" if by_reference else "grpc"
            new_transport = transport != path.model_calls  # the first config, or another transport
            if new_transport:
                ranker, intent = (h.options(_by_reference=by_reference) for h in (ranker, intent))
                if path.model_calls == "in_process":  # the first config: the clients are made once
                    path.ranker = RemoteRanker(ranker, cfg.batching.calls_in_flight, "Ranker")
                    path.intent = RemoteIntent(intent, cfg.batching.calls_in_flight, "Intent")
                path.model_calls = transport
            for task, client, handle in (("rerank", path.ranker, ranker), ("classify", path.intent, intent)):
                if isinstance(client, RemoteModel):
                    client.calls.max_in_flight = cfg.batching.calls_in_flight
                    client.holds_start_by = self._door.models[task].holds_start_by
                    client.late_refusal_s = cfg.batching.overload_late_refusal_s
                    if new_transport:  # every replica serves both transports
                        client.use_handle(handle)
        # HAProxy's stamp is there (and a client's replaced) only where our launcher runs it with its shedding
        # rules: asked of the environment this process has from Ray, not of the config (``haproxy: auto`` with no
        # binary, or a Ray started without the launcher, would read a caller's header as HAProxy's)
        path.configure(cfg, counts_arrival_wait=cfg.batching.count_wait_before_ingress and launcher_stamps())
        self._keys = ApiKeys(AuthConfig(api_keys=(*cfg.auth.api_keys, *env_api_keys())).api_keys)

    async def loaded(self) -> None:
        """In-process models: wait until their latest config is loaded (new versions load in the background)."""
        for server in self._local.values():
            await server.loaded()

    @property
    def cfg(self) -> AppConfig:
        return self._path.cfg

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # served under a route prefix
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        found = self._routes.get((request.method, path))
        route = found[0].path if found is not None else UNMATCHED
        trace = Trace(caller=request.headers.get("x-caller-id"), route=route)
        try:
            if found is None or not found[0].public:
                self._keys.check(request.headers.get("authorization"))  # before anything else is revealed
            timeout_s = trace.timeout_s = self._timeout_s(request)
            trace.deadline = time.time() + timeout_s
            try:
                response = await asyncio.wait_for(self._answer(request, path, route, found, trace), timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                response = errors.deadline_exceeded(timeout_s).response()
            finally:
                self._door.release(trace)
        except errors.ApiError as e:
            response = e.response()
        took = time.perf_counter() - started
        if trace.served and response.status_code == 200:  # which version answered, and where the time went
            response.headers["X-Model-Version"] = trace.header()
            response.raw_headers += trace.timing.raw_headers(took)
        model, version = trace.tags()
        self._metrics.request(route, response.status_code, model, version, took)
        return response

    async def _answer(
        self, request: Request, path: str, route: str, found: tuple[Route, Handler] | None, trace: Trace
    ) -> Response:
        refusal: RefusalReason | None = None
        try:
            if found is None:
                if path in self._paths:
                    raise errors.ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {path}")
                raise errors.ApiError(404, "not_found", f"no route {path}")
            return await found[1](request, trace)
        except errors.ApiError as e:
            if e.status == 503:
                refusal = RefusalReason.NOT_READY
            return e.response()
        except BackPressureError:
            refusal = RefusalReason.QUEUE_FULL
            return errors.overloaded().response()
        except Overloaded as e:
            refusal = RefusalReason.STARTED_LATE if e.started_late else RefusalReason.QUEUE_WAIT
            return errors.overloaded(e.retry_after_s, e.started_late).response()
        except DeadlineExceeded:
            return errors.deadline_exceeded(trace.timeout_s).response()
        except ModelUnavailable as e:
            refusal = RefusalReason.REPLICA_FAILED
            return errors.unavailable(str(e), e.retry_after_s).response()
        except VersionNotReady as e:  # the version it was sent to instead went too (a deploy under way)
            refusal = RefusalReason.NOT_READY
            return errors.unavailable(str(e)).response()
        except (RayActorError, RayTaskError) as e:
            if isinstance(e.cause if isinstance(e, RayTaskError) else None, BackPressureError):
                refusal = RefusalReason.QUEUE_FULL
                return errors.overloaded().response()
            log.exception("downstream replica failed")
            refusal = RefusalReason.REPLICA_FAILED
            return errors.unavailable("a model replica failed; retry").response()
        except Exception:  # a bug of ours: say so in JSON, keep serving
            log.exception("unhandled error on %s", path)
            return JSONResponse(errors.body("internal error", "internal_error"), status_code=500)
        finally:
            if refusal is not None:
                self._metrics.refused(route, refusal)

    # -- plumbing ---------------------------------------------------------------------------------

    def _timeout_s(self, request: Request) -> float:
        """The configured deadline, or a shorter one the client asked for in ``X-Request-Timeout-Ms``."""
        default = self.cfg.limits.request_timeout_s
        asked = request.headers.get("x-request-timeout-ms")
        if asked is None:
            return default
        try:
            ms = float(asked)
        except ValueError:
            ms = math.nan
        if not math.isfinite(ms) or ms <= 0:
            raise errors.ApiError(
                400, "invalid_request", "X-Request-Timeout-Ms: expected a positive number of milliseconds"
            )
        return min(default, ms / 1000)

    def check_health(self) -> None:
        for server in self._local.values():
            server.check_health()
