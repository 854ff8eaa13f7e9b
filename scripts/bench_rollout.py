"""Model swap under load, timed: load + warm-up of the new version, the cut-over, and p99 during the swap.

    python scripts/bench_rollout.py                                 # 2 model deployments, CPU, default model
    python scripts/bench_rollout.py --placement ingress --out DIR   # the laptop default (models in the ingress)

Each step is deployed as ``serve deploy`` deploys a file (declaratively, the same import path and runtime env:
only ``user_config`` changes), so the replicas are reconfigured in place, as in production.
A local Ray Serve app on loopback serves ``/v1/rerank`` (a query and 20 short documents) to ``--callers``
closed-loop clients. After ``--steady-s`` seconds it registers version 2 (the same weights under a new label:
a real load, warm-up and probe check) and routes to it (canary 100 % then promote, one ``serve deploy``), then
rolls back to version 1 (still loaded). Reported, from the clients' side and from ``/v1/models``:

- ``load_warmup_s``: the new version's artifacts + backend + warm-up + probe check, as its replica measured it;
- ``deploy_to_first_new_s``: from the deploy call to the first answer by the new version;
- ``cut_over_s``: from the first answer by the new version to the last answer by the old one (both serve);
- ``p99_swap_ms`` / ``p99_steady_ms``: answers sent between the deploy call and the switch's end, against the
  steady state before; failed requests by status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from serve_app.config import AppConfig, DeploymentScaling, load_config
from serve_app.rollout import commands

PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
BODY = {
    "query": "does vitamin d reduce the risk of respiratory infections",
    "documents": [f"Document {i}: vitamin D, infections and trials, with a few more words to read." for i in range(20)],
}


def _deploy(cfg: AppConfig, config_file: Path) -> None:
    """What ``serve deploy`` does with the file ``python -m serve_app.rollout`` writes: the same import path and
    runtime env each time, so only the deployments' ``user_config`` changes and Serve reconfigures in place."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve_app.graph import serve_deploy_config

    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    deploy = serve_deploy_config(cfg, str(config_file), port=PORT)
    deploy["http_options"]["host"] = "127.0.0.1"
    client = _get_global_client()
    assert client is not None
    client.deploy_apps(ServeDeploySchema.model_validate(deploy))


def _models() -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{URL}/v1/models", timeout=30).json()["models"]
    return {m["version"]: m for m in data if m["task"] == "rerank"}


def _serving(version: str) -> bool:
    m = _models().get(version)
    return m is not None and m["state"] == "ready" and m["role"] == "serving"


async def _load(
    callers: int, stop: threading.Event, refused: Counter[str]
) -> list[tuple[float, float, int, str | None]]:
    out: list[tuple[float, float, int, str | None]] = []
    async with httpx.AsyncClient(base_url=URL, timeout=120) as client:

        async def caller() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = await client.post("/v1/rerank", json=BODY)
                    out.append((t0, time.monotonic(), r.status_code, r.headers.get("x-model-version")))
                    if r.status_code != 200:
                        refused[f"{r.status_code} {r.json().get('error_type')}"] += 1
                except httpx.HTTPError:
                    out.append((t0, time.monotonic(), 0, None))

        await asyncio.gather(*(caller() for _ in range(callers)))
    return out


def _p(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None


def _switch(answers: list[tuple[float, float, int, str | None]], t_deploy: float, t_done: float, t_next: float,
            old: str, new: str, steady: tuple[float, float]) -> dict[str, Any]:  # fmt: skip
    """One switch's figures from the answers sent between its deploy call and the next one (``t_next``)."""
    during = [b - a for a, b, s, _ in answers if t_deploy <= a <= t_done]
    before = [b - a for a, b, s, _ in answers if steady[0] <= a < steady[1]]
    mine = [(a, b, v) for a, b, s, v in answers if t_deploy <= a < t_next and v]
    first_new = min((b for a, b, v in mine if v.endswith(f"/{new}")), default=None)
    last_old = max((b for a, b, v in mine if v.endswith(f"/{old}")), default=None)
    slowest = sorted(((b - a, a - t_deploy) for a, b, s, _ in answers if t_deploy <= a <= t_done), reverse=True)[:5]
    return {
        # when the slowest requests of the switch were sent (seconds after the deploy call), and how long they took
        "slowest": [{"sent_after_deploy_s": round(at, 3), "seconds": round(d, 3)} for d, at in slowest],
        "deploy_to_first_new_s": None if first_new is None else round(first_new - t_deploy, 3),
        "cut_over_s": None if first_new is None or last_old is None else round(max(0.0, last_old - first_new), 3),
        "switch_done_s": round(t_done - t_deploy, 3),
        "requests_during": len(during),
        "p50_swap_ms": _p(during, 50),
        "p99_swap_ms": _p(during, 99),
        "max_swap_ms": _p(during, 100),
        "p50_steady_ms": _p(before, 50),
        "p99_steady_ms": _p(before, 99),
        "p99_ratio": None if not during or not before else round(_p(during, 99) / _p(before, 99), 2),  # type: ignore[operator]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--placement", choices=["deployments", "ingress"], default="deployments")
    ap.add_argument("--callers", type=int, default=4)
    ap.add_argument("--steady-s", type=float, default=10.0)
    ap.add_argument("--num-gpus", type=float, default=0.0, help="per model replica (GPU run: 0.25)")
    ap.add_argument("--out", type=Path, default=Path("scripts/results/rollout"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from serve_app.api.readiness import wait_ready
    from serve_app.deployments.ray_runtime import apply_ray_env

    base = load_config()
    apply_ray_env(base.ray_serve)
    light = DeploymentScaling(num_cpus=0.25, max_ongoing_requests=256, max_queued_requests=512)
    model = DeploymentScaling(num_cpus=0.5, num_gpus=args.num_gpus)
    scaling = {"ingress": light, "ranker": model, "intent": model}
    base = base.model_copy(update={"model_placement": args.placement, "scaling": scaling})
    data = base.model_dump(mode="json")
    data["models"].append({**data["models"][0], "version": "2"})
    registered = AppConfig.model_validate(data)
    v1 = base
    v2 = commands.promote(commands.canary(registered, "rerank", "2", 100), "rerank")
    back = commands.rollback(v2, "rerank")

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    args.out.mkdir(parents=True, exist_ok=True)
    config_file = (args.out / "app-config.yaml").resolve()
    _deploy(v1, config_file)
    wait_ready(URL)
    stop = threading.Event()
    result: list[Any] = []
    refused: Counter[str] = Counter()
    runner = threading.Thread(target=lambda: result.append(asyncio.run(_load(args.callers, stop, refused))))
    t_start = time.monotonic()
    runner.start()
    time.sleep(args.steady_s)
    steady = (t_start + 2, time.monotonic())
    timeline: dict[str, float] = {}
    for name, cfg, version in (("to_v2", v2, "2"), ("rollback", back, "1")):
        timeline[f"{name}_deploy"] = time.monotonic()
        _deploy(cfg, config_file)
        while not _serving(version):
            time.sleep(0.2)
        time.sleep(1.5)  # redirects learnt while the version loaded lapse (router.redirect_s)
        timeline[f"{name}_done"] = time.monotonic()
        time.sleep(5)
    load_s = _models()["2"].get("load_seconds")
    backends = {v: f"{m.get('backend')} {m.get('precision')} {m.get('device')}" for v, m in _models().items()}
    stop.set()
    runner.join()
    answers = result[0]
    report = {
        "placement": args.placement,
        "backends": backends,
        "callers": args.callers,
        "requests": len(answers),
        "failed": dict(refused),  # by status and error type (503 overloaded: admission control)
        "load_warmup_s": load_s,
        "to_v2": _switch(
            answers, timeline["to_v2_deploy"], timeline["to_v2_done"], timeline["rollback_deploy"], "1", "2", steady
        ),
        "rollback": _switch(
            answers, timeline["rollback_deploy"], timeline["rollback_done"], float("inf"), "2", "1", steady
        ),
    }
    serve.shutdown()
    ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rollout-{args.placement}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
