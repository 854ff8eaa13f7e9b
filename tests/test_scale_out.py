"""Scale-out on a real Ray cluster (CPU, with one logical GPU): placement of fractional GPUs, autoscaling,
back-pressure, graceful scale-down, hot swap of the model; and the deploy files (serve, cluster)."""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from polling import wait_until

from serve_app.backends.gpu_budget import GpuBudgetExceeded, check_budget
from serve_app.config import AppConfig, DeploymentScaling, load_config

REPO = Path(__file__).resolve().parent.parent


# -- deploy files -------------------------------------------------------------------------------


def test_serve_config_is_generated_from_production_and_valid() -> None:
    import sys

    from ray.serve.schema import ServeDeploySchema

    sys.path.insert(0, str(REPO / "scripts"))
    from serve_config import render

    checked_in = (REPO / "serve_app/configs/serve.yaml").read_text()
    assert render("production") == checked_in, "run: python scripts/serve_config.py"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. look-back <= metrics interval
        schema = ServeDeploySchema.model_validate(yaml.safe_load(checked_in))
    (app,) = schema.applications
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "Ranker", "Intent"}  # the ingress tokenizes: one hop to a model
    ranker = deployments["Ranker"]
    assert ranker.ray_actor_options.num_gpus == 0.25
    assert isinstance(ranker.autoscaling_config, dict) and ranker.autoscaling_config["min_replicas"] >= 1
    # the model deployments' targets count the ingress's coalesced calls, not requests:
    # test_production_models_can_scale_out_with_the_ingress_at_its_minimum checks they can be reached
    for d in deployments.values():
        assert d.logging_config.enable_access_log is False  # no log line per request on the hot path


def test_cluster_yaml_validates_against_rays_schema() -> None:
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    gpu_types = {k: v for k, v in cluster["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}
    assert {"gpu_l4", "gpu_a10g"} <= set(gpu_types)
    for name, node in gpu_types.items():
        assert any(k.startswith("accelerator_type:") for k in node["resources"]), name
        assert any("serve_app.engine build" in c for c in node["worker_setup_commands"]), name
    assert cluster["head_node_type"] in cluster["available_node_types"]
    bad = {
        **cluster,
        "available_node_types": {
            **cluster["available_node_types"],
            "x": {"resources": {"GPU": 0.5}, "node_config": {}},
        },
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)  # fractional resources are refused by the launcher


def test_cluster_yaml_starts_ray_with_the_production_configs_serve_switches() -> None:
    """``ray start`` on every node gets the environment the production config's ``ray_serve`` block sets where
    this package starts Ray (HAProxy on, as on Linux nodes)."""
    import shlex

    from serve_app.deployments.ray_runtime import ray_env

    want = ray_env(load_config("production").ray_serve.model_copy(update={"haproxy": "on"}))
    assert {"RAY_SERVE_HAPROXY_RETRY_ON", "RAY_SERVE_HAPROXY_RETRIES", "RAY_SERVE_HAPROXY_BINARY_PATH"} <= set(want)
    # each node writes its own launcher (its path holds the node's haproxy binary): the command that does
    want["RAY_SERVE_HAPROXY_BINARY_PATH"] = "$(python3 -m serve_app.deployments.haproxy_launcher)"
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[key] if "ray start" in c]
        words = shlex.split(start.split(";")[-1])
        env = dict(w.split("=", 1) for w in words[: words.index("ray")])
        assert env == want, key


def test_gpu_budget_refuses_a_replica_that_outgrows_its_share() -> None:
    gib = 2**30
    ok = check_budget(0.25, 24 * gib, 4 * gib, margin=0.1)
    assert ok.budget_bytes == int(0.25 * 24 * gib * 0.9)
    with pytest.raises(GpuBudgetExceeded, match=r"num_gpus=0.25 of a 24.0 GiB card leaves it 5530 MiB"):
        check_budget(0.25, 24 * gib, 6 * gib, margin=0.1)


# -- real Ray Serve ------------------------------------------------------------------------------


def _status(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    apps = serve.status().applications
    if app not in apps or deployment not in apps[app].deployments:
        return {}
    return {str(k): int(v) for k, v in apps[app].deployments[deployment].replica_states.items()}


def _app(app_config: AppConfig, **scaling: DeploymentScaling) -> Any:
    from serve_app.graph import build_app

    light = DeploymentScaling(num_cpus=0.25, max_ongoing_requests=256, max_queued_requests=512)
    base = {
        "ingress": light,
        "ranker": DeploymentScaling(num_cpus=0.5),
        "intent": DeploymentScaling(num_cpus=0.5),
    }
    # admission control off: these scenarios queue on purpose (to scale, drain, swap under load) and assert
    # that every request is answered; refusals are covered by tests/test_ingress.py and the benchmark
    batching = app_config.batching.model_copy(update={"max_queue_wait_s": 0.0})
    # model deployments of their own: these scenarios scale, place and drain the Ranker
    update = {"scaling": {**base, **scaling}, "batching": batching, "model_placement": "deployments"}
    return build_app(app_config.model_copy(update=update))


@pytest.fixture(scope="module")
def slow_request(shared_data: Path) -> dict[str, Any]:
    """A real re-rank request heavy enough (30 abstracts) to keep a 1-thread CPU replica busy ~1 s."""
    from serve_app.evaluation.data import load_scifact

    sf = load_scifact(shared_data, top_k=30)
    q = next(q for q in sorted(sf.queries) if len(sf.candidates.get(q, [])) == 30)
    return {"query": sf.queries[q], "documents": [sf.corpus[d] for d in sf.candidates[q]]}


async def _fire(url: str, body: dict[str, Any], n: int) -> list[tuple[int, float, dict[str, str], Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=180) as c:

        async def one() -> tuple[int, float, dict[str, str], Any]:
            t0 = time.perf_counter()
            r = await c.post("/v1/rerank", json=body)
            return r.status_code, time.perf_counter() - t0, dict(r.headers), r.json()

        return list(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.slow
def test_four_quarter_gpu_replicas_share_one_gpu_and_a_fifth_waits(ray_session: None, app_config: AppConfig) -> None:
    from ray import serve

    from serve_app.graph import Ranker

    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0.25},
        "num_replicas": 5,
        "user_config": app_config.task_serving("rerank").model_dump(mode="json"),
    }
    serve._run(Ranker.options(**opts).bind(), name="placement", route_prefix=None, _blocking=False)
    try:
        wait_until(lambda: _status("placement", "Ranker").get("RUNNING", 0) == 4, 240, "4 running replicas")
        time.sleep(3)  # the fifth must still be waiting for a GPU share, not starting late
        states = _status("placement", "Ranker")
        print(f"5 replicas x 0.25 GPU on 1 GPU: {states}")
        assert states.get("RUNNING") == 4
        assert sum(states.values()) == 5
    finally:
        serve.delete("placement")


@pytest.mark.slow
def test_ranker_autoscales_up_under_load_and_back_down(
    ray_session: None, app_config: AppConfig, slow_request: dict[str, Any]
) -> None:
    from conftest import HTTP_PORT
    from ray import serve

    ranker = DeploymentScaling(
        num_cpus=0.5,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=4,
        look_back_period_s=2,
        metrics_interval_s=0.5,
        max_ongoing_requests=4,
        max_queued_requests=1000,
        graceful_shutdown_timeout_s=60,
    )
    serve.run(_app(app_config, ranker=ranker), name="autoscale", route_prefix="/autoscale", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/autoscale"
    try:
        assert _status("autoscale", "Ranker").get("RUNNING") == 1

        async def scenario() -> tuple[list[int], float | None]:
            stop = time.monotonic() + 90
            codes: list[int] = []
            up: float | None = None
            t0 = time.monotonic()
            async with httpx.AsyncClient(base_url=url, timeout=180) as c:

                async def client() -> None:
                    while time.monotonic() < stop:
                        codes.append((await c.post("/v1/rerank", json=slow_request)).status_code)

                tasks = [asyncio.create_task(client()) for _ in range(6)]
                while time.monotonic() < stop:
                    if _status("autoscale", "Ranker").get("RUNNING", 0) >= 2:
                        up = time.monotonic() - t0
                        stop = min(stop, time.monotonic() + 3)  # a little more load on two replicas
                    await asyncio.sleep(0.25)
                await asyncio.gather(*tasks)
            return codes, up

        codes, up = asyncio.run(scenario())
        assert up is not None, "never scaled to 2 replicas"
        down = wait_until(lambda: _status("autoscale", "Ranker") == {"RUNNING": 1}, 90, "back to one replica")
        print(
            f"autoscaling: 1 -> 2 replicas {up:.1f}s after load began; back to 1 {down:.1f}s after it stopped; "
            f"{len(codes)} requests, statuses {sorted(set(codes))}"
        )
        assert codes and set(codes) == {200}
    finally:
        serve.delete("autoscale")


@pytest.mark.slow
def test_full_queue_answers_503_fast_and_keeps_serving(
    ray_session: None, app_config: AppConfig, slow_request: dict[str, Any]
) -> None:
    from conftest import HTTP_PORT
    from ray import serve

    from serve_app.api.timing import parse_server_timing

    tiny = DeploymentScaling(num_cpus=0.5, max_ongoing_requests=1, max_queued_requests=1)
    serve.run(_app(app_config, ranker=tiny), name="overload", route_prefix="/overload", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/overload"
    try:
        # Each heavy request ~3 s on the 1-thread replica. They are sent 0.3 s apart, so each leaves the ingress
        # in a call of its own (requests arriving together would share one call and leave the queue slot free):
        # the first runs, the second holds the one queue slot. Light requests then find the queue full.
        heavy_body = {**slow_request, "documents": slow_request["documents"] * 3}

        async def timed(c: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, float, float, dict[str, str], Any]:
            t0 = time.perf_counter()
            r = await c.post("/v1/rerank", json=body)
            return r.status_code, t0, time.perf_counter(), dict(r.headers), r.json()

        async def scenario() -> tuple[list[Any], list[Any]]:
            async with httpx.AsyncClient(base_url=url, timeout=180) as c:
                first = asyncio.create_task(timed(c, heavy_body))
                await asyncio.sleep(0.3)
                second = asyncio.create_task(timed(c, heavy_body))
                await asyncio.sleep(0.3)
                light = await asyncio.gather(*(timed(c, {"query": "q", "documents": ["a", "b"]}) for _ in range(12)))
                return [await first, await second], list(light)

        heavy, light = asyncio.run(scenario())
        assert [r[0] for r in heavy] == [200, 200], [r[0] for r in heavy]  # both heavy ones were accepted
        # where their time went (Server-Timing, from the replica's and the ingress's clocks): the first mostly
        # computed; the second waited outside the replica (Serve's queue: one ongoing call at a time) about as
        # long as the first computed
        first_took, second_took = (parse_server_timing(r[3]["server-timing"]) for r in heavy)
        assert first_took["inference"] > 0.5 * first_took["total"], first_took
        waited_outside = second_took["slot"] + second_took["send"]
        assert waited_outside > 0.5 * first_took["inference"], (first_took, second_took)
        assert {r[0] for r in light} <= {200, 503}  # accepted ones are answered, never dropped
        first_done = heavy[0][2]
        # deterministic: until the first heavy request is answered the replica and its queue slot are taken,
        # so every light request answered before then must have been refused
        assert all(code == 503 for code, _, end, _, _ in light if end < first_done), [r[0] for r in light]
        refused = [(code, end - t0, headers, body) for code, t0, end, headers, body in light if code == 503]
        # the burst of light requests takes well under a second, the heavy one ~3 s: nearly all are refused
        assert len(refused) >= 10, [r[0] for r in light]
        slowest_refusal = max(t for _, t, _, _ in refused)
        print(
            f"overload: heavy requests served, {len(refused)}/12 light ones refused with 503; "
            f"slowest refusal {slowest_refusal * 1000:.0f} ms"
        )
        assert slowest_refusal < 1.0  # the bound: refused at once, never queued to a timeout
        for _, _, headers, body in refused:
            assert headers.get("retry-after") == "1"
            assert body["error_type"] == "overloaded"
        after = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=60)
        assert after.status_code == 200
    finally:
        serve.delete("overload")


@pytest.mark.slow
def test_scale_down_finishes_in_flight_requests(
    ray_session: None, app_config: AppConfig, slow_request: dict[str, Any]
) -> None:
    from conftest import HTTP_PORT
    from ray import serve

    def scaled(n: int) -> Any:
        return _app(
            app_config,
            ranker=DeploymentScaling(
                num_cpus=0.5, min_replicas=n, max_replicas=n, max_ongoing_requests=8, graceful_shutdown_timeout_s=120
            ),
        )

    serve.run(scaled(2), name="drain", route_prefix="/drain", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/drain"
    try:

        async def scenario() -> list[int]:
            pending = asyncio.create_task(_fire(url, slow_request, 8))
            await asyncio.sleep(1.0)  # requests are on both replicas now
            await asyncio.to_thread(serve._run, scaled(1), name="drain", route_prefix="/drain", _blocking=False)
            return [r[0] for r in await pending]

        codes = asyncio.run(scenario())
        wait_until(lambda: _status("drain", "Ranker") == {"RUNNING": 1}, 120, "one replica")
        assert codes == [200] * 8
    finally:
        serve.delete("drain")


@pytest.mark.slow
def test_model_swap_in_place_fails_no_request(ray_session: None, app_config: AppConfig) -> None:
    from conftest import HTTP_PORT
    from ray import serve

    serve.run(_app(app_config), name="swap", route_prefix="/swap", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/swap"
    try:
        before = httpx.get(f"{url}/v1/models", timeout=30).json()["models"][0]
        new_model = app_config.model_for("rerank").model_copy(update={"name": "all-MiniLM-L6-v2-next"})
        swapped = app_config.with_serving(new_model)

        refusals: list[str] = []

        async def scenario() -> list[int]:
            stop = time.monotonic() + 600
            codes: list[int] = []
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:

                async def client() -> None:
                    while time.monotonic() < stop:
                        r = await c.post(
                            "/v1/rerank", json={"query": "reset password", "documents": ["forgot password", "weather"]}
                        )
                        codes.append(r.status_code)
                        if r.status_code != 200:
                            refusals.append(r.json().get("error_type"))

                tasks = [asyncio.create_task(client()) for _ in range(4)]
                await asyncio.sleep(1)
                await asyncio.to_thread(
                    lambda: serve.run(_app(swapped), name="swap", route_prefix="/swap", blocking=False)
                )
                name = ""
                while name != "all-MiniLM-L6-v2-next":
                    models = (await c.get("/v1/models")).json()["models"]
                    name = next(m["name"] for m in models if m["task"] == "rerank")
                    await asyncio.sleep(0.2)
                stop = time.monotonic() + 1
                await asyncio.gather(*tasks)
            return codes

        codes = asyncio.run(scenario())
        print(
            f"hot swap {before['name']} -> all-MiniLM-L6-v2-next under load: "
            f"{len(codes)} requests, statuses {sorted(set(codes))}, refusals {refusals}"
        )
        assert len(codes) > 10 and set(codes) == {200}
    finally:
        serve.delete("swap")
