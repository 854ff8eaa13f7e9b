"""Hardening on a real Ray Serve app over HTTP: API keys with real clients, deadlines, and killing replicas under load.

Each kill test prints its figures (requests sent, failed by status, longest request, time back to full health);
``python -m pytest -s -k kill tests/test_resilience.py`` repeats them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from loadgen import closed_loop
from polling import wait_until

from serve_app.api.readiness import wait_ready
from serve_app.config import AppConfig, DeploymentScaling, load_config

API_KEY = "sk-test-4f1c9a7e2b5d8c3f6a0e"  # a key as an operator would set it; must never appear in any log
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SMALL: dict[str, Any] = {
    "query": "how do I reset my password",
    "documents": ["Open Settings, choose Reset password.", "Sunny."],
}
pytestmark = pytest.mark.slow
# production.yaml's start-by mode (a GPU node's): these apps keep it, as a node whose models fell back to the CPU
PRODUCTION_OVERLOAD = load_config("production").batching.model_dump(
    include={"overload_queue_wait_s", "overload_start_within_s", "overload_late_refusal_s", "overload_window_s"}
)


def _replicas(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def _running(app: str, deployment: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    apps = serve.status().applications
    if app not in apps or deployment not in apps[app].deployments:
        return 0
    return int(apps[app].deployments[deployment].replica_states.get(ReplicaState.RUNNING, 0))


def _kill(actor_name: str) -> None:
    import ray

    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def _hardened(app_config: AppConfig, rankers: int, ingresses: int = 1, placement: str = "deployments") -> Any:
    from serve_app.graph import build_app

    scaling = {
        "ingress": DeploymentScaling(num_cpus=0.25, min_replicas=ingresses, max_replicas=ingresses,
                                     max_ongoing_requests=256, max_queued_requests=512),
        "ranker": DeploymentScaling(num_cpus=0.5, min_replicas=rankers, max_replicas=rankers),
        "intent": DeploymentScaling(num_cpus=0.5),
    }  # fmt: skip
    update = {
        "scaling": scaling,
        "model_placement": placement,
        "auth": app_config.auth.model_validate({"api_keys": [API_KEY]}),
        "batching": app_config.batching.model_copy(update=PRODUCTION_OVERLOAD),  # off here: the CPU answers
    }
    return build_app(app_config.model_copy(update=update))


@pytest.fixture(scope="module")
def hardened(ray_session: None, app_config: AppConfig) -> Any:
    """Model deployments of their own (two Ranker replicas), behind an API key."""
    from conftest import HTTP_PORT
    from ray import serve

    serve.run(_hardened(app_config, rankers=2), name="hard", route_prefix="/hard", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/hard"
    wait_ready(url)
    yield url
    serve.delete("hard")


# -- access control -------------------------------------------------------------------------------


def test_api_keys_guard_every_route_for_real_clients_and_never_reach_a_log(hardened: str) -> None:
    import cohere
    import openai

    base = hardened
    for method, path in [("POST", "/v1/rerank"), ("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/nope")]:
        r = httpx.request(method, base + path, json=SMALL if method == "POST" else None, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        assert r.json()["error_type"] == "unauthorized"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert httpx.get(f"{base}/ready", timeout=30).status_code == 200

    co = cohere.ClientV2(api_key=API_KEY, base_url=base)
    ranked = co.rerank(model="rerank-v3.5", query=SMALL["query"], documents=SMALL["documents"])
    assert [r.index for r in ranked.results] == [0, 1]
    with pytest.raises(cohere.core.ApiError) as refused:
        cohere.ClientV2(api_key="not-the-key", base_url=base).rerank(model="rerank-v3.5", query="q", documents=["d"])
    assert refused.value.status_code == 401
    oa = openai.OpenAI(api_key=API_KEY, base_url=f"{base}/v1")
    assert len(oa.embeddings.create(model="text-embedding-3-small", input=["hello"]).data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=f"{base}/v1", max_retries=0).embeddings.create(
            model="text-embedding-3-small", input=["hello"]
        )

    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    details = json.dumps(client.get_serve_details(), default=str)
    assert API_KEY not in details and "sha256:" in details  # user_config carries the digest only
    node = ray._private.worker._global_node
    assert node is not None
    logs = Path(node.get_session_dir_path()) / "logs"
    time.sleep(2)  # buffered request logs reach their files
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_a_gpu_nodes_overload_budgets_are_off_while_the_models_answer_from_the_cpu(hardened: str) -> None:
    """production.yaml's start-by mode (both overload budgets 20 ms) is sized for a GPU's batches; on a CPU one
    call takes longer than that (an H100 node on ONNX Runtime: 16-21 % fewer answered under overload, refusals up
    to 64 ms). So a node whose models fell back to ONNX Runtime keeps the long budget: their answers say, across
    the actor boundary, that the CPU computed them, and the ingress turns both budgets off (``/v1/models``)."""
    assert PRODUCTION_OVERLOAD["overload_queue_wait_s"] > 0 and PRODUCTION_OVERLOAD["overload_start_within_s"] > 0
    assert httpx.post(f"{hardened}/v1/rerank", json=SMALL, headers=AUTH, timeout=60).status_code == 200
    assert httpx.post(f"{hardened}/v1/classify", json={"inputs": "hi"}, headers=AUTH, timeout=60).status_code == 200
    models = {m["task"]: m for m in httpx.get(f"{hardened}/v1/models", headers=AUTH, timeout=30).json()["models"]}
    for task in ("rerank", "classify"):
        model, admission = models[task], models[task]["admission"]
        assert model["backend"] == "onnxruntime" and model["device"] == "cpu"
        assert admission["overload_budgets_on"] is False, admission
        assert admission["queue_wait_budget_ms"] == admission["max_queue_wait_ms"] == 150.0


# -- deadlines -----------------------------------------------------------------------------------


def test_requests_past_their_deadline_get_504_at_once_and_their_rows_are_dropped_not_computed(
    hardened: str, slow_request: dict[str, Any]
) -> None:
    """12 heavy requests at once (30 abstracts each, a second or more on one CPU thread), each with a 400 ms
    deadline: each is answered 504 at once (or refused with 503 by admission), and most rows are never computed.
    Where a late request is dropped depends on the machine's speed, so it is printed, not asserted: at the ingress
    before its call leaves (``abandoned``; or earlier, waiting to be tokenized, which nothing counts), or in the
    replica's queue (``cancelled``: over gRPC the ingress's cancel reaches it at once; ``expired`` when a batch
    forms). The coalescer's and the batcher's unit tests (``test_batching.py``) assert each way."""

    async def burst() -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(base_url=hardened, timeout=60, headers=AUTH) as c:

            async def one(timeout_ms: int) -> tuple[int, float, str | None]:
                t0 = time.perf_counter()
                r = await c.post("/v1/rerank", json=slow_request, headers={"X-Request-Timeout-Ms": str(timeout_ms)})
                error = r.json().get("error_type") if r.status_code != 200 else None
                return r.status_code, time.perf_counter() - t0, error

            return list(await asyncio.gather(*(one(400) for _ in range(12))))

    before, abandoned_before = _batching_by_replica(hardened), _ingress_abandoned(hardened)
    answers = asyncio.run(burst())
    timed_out = [a for a in answers if a[0] == 504]
    assert {a[0] for a in answers} <= {200, 503, 504}
    assert timed_out and all(a[2] == "deadline_exceeded" for a in timed_out), answers
    assert max(a[1] for a in timed_out) < 1.5  # 400 ms, plus the 2-core machine's scheduling
    time.sleep(3)  # the queued ones reach the head of the model's queue
    after = _batching_by_replica(hardened)

    def grown(key: str) -> int:
        return sum(b[key] - before[r][key] for r, b in after.items())

    sent = len(answers) * len(slow_request["documents"])
    assert grown("sequences") < sent / 2, (before, after)  # a batch or two per replica, formed in time
    print(
        f"late requests: {len(timed_out)} of {len(answers)}; dropped at the ingress before sending "
        f"{_ingress_abandoned(hardened) - abandoned_before}, in the replicas' queues {grown('cancelled')} cancelled "
        f"and {grown('expired')} expired; sequences computed {grown('sequences')} of {sent}"
    )
    assert httpx.post(f"{hardened}/v1/rerank", json=SMALL, headers=AUTH, timeout=60).status_code == 200


def _ingress_abandoned(url: str) -> int:
    """Re-ranking requests the (one) ingress replica took out of its queue unsent: their callers had left."""
    model = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["models"][0]
    assert model["task"] == "rerank"
    return int(model["ingress"]["calls"]["abandoned"])


def _batching_by_replica(url: str, replicas: int = 2, within_s: float = 30.0) -> dict[str, dict[str, int]]:
    """The serving version's batching counters per Ranker replica: each ``/v1/models`` reports the one
    replica its call reached, so it is read until every replica has answered. Serve's router sends a
    call to the replica it believes the least loaded, so the reads are spaced for its view to refresh, and
    go on for ``within_s``: a replica still computing a batch formed before its rows expired (seconds of
    30 abstracts on one CPU thread) gets none until it is done (one CI run: 100 reads over ~6 s missed it)."""
    seen: dict[str, dict[str, int]] = {}

    def every_replica_read() -> bool:
        model = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["models"][0]
        seen[model["replica"]] = {k: int(v) for k, v in model["batching"].items() if isinstance(v, int)}
        return len(seen) == replicas

    wait_until(every_replica_read, within_s, f"a /v1/models read from each of {replicas} Ranker replicas", 0.05)
    return seen


@pytest.fixture(scope="module")
def slow_request(shared_data: Path) -> dict[str, Any]:
    from serve_app.evaluation.data import load_scifact

    sf = load_scifact(shared_data, top_k=30)
    q = next(q for q in sorted(sf.queries) if len(sf.candidates.get(q, [])) == 30)
    return {"query": sf.queries[q], "documents": [sf.corpus[d] for d in sf.candidates[q]]}


# -- killing replicas under load -----------------------------------------------------------------


def _kill_one_of_two_under_load(url: str, app: str, deployment: str, after_s: float) -> tuple[Any, float]:
    """8 callers for 2 s, one of the two replicas killed, ``after_s`` more; then waits until Serve has a
    replacement running, and prints the figures. Returns the load and when the kill was (``time.monotonic()``).

    Serve's controller learns that a replica died from its next health check (``health_check_period_s``: 2 s
    here, Serve's own default 10 s) and only then starts a replacement, which takes seconds more on 2 cores.
    Meanwhile the survivor carries the load; that is what these tests check."""
    victims = _replicas(app, deployment)
    assert len(victims) == 2
    killed_at = 0.0
    # steady state first: the test before sends slow requests that time out, and the ingress's admission rate
    # (tokens answered per busy second) still holds their wait; this load's own answers replace it
    asyncio.run(closed_loop(url, "/v1/rerank", SMALL, callers=8, during=lambda: asyncio.sleep(1.5), headers=AUTH))

    def replaced() -> bool:  # a replica name that was not there before (the victim's leaves at once)
        return bool(set(_replicas(app, deployment)) - set(victims))

    started_s: float | None = None

    async def kill_midway() -> None:
        nonlocal killed_at, started_s
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        _kill(victims[0])
        while time.monotonic() - killed_at < after_s:
            await asyncio.sleep(0.25)
            if started_s is None and await asyncio.to_thread(replaced):
                started_s = time.monotonic() - killed_at

    load = asyncio.run(closed_loop(url, "/v1/rerank", SMALL, callers=8, during=kill_midway, headers=AUTH))
    wait_until(replaced, 60, f"a replacement {deployment} replica")
    if started_s is None:
        started_s = time.monotonic() - killed_at
    # Serve counts the dead replica RUNNING until its health check fails: whole again is the replacement RUNNING
    wait_until(lambda: _running(app, deployment) == 2 and replaced(), 120, f"2 {deployment} replicas running")
    failed = [(round(a.sent_at - killed_at, 2), round(a.seconds, 2), a.status, a.error_type)
              for a in load.answers if a.status != 200]  # fmt: skip
    print(f"kill 1 of 2 {deployment} replicas: {load.summary()}; replacement started {started_s:.1f} s "
          f"after the kill, whole again {time.monotonic() - killed_at:.1f} s; not 200 (sent after the kill, "
          f"took, status, error): {failed}")  # fmt: skip
    return load, killed_at


def _survivor_carried_the_load(load: Any, killed_at: float) -> None:
    """After one of two replicas died, the survivor carried both replicas' load until the replacement started.
    Its admission control may refuse some at once (503 overloaded, Retry-After): back-pressure, not a loss. How
    many depends on the machine: these callers resend at once instead of obeying Retry-After, and on 2 cores the
    replacement loading its models takes CPU from the survivor (CI saw 12 of 895, and 162 of 796 on a slow day
    whose replacement took 17 s). So the checks are that only overload was refused and only while a replica was
    missing, and that the survivor kept answering: at least a quarter of the pre-kill rate of 200s."""
    refused = [a for a in load.answers if a.status == 503]
    assert {a.error_type for a in refused} <= {"overloaded"}, load.summary()
    # answered after the kill: a request in flight at the kill may be refused by the survivor it was resent to
    assert all(a.sent_at + a.seconds >= killed_at for a in refused), "refused while both replicas ran"
    start = min(a.sent_at for a in load.answers)
    end = max(a.sent_at for a in load.answers)
    before = sum(a.status == 200 for a in load.answers if a.sent_at < killed_at) / max(killed_at - start, 1e-9)
    after = sum(a.status == 200 for a in load.answers if a.sent_at >= killed_at) / max(end - killed_at, 1e-9)
    assert after >= before / 4, f"the survivor answered {after:.1f} req/s after the kill, {before:.1f} before"


def test_kill_one_of_two_ranker_replicas_under_load_fails_no_request(hardened: str) -> None:
    """The call lost with the dead replica is sent again to the survivor, so nothing fails. The survivor then
    carries both replicas' load until the replacement starts, and admission may refuse some at once (503
    overloaded, Retry-After; CI once saw 2 of 546, 0.6-0.8 s after the kill): back-pressure, not a loss, as
    in the ingress kill below."""
    load, killed_at = _kill_one_of_two_under_load(hardened, "hard", "Ranker", after_s=4)
    failed = load.failed()
    assert len(load.answers) > 50 and set(failed) <= {503}, failed
    _survivor_carried_the_load(load, killed_at)


def test_kill_the_only_ranker_replica_fails_fast_with_503_and_recovers(
    ray_session: None, app_config: AppConfig
) -> None:
    from conftest import HTTP_PORT
    from ray import serve

    serve.run(_hardened(app_config, rankers=1), name="single", route_prefix="/single", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/single"
    try:
        wait_ready(url)
        (victim,) = _replicas("single", "Ranker")
        killed_at = 0.0
        back_at: float | None = None

        async def kill_and_wait_back() -> None:
            nonlocal killed_at, back_at
            await asyncio.sleep(2)
            killed_at = time.monotonic()
            _kill(victim)
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as c:
                while time.monotonic() - killed_at < 120:
                    await asyncio.sleep(0.25)
                    if _running("single", "Ranker") == 1 and victim not in _replicas("single", "Ranker"):
                        if (await c.post("/v1/rerank", json=SMALL)).status_code == 200:
                            back_at = time.monotonic()
                            break
            await asyncio.sleep(2)  # keep the load on a little after the recovery

        load = asyncio.run(closed_loop(url, "/v1/rerank", SMALL, callers=8, during=kill_and_wait_back, headers=AUTH))
        assert back_at is not None, "the service never came back"
        failed = load.failed()
        print(f"kill the only Ranker replica: {load.summary()}; whole again {back_at - killed_at:.1f} s after the kill")
        print(
            [
                (round(a.sent_at - killed_at, 2), round(a.seconds, 2), a.status, a.error_type)
                for a in load.answers
                if a.seconds > 0.5
            ]
        )
        assert set(failed) <= {503}, failed
        assert {a.error_type for a in load.answers if a.status == 503} <= {"unavailable", "overloaded"}
        # no request waited for the replacement to start: at most a stall (0.5 s) and a probe (1 s), plus slack
        assert load.longest_s() < 2.0
        after = [a for a in load.answers if a.sent_at > back_at]
        assert after and all(a.status == 200 for a in after)
    finally:
        serve.delete("single")


def test_kill_one_of_two_ingress_replicas_under_load(ray_session: None, app_config: AppConfig) -> None:
    """The tokenizer/ingress side: HAProxy sends to the surviving replica and resends, whole, what the dead one
    never answered (``haproxy_launcher``), so no request fails. Before whole-request buffering, up to 3 of these
    requests were lost per kill with 8 callers (500 from HAProxy) and up to 4 more connections were closed
    unanswered, 10-20 with 32.

    One keep-alive connection may still close unanswered, and the callers send that request again, as HTTP
    clients do: CI saw 1 in 898 requests once, in a run whose replacement started 0.3 s after the kill (Serve's
    health check every 2 s), against none in 5 other runs of it. HAProxy reloading its server list as Serve removes
    the dead replica is the suspect (the same gap as a lost node's, ``test_multinode``); not verified."""
    from conftest import HTTP_PORT
    from ray import serve

    serve.run(
        _hardened(app_config, rankers=1, ingresses=2, placement="ingress"),
        name="ingress2",
        route_prefix="/ingress2",
        blocking=False,
    )
    url = f"http://127.0.0.1:{HTTP_PORT}/ingress2"
    try:
        wait_ready(url)
        wait_until(lambda: _running("ingress2", "Ingress") == 2, 120, "2 ingress replicas")
        load, killed_at = _kill_one_of_two_under_load(url, "ingress2", "Ingress", after_s=5)
        failed = load.failed()
        assert len(load.answers) > 50 and set(failed) <= {503}, failed
        assert load.resent <= 1, load.summary()  # before whole-request buffering: up to 4 per kill
        _survivor_carried_the_load(load, killed_at)
    finally:
        serve.delete("ingress2")
