"""The routes for operators and their probes: ``/health``, ``/ready``, ``/v1/models`` (each version, where it
runs, what admission sees), TEI's ``/info``, and the OpenAPI document with its page."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.api import errors, openapi, routes, schemas
from serve_app.config import Task
from serve_app.deployments.ingress.dialects.responses import json_response
from serve_app.deployments.ingress.pipeline import Pipeline
from serve_app.deployments.ingress.trace import Trace
from serve_app.deployments.ingress.versions import TASKS
from serve_app.deployments.model_client import RemoteModel
from serve_app.deployments.pauses import PROCESS_PAUSES
from serve_app.deployments.replicas import replica_id


async def health(p: Pipeline, request: Request, trace: Trace) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(p: Pipeline, request: Request, trace: Trace) -> Response:
    try:
        infos = await _model_infos(p, timeout_s=5.0)
    except (TimeoutError, BackPressureError, RayActorError):
        infos = []
    is_ready = len(infos) == 2 and all(i.get("ready") for i in infos)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


async def models(p: Pipeline, request: Request, trace: Trace) -> Response:
    infos = await _infos_or_503(p)
    cards, versions = [], []
    for task, info in zip(TASKS, infos, strict=True):
        model = p.cfg.model_for(task)
        report = _version_report(p, task, info)
        versions += report
        cards.append(
            schemas.ModelCard(
                id=model.name, created=0, owned_by="serve-app", aliases=list(model.aliases), task=model.task,
                versions=[e["version"] for e in report if e["name"] == model.name],
            )
        )  # fmt: skip
    return json_response(schemas.ModelsResponse(data=cards, models=versions))


async def tei_info(p: Pipeline, request: Request, trace: Trace) -> Response:
    infos = await _infos_or_503(p)
    ranker, intent = (_version_report(p, task, info)[0] for task, info in zip(TASKS, infos, strict=True))
    b, limits = p.cfg.batching, p.cfg.limits
    serving = p.cfg.model_for("rerank")
    model_type: dict[str, Any] = (
        {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        if p.versions.specs[serving.key].pairs
        else {"embedding": {"pooling": "mean"}}
    )
    info = schemas.TeiInfo(
        model_id=serving.name,
        model_sha=ranker.get("digest"),
        model_dtype=str(ranker.get("precision", "float32")),
        model_type=model_type,
        max_concurrent_requests=p.cfg.scaling_for("ingress").max_ongoing_requests,
        max_input_length=int(ranker.get("max_length", b.buckets[-1])),
        max_batch_tokens=b.max_batch_tokens,
        max_batch_requests=None,
        max_client_batch_size=max(limits.max_inputs, limits.max_documents),
        auto_truncate=True,
        tokenization_workers=1,
        version="serve-app 0.1.0",
        models=[ranker, intent],
    )
    return json_response(info)


async def openapi_document(p: Pipeline, request: Request, trace: Trace) -> Response:
    return JSONResponse(openapi.document())


async def docs(p: Pipeline, request: Request, trace: Trace) -> Response:
    return openapi.docs_page(request.scope.get("root_path", "") + routes.OPENAPI.path)


async def _model_infos(p: Pipeline, timeout_s: float) -> list[dict[str, Any]]:
    calls = [p.ranker.info(), p.intent.info()]
    return list(await asyncio.wait_for(asyncio.gather(*calls), timeout=timeout_s))


async def _infos_or_503(p: Pipeline) -> list[dict[str, Any]]:
    try:
        return await _model_infos(p, timeout_s=10.0)
    except TimeoutError:
        raise errors.unavailable("model deployments did not answer in time") from None


def _version_report(p: Pipeline, task: Task, replica: dict[str, Any]) -> list[dict[str, Any]]:
    """``Versions.report``, and which ingress replica answered with its process's pauses (``pauses``)."""
    report = p.versions.report(task, replica, p.door.models[task])
    client = p.ranker if task == "rerank" else p.intent
    ingress = {
        "replica": replica_id(),
        "pauses": PROCESS_PAUSES.as_dict(),
        "haproxy_clock_base_ms": p.arrivals.bases_ms(),  # per HAProxy address (``ArrivalClock``)
        "model_calls": p.model_calls,
        # this model's calls from this replica: sent, the requests they carried, and those never sent
        "calls": client.calls.counts() if isinstance(client, RemoteModel) else None,
    }
    for entry in report:
        entry["ingress"] = ingress
    return report
