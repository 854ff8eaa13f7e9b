"""Side-by-side serving benchmark: the service against the raw backend and a naive server, in one run.

    python scripts/bench.py --suite cpu                  # the CPU table (2-core machine, default config)
    python scripts/bench.py --suite gpu                  # the GPU table (production config, 1 GPU)
    python scripts/bench.py --suite gpu --autoscale ranker intent ingress   # + replicas following load steps
    python scripts/bench.py --targets service naive-1 --concurrency 1 16 --seconds 5   # any subset

Everything is on loopback, bounded in time, and stops by itself; one target runs at a time (on a small
machine every extra process costs). Workloads, from ``shared/data``:

- ``rerank``: ``/v1/rerank`` with a SciFact dev query and its first ``--docs`` BM25 candidates (abstracts);
- ``classify``: ``/v1/classify`` with one CLINC150 utterance.

Targets:

- ``service``: this project's Serve app (``--config``; default: the packaged default config on CPU,
  ``configs/production.yaml`` scaled to one node on GPU), loaded in closed loop at each ``--concurrency``
  and in open loop at fractions and multiples of the capacity it showed; classify also in open loop at
  ``--classify-rates`` req/s (a p99 at a throughput is measured at a fixed arrival rate), and at
  ``--classify-multiples`` of the run's own closed-loop classify rate (the edge of that node's capacity);
- ``raw``: the same backend object in this process on the same requests' padded batches, no serving layer:
  one request per call (``raw-1``), and requests packed to the token budget (``raw-batched``, the ceiling),
  called from as many threads as the backend runs forwards at once (ONNX Runtime: one per core); for classify
  also 32 requests per forward in arrival order (``raw-b32``) and, on the CPU, the same on ONNX Runtime alone
  with its default session, one forward at a time (``ort-b32``: the issue's "batch-32 rate");
- ``naive-1`` / ``naive-K``: ``scripts/baselines/naive_server.py`` (Starlette, one request → one model call)
  with 1 and ``--naive-workers`` uvicorn workers;
- ``infinity``: Infinity (``infinity-emb``, torch engine; FP16 on a GPU) serving the same local model
  directory, offline, started with ``--infinity-python``: a re-rank request is one ``/embeddings`` call with
  the query and its documents (the encoder work of this bi-encoder re-ranker; the cosine is left out), a
  classify request one ``/embeddings`` call with its text (the intent head, one matrix product, left out).

Reported per run: req/s, docs/s, p50/p95/p99, statuses (in open loop also the accepted requests' p99 by the
second they were sent in: an overload's onset; and how late the load generator itself sent, which counts in
the latencies, with the p99 from the actual send beside it), and for the service the mean batch size (requests per
batch, rows per forward), padding efficiency (real ÷ padded tokens), the wait before the ingress's handler
and the ingress's event-loop lags and collections, from ``/v1/models`` (every replica's own figures, summed
over the point), and on Linux what held each point: per deployment, each replica's busiest thread's share of
the point (its event loop runs on one core at most) and the cores it used, and the share of the node's CPU time
the hypervisor took (``scripts/thread_cpu.py``). Written to
``--out``: ``results.json``, ``table.md`` (the ratio table) and ``throughput.png`` / ``latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from thread_cpu import ThreadCpu, summary  # beside this file: python puts scripts/ first on the path

from serve_app.api.errors import STARTED_LATE_MESSAGE
from serve_app.api.readiness import wait_ready
from serve_app.api.timing import parse_server_timing
from serve_app.config import Role
from serve_app.core.durations import COUNTED_MS, count_over, zero_counts

REPO = Path(__file__).resolve().parent.parent
SERVICE_PORT, NAIVE_PORT = 8000, 8200
INFINITY_PORT = 7997
INFINITY_NOTE = (
    "not run: give --infinity-python, a Python whose environment has infinity-emb (it pins transformers<5, "
    "numpy<2 and tokenizers<=0.23.0, which this project's environment does not: keep it in its own)."
)


# -- requests -------------------------------------------------------------------------------------


def rerank_bodies(docs: int, words: int, n: int = 300) -> list[dict[str, Any]]:
    """SciFact dev queries with their BM25 candidates; ``words`` > 0 keeps each abstract's first words."""
    from serve_app.evaluation.data import load_scifact

    sf = load_scifact(top_k=docs)
    qids = [q for q in sorted(sf.queries) if len(sf.candidates.get(q, [])) >= docs][:n]

    def text(d: str) -> str:
        return " ".join(sf.corpus[d].split()[:words]) if words > 0 else sf.corpus[d]

    return [{"query": sf.queries[q], "documents": [text(d) for d in sf.candidates[q][:docs]]} for q in qids]


def classify_bodies(n: int = 1000) -> list[dict[str, Any]]:
    from serve_app.evaluation.data import load_clinc150

    rows = load_clinc150()["val"][:n]
    return [{"inputs": text} for text, _ in rows]


WORKLOADS = {"rerank": "/v1/rerank", "classify": "/v1/classify"}
# open loop: a request unanswered after this long counts as a TimeoutError. An open-loop point at a multiple of
# the service's capacity sends a naive server far more than it can answer; waiting 60 s for each of those points
# made the GPU suite overrun its 10 minutes on a slower H100 node
OPEN_LOOP_TIMEOUT_S = 10.0
STARTED_LATE = STARTED_LATE_MESSAGE.encode()  # in the body of the ingress's start-by refusals
# every client process starts its clock at one moment this long after the point is set up, so spawning them and
# importing aiohttp is not inside the measured window and none starts sending before the others
CLIENT_START_S = 1.0

# -- load generation (in client processes) --------------------------------------------------------


def _quantiles(xs: list[float]) -> dict[str, float]:
    if len(xs) < 2:
        v = round(xs[0] * 1000, 1) if xs else 0.0
        return {"p50_ms": v, "p95_ms": v, "p99_ms": v}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 1), "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def _client_proc(
    url: str,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    rate: float,
    seconds: float,
    offset: int,
    start_at: float = 0.0,
) -> dict[str, Any]:
    """One client process: closed loop (``rate`` 0, ``concurrency`` workers) or open loop (``rate`` req/s), from
    ``start_at`` (``time.time()``) on."""  # fmt: skip

    async def run() -> dict[str, Any]:
        import aiohttp  # a Ray dependency; its client costs a fraction of httpx's CPU per request

        ok: list[float] = []
        ok_at: list[float] = []  # when each accepted request was sent, from the start
        ok_late: list[float] = []  # how late this process sent it (its latency from the send: ok less this)
        refused: list[float] = []
        codes: dict[str, int] = {}
        # 503s for overload by who refused (X-Overloaded: ingress or haproxy; the ingress's start-by refusals apart)
        by: dict[str, list[float]] = {}
        late: list[tuple[float, float]] = []  # (scheduled, from the start; how late this process sent it)
        refused_from_send: list[float] = []  # an overload refusal's time from when this process sent it
        stages: list[str] = []  # each accepted request's Server-Timing header ("" if none), in the order of ``ok``
        headers = {"content-type": "application/json"}
        connector = aiohttp.TCPConnector(limit=max(concurrency, 1) if rate <= 0 else 0)
        timeout = aiohttp.ClientTimeout(total=60 if rate <= 0 else OPEN_LOOP_TIMEOUT_S)
        async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as c:

            async def one(k: int, t_sched: float) -> float:
                """Send one request; return the Retry-After it was answered with (0 if none)."""
                sent_late = time.perf_counter() - t_sched  # open loop: this process sent it late by as much
                late.append((t_sched - t0, sent_late))
                retry_after = 0.0
                who = None
                timing = ""
                try:
                    async with c.post(path, data=bodies[k % len(bodies)], headers=headers) as r:
                        answer = await r.read()
                        code = str(r.status)
                        retry_after = float(r.headers.get("retry-after", 0) or 0)
                        who = r.headers.get("x-overloaded")
                        if who == "ingress" and STARTED_LATE in answer:  # admitted, then not started in time
                            who = "ingress, started late"
                        timing = r.headers.get("server-timing", "")
                except (aiohttp.ClientError, TimeoutError) as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t_sched
                if who is not None:
                    by.setdefault(who, []).append(dt)
                codes[code] = codes.get(code, 0) + 1
                (ok if code == "200" else refused).append(dt)
                if code == "200":
                    ok_at.append(t_sched - t0)
                    ok_late.append(sent_late)
                    stages.append(timing)
                elif who is not None:
                    refused_from_send.append(dt - sent_late)
                return retry_after

            await asyncio.sleep(max(0.0, start_at - time.time()))
            t0 = time.perf_counter()
            deadline = t0 + seconds
            if rate <= 0:

                async def worker(i: int) -> None:
                    k = offset + i
                    while time.perf_counter() < deadline:
                        retry_after = await one(k, time.perf_counter())
                        k += concurrency
                        if retry_after:  # a refused client backs off as told, as SDKs do
                            await asyncio.sleep(min(retry_after, max(0.0, deadline - time.perf_counter())))

                await asyncio.gather(*(worker(i) for i in range(concurrency)))
            else:  # open loop: latency counts from the scheduled send time (no coordinated omission)
                tasks: set[asyncio.Task[float]] = set()
                k = 0
                while True:
                    t_sched = t0 + k / rate
                    if t_sched >= deadline:
                        break
                    delay = t_sched - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(one(offset + k, t_sched))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    k += 1
                if tasks:
                    await asyncio.wait(tasks, timeout=OPEN_LOOP_TIMEOUT_S)
            elapsed = time.perf_counter() - t0
        return {"ok": ok, "ok_at": ok_at, "refused": refused, "codes": codes, "elapsed": elapsed, "by": by,
                "late": late, "ok_late": ok_late, "refused_from_send": refused_from_send,
                "stages": stages}  # fmt: skip

    return asyncio.run(run())


def load(
    url: str,
    path: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    seconds: float,
    procs: int,
    rate: float = 0,
    threads: ThreadCpu | None = None,
) -> dict[str, Any]:
    """Closed loop at ``concurrency`` (``rate`` 0) or open loop at ``rate`` req/s, over ``procs`` client processes;
    with ``threads``, also what the service's threads and the node's CPUs did over its span (``ThreadCpu.measure``)."""
    raw = [json.dumps(b).encode() for b in bodies]
    procs = max(1, min(procs, concurrency if rate <= 0 else procs))
    per_conc = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start_at = time.time() + CLIENT_START_S
    with ProcessPoolExecutor(procs) as pool:
        futs = [
            pool.submit(_client_proc, url, path, raw, per_conc[i], rate / procs, seconds, i * 7919, start_at)
            for i in range(procs)
        ]
        held = threads.measure(start_at, seconds) if threads is not None else None
        parts = [f.result() for f in futs]
    ok = [x for p in parts for x in p["ok"]]
    refused = [x for p in parts for x in p["refused"]]
    codes: dict[str, int] = {}
    for p in parts:
        for k, v in p["codes"].items():
            codes[k] = codes.get(k, 0) + v
    elapsed = max(p["elapsed"] for p in parts)
    out = {
        "requests": len(ok) + len(refused),
        "req_per_s": round(len(ok) / elapsed, 2),
        **_quantiles(ok),
        "status": codes,
        "ok_latencies_s": ok,
        "ok_sent_at_s": [at for p in parts for at in p["ok_at"]],  # in the order of ok_latencies_s
        "ok_sent_late_s": [x for p in parts for x in p["ok_late"]],  # how late the load generator sent each
        "wall_start": round(start_at, 3),  # time.time() when the load began: lines it up with outside samplers
    }
    if held:
        out["threads"] = held
    by: dict[str, list[float]] = {}
    for p in parts:
        for who, xs in p["by"].items():
            by.setdefault(who, []).extend(xs)
    if by:  # refusals for overload by who answered them: the ingress, or HAProxy for it
        out["refused_by"] = {who: len(xs) for who, xs in sorted(by.items())}
        out["refusal_max_ms_by"] = {who: round(max(xs) * 1000, 1) for who, xs in sorted(by.items())}
    stages = stage_breakdown([(x, st) for p in parts for x, st in zip(p["ok"], p["stages"], strict=True)])
    if stages:
        out["server_timing_ms"] = stages
    if refused:
        out["refusal_max_ms"] = round(max(refused) * 1000, 1)
        out["refusal_p99_ms"] = _quantiles(refused)["p99_ms"]
    if rate > 0:  # open loop: how late the load generator itself sent (its lateness counts in the latencies)
        late = [x for p in parts for x in p["late"]]
        from_send = [x - lag for x, lag in zip(ok, out["ok_sent_late_s"], strict=True)]
        out["p99_from_send_ms"] = _quantiles(from_send)["p99_ms"]
        sent_late = zero_counts()
        for _, x in late:
            count_over(sent_late, x)
        out.update({f"client_sends_late_{ms}ms": n for ms, n in sent_late.items()})
        worst: dict[int, float] = {}
        for at, x in late:
            worst[int(at)] = max(worst.get(int(at), 0.0), x)
        out["client_send_late_max_ms_by_second"] = [round(worst.get(i, 0.0) * 1000, 1) for i in range(int(seconds))]
        # each client process's latest send (seconds from the start, ms late): processes late together point at
        # the machine (all its CPUs busy), one alone at that process
        latest = [max(p["late"], key=lambda a: a[1]) for p in parts if p["late"]]
        out["client_send_late_max_by_process"] = [[round(at, 2), round(x * 1000, 1)] for at, x in latest]
        if refusals_from_send := [x for p in parts for x in p["refused_from_send"]]:
            out["refusal_max_from_send_ms"] = round(max(refusals_from_send) * 1000, 1)
        # accepted requests' p99 by the second they were sent in (an overload's onset); the first second finer,
        # by its tenths (p99 and count), and where its slowest waited
        seconds_sent: dict[int, list[float]] = {}
        tenths: dict[int, list[float]] = {}
        first: list[tuple[float, str]] = []
        for p in parts:
            for at, x, st in zip(p["ok_at"], p["ok"], p["stages"], strict=True):
                seconds_sent.setdefault(int(at), []).append(x)
                if at < 1.0:
                    tenths.setdefault(int(at * 10), []).append(x)
                    first.append((x, st))
        out["accepted_p99_ms_by_second"] = [  # None: a second in which no request sent was accepted
            _quantiles(sent)["p99_ms"] if (sent := seconds_sent.get(i)) else None for i in range(int(seconds))
        ]
        out["accepted_p99_ms_first_second_by_100ms"] = [
            _quantiles(sent)["p99_ms"] if (sent := tenths.get(i)) else None for i in range(10)
        ]
        out["accepted_first_second_by_100ms"] = [len(tenths.get(i, [])) for i in range(10)]
        if onset := stage_breakdown(first):
            out["server_timing_ms_first_second"] = onset
    return out


def take_accepted(r: dict[str, Any]) -> list[tuple[float, float, float]]:
    """Remove a point's per-request lists from its figures (they stay out of ``results.json``), as (seconds from
    the point's start when it was due, latency from then, how late the load generator sent it) per accepted
    request."""
    return list(zip(r.pop("ok_sent_at_s"), r.pop("ok_latencies_s"), r.pop("ok_sent_late_s"), strict=True))


def stage_breakdown(accepted: list[tuple[float, str]], slowest: float = 0.01) -> dict[str, dict[str, float]]:
    """Where accepted requests' time went, from the service's ``Server-Timing`` headers: the mean of each stage
    over all of them and over the slowest ``slowest`` share, in ms. ``outside`` is what the client measured
    beyond the ingress's handler and the wait before it (HAProxy, the client, the network)."""
    timed = [(x, parse_server_timing(st)) for x, st in accepted if st]
    if not timed:
        return {}

    def means(rows: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
        names = list(dict.fromkeys(name for _, stages in rows for name in stages))
        out = {name: round(statistics.fmean(stages.get(name, 0.0) for _, stages in rows), 2) for name in names}
        outside = [x * 1000 - stages.get("total", 0.0) - stages.get("wait", 0.0) for x, stages in rows]
        out["outside"] = round(statistics.fmean(outside), 2)
        out["client_ms"] = round(statistics.fmean(x * 1000 for x, _ in rows), 2)
        return out

    timed.sort(key=lambda row: row[0])
    tail = timed[-max(1, round(len(timed) * slowest)) :]
    return {"all": means(timed), f"slowest_{slowest:.0%}": means(tail)}


# -- targets --------------------------------------------------------------------------------------


class Service:
    """The Serve app in a local Ray started here (Ray's own env knobs must be set before ``ray.init``)."""

    def __init__(self, config_path: Path, ray_env: dict[str, str]) -> None:
        self.config_path = config_path
        self.url = f"http://127.0.0.1:{SERVICE_PORT}"
        os.environ.update(ray_env)

    def __enter__(self) -> Service:
        import ray
        from ray import serve

        from serve_app.config import load_config
        from serve_app.deployments.ray_runtime import apply_ray_env
        from serve_app.graph import build_app

        cfg = load_config(self.config_path)
        self.ray_env = apply_ray_env(cfg.ray_serve)  # as `serve run` does; --ray-env values win
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": SERVICE_PORT})
        serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
        wait_ready(self.url, 300)
        return self

    def figures(self) -> dict[str, Any]:
        """Every running replica's own counters from ``/v1/models``: an ingress replica answers with its own, and
        each model entry is one model replica's. Polled until each replica answered once (at most
        ``FIGURE_POLLS`` times): a point's figures are differences per replica, summed (``batching_delta``)."""
        from ray import serve
        from ray.serve.schema import ReplicaState

        running = {
            name: int(d.replica_states.get(ReplicaState.RUNNING, 0))
            for name, d in serve.status().applications["bench"].deployments.items()
        }
        wanted = {"rerank": running.get("Ranker", 1), "classify": running.get("Intent", 1)}  # absent: in the ingress
        ingress: dict[str | None, dict[str, Any]] = {}
        models: dict[tuple[str, str | None], dict[str, Any]] = {}
        for _ in range(FIGURE_POLLS):
            for m in httpx.get(f"{self.url}/v1/models", timeout=30).json()["models"]:
                if m.get("role", "serving") != "serving":
                    continue
                door = m.get("ingress", {})
                seen = ingress.setdefault(door.get("replica"), {
                    "pauses": door.get("pauses", {}), "admission": {},
                    "model_calls": door.get("model_calls"), "haproxy_clock_base_ms": door.get("haproxy_clock_base_ms"),
                })  # fmt: skip
                seen["admission"][m["task"]] = m["admission"]
                models[m["task"], m.get("replica")] = {"batching": m["batching"], "pauses": m.get("pauses", {})}
            complete = len(ingress) >= running.get("Ingress", 1) and all(
                sum(task == t for t, _ in models) >= n for task, n in wanted.items()
            )
            if complete:
                break
        return {"ingress": ingress, "models": models, "complete": complete}

    def replicas(self, deployment: str) -> int:
        from ray import serve
        from ray.serve.schema import ReplicaState

        status = serve.status().applications["bench"].deployments[deployment]
        return int(status.replica_states.get(ReplicaState.RUNNING, 0))

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """A baseline server started in its own session: SIGTERM to its whole group (uvicorn workers too), then KILL.
    A group already gone (the server exited before it was ready) is nothing to stop."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class NaiveServer:
    def __init__(self, workers: int, engine: str, config_path: Path) -> None:
        self.workers, self.engine, self.config_path = workers, engine, config_path
        self.url = f"http://127.0.0.1:{NAIVE_PORT}"

    def __enter__(self) -> NaiveServer:
        env = {**os.environ, "NAIVE_ENGINE": self.engine, "NAIVE_CONFIG": str(self.config_path)}
        cmd = [
            sys.executable, "-m", "uvicorn", "scripts.baselines.naive_server:app", "--host", "127.0.0.1",
            "--port", str(NAIVE_PORT), "--workers", str(self.workers), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        wait_ready(self.url, 180, alive=lambda: self.proc.poll() is None)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_server(self.proc)


class InfinityServer:
    """Infinity's v2 CLI on the ranker's model directory (sentence-transformers layout), no hub, no telemetry."""

    def __init__(self, python: str, config_path: Path, gpu: bool) -> None:
        from serve_app.config import load_config
        from serve_app.models.artifacts import resolve

        cfg = load_config(config_path)
        art = resolve(cfg.model_for("rerank"), cfg.artifacts_dir)
        if art.source_dir is None:
            raise SystemExit("infinity: the ranker has no model directory to load (a bare .onnx)")
        self.python, self.model_dir, self.gpu = python, art.source_dir, gpu
        self.name = cfg.model_for("rerank").name
        self.url = f"http://127.0.0.1:{INFINITY_PORT}"

    def __enter__(self) -> InfinityServer:
        env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "INFINITY_BETTERTRANSFORMER": "false", "DO_NOT_TRACK": "1",
        }  # fmt: skip
        cmd = [
            self.python, "-m", "infinity_emb.cli", "v2", "--model-id", str(self.model_dir),
            "--served-model-name", self.name, "--engine", "torch", "--device", "cuda" if self.gpu else "cpu",
            "--dtype", "float16" if self.gpu else "float32", "--batch-size", "128", "--port", str(INFINITY_PORT),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            wait_ready(self.url, 300, path="/health", alive=lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError):
            stop_server(self.proc)
            raise
        return self

    def bodies(self, workload: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The same texts as ``/embeddings`` requests."""
        if workload == "rerank":
            return [{"model": self.name, "input": [b["query"], *b["documents"]]} for b in bodies]
        return [{"model": self.name, "input": [b["inputs"]]} for b in bodies]

    def __exit__(self, *exc: object) -> None:
        stop_server(self.proc)


def raw_backend(config_path: Path, workload: str, bodies: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The backend alone on the requests' padded batches, no serving layer:

    - ``raw-1``: one request per call;
    - ``raw-batched``: requests packed to the token budget and planned exactly as the service plans a batch
      (the ceiling);
    - ``raw-b32`` (classify): 32 requests per forward in arrival order, padded to the longest, on this
      backend as the service runs it (ONNX Runtime: a one-thread forward per core, side by side);
    - ``ort-b32`` (classify, ONNX Runtime): the same forwards on ONNX Runtime alone, as the issue measured it
      ("ONNX Runtime alone on the same machine ... at batch 32"): a session with its default options (every
      core, its threads spinning), one forward at a time.
    """
    from serve_app.backends.select import select_backend
    from serve_app.batching.buckets import bucket_lengths, pad_batch
    from serve_app.batching.plan import forward_cost_of, measure_forward_cost, run_forwards
    from serve_app.config import load_config
    from serve_app.core.sequences import Sequences
    from serve_app.models.artifacts import resolve, tokenizer_spec
    from serve_app.models.tokenizer import TextEncoder

    cfg = load_config(config_path)
    serving = cfg.serving("rerank" if workload == "rerank" else "classify")
    artifacts = resolve(serving.model, serving.artifacts_dir)
    onnx_path = artifacts.onnx_path
    backend = select_backend(artifacts, serving)
    spec = tokenizer_spec(serving.model, serving.batching.buckets[-1])
    enc = TextEncoder(spec.tokenizer_path, spec.max_length)
    if workload == "rerank":
        reqs = [Sequences.pack(enc.encode([b["query"], *b["documents"]])) for b in bodies]
    else:
        reqs = [Sequences.pack(enc.encode([b["inputs"]])) for b in bodies]
    b = serving.batching
    backend.warmup([(r, n) for n in b.buckets for r in (b.batch_slots if backend.info.fixed_shapes else (1,))])
    cost = forward_cost_of(backend, b.forward_cost_tokens)
    measured = None if backend.info.fixed_shapes else measure_forward_cost(backend, b.buckets[0], b.max_batch_size)

    def packed_groups() -> list[list[Sequences]]:
        groups: list[list[Sequences]] = [[]]
        acc = 0
        for s in reqs:
            padded = int(bucket_lengths(s.lengths(), b.buckets).sum())
            if groups[-1] and acc + padded > b.max_batch_tokens:
                groups.append([])
                acc = 0
            groups[-1].append(s)
            acc += padded
        return groups

    callers = backend.info.concurrency  # forwards the backend runs at once (ONNX Runtime: one per core)

    def timed(name: str, groups: list[Any], run: Any, callers: int = callers) -> None:
        """``callers`` threads call ``run`` on the groups in turn, as the service's batches do."""
        turns = itertools.count()
        done = [0] * callers
        t0 = time.perf_counter()

        def caller(c: int) -> None:
            while time.perf_counter() - t0 < seconds:
                group = groups[next(turns) % len(groups)]
                run(group)
                done[c] += len(group)

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[name] = {"req_per_s": round(sum(done) / (time.perf_counter() - t0), 2), "callers": callers}

    out: dict[str, Any] = {
        "backend": f"{backend.info.name} {backend.info.precision} {backend.info.device}",
        "forward_cost_tokens": cost,  # what the service uses
        "forward_cost_tokens_measured": measured,  # here, now: to tune batching.forward_cost_tokens
    }
    plan = functools.partial(
        run_forwards,
        backend,
        buckets=b.buckets,
        max_rows=b.max_batch_size,
        batch_slots=b.batch_slots,
        forward_cost=cost,
    )
    timed("raw-1", [[s] for s in reqs], plan)
    timed("raw-batched", packed_groups(), plan)
    if workload == "classify" and not backend.info.fixed_shapes:
        rows = [s[0] for s in reqs]
        b32 = [rows[i : i + 32] for i in range(0, len(rows) - 31, 32)]
        timed("raw-b32", b32, lambda g: backend.infer(pad_batch(g, max(len(x) for x in g))))
        if backend.info.name == "onnxruntime":
            import onnxruntime as ort

            alone = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            names = {i.name for i in alone.get_inputs()}

            def ort_run(g: list[Any]) -> None:
                alone.run(None, {k: v for k, v in pad_batch(g, max(len(x) for x in g)).feeds().items() if k in names})

            timed("ort-b32", b32, ort_run, callers=1)
    backend.close()
    return out


# -- the suite ------------------------------------------------------------------------------------


def gpu_config(out_dir: Path, ranker_replicas: int, ingress_replicas: int, intent_replicas: int = 2) -> Path:
    """The production config on one node: local artifacts, fixed replica counts."""
    from serve_app.config import load_config

    cfg = load_config("production").model_dump(mode="json")
    cfg["artifacts_dir"] = str(REPO / "engines")
    for role, n in (("ingress", ingress_replicas), ("ranker", ranker_replicas), ("intent", intent_replicas)):
        cfg["scaling"][role].update(min_replicas=n, max_replicas=n, initial_replicas=None)
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def without_score_cache(config: Path, out_dir: Path) -> Path:
    """``config`` with every model's score cache off: the requests cycle through a few hundred bodies, which a
    cache would answer from memory while the baselines compute every one (``--score-cache`` keeps it)."""
    from serve_app.config import load_config

    cfg = load_config(config).model_dump(mode="json")
    for model in cfg["models"]:
        model["score_cache"] = {"max_entries": 0}
    path = out_dir / "config-no-cache.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _counter(figures: Any, path: tuple[Any, ...]) -> float:
    for key in path:
        try:
            figures = figures[key]
        except (KeyError, IndexError):
            return 0.0
    return float(figures)


def _summed(before: dict[Any, Any], after: dict[Any, Any], *path: Any) -> float:
    """The counter at ``path`` in each replica's figures: its growth summed over replicas (a replica not seen
    before counts from 0)."""
    return sum(
        _counter(now, path) - (_counter(before[key], path) if key in before else 0) for key, now in after.items()
    )


def batching_delta(before: dict[str, Any], after: dict[str, Any], task: str) -> dict[str, Any]:
    """A point's figures for ``task`` from two ``Service.figures`` snapshots: batching over its model replicas,
    the door and the waits before it over the ingress replicas."""
    bm = {k: m for k, m in before["models"].items() if k[0] == task}
    am = {k: m for k, m in after["models"].items() if k[0] == task}
    d = {
        k: _summed(bm, am, "batching", k)
        for k in ("batches", "requests", "forwards", "sequences", "real_tokens", "padded_tokens")
    }
    bi, ai = before["ingress"], after["ingress"]
    arrivals = _summed(bi, ai, "admission", task, "arrivals")
    waited_s = _summed(bi, ai, "admission", task, "arrival_wait_s_total")
    longest = [_counter(v, ("admission", task, "arrival_wait_max_ms")) for v in ai.values()]
    return {
        "mean_requests_per_batch": round(d["requests"] / d["batches"], 2) if d["batches"] else 0.0,
        "mean_rows_per_forward": round(d["sequences"] / d["forwards"], 2) if d["forwards"] else 0.0,
        "padding_efficiency": round(d["real_tokens"] / d["padded_tokens"], 3) if d["padded_tokens"] else 0.0,
        "refused_by_admission": int(_summed(bi, ai, "admission", task, "refused")),
        # ingress replicas holding the overload budgets at the point's end (off while the model answers from a CPU)
        "ingresses_with_overload_budgets_on": sum(
            bool(_counter(v, ("admission", task, "overload_budgets_on"))) for v in ai.values()
        ),
        "forward_cost_tokens": next((m["batching"].get("forward_cost_tokens") for m in am.values()), None),
        # the wait between HAProxy holding a request and the ingress's handler running it (the longest: since
        # the replicas started)
        "arrival_wait_mean_ms": round(waited_s / arrivals * 1000, 2) if arrivals else None,
        **{
            f"arrivals_over_{ms}ms": int(_summed(bi, ai, "admission", task, f"arrivals_over_{ms}ms"))
            for ms in COUNTED_MS
        },
        "arrival_wait_max_ms": max(longest, default=None),
        # the ingress replicas' event loops and collectors (``serve_app/deployments/pauses.py``)
        **{
            f"ingress_loop_lags_over_{ms}ms": int(_summed(bi, ai, "pauses", "loop", f"lags_over_{ms}ms"))
            for ms in COUNTED_MS
        },
        "ingress_loop_lag_s": round(_summed(bi, ai, "pauses", "loop", "lag_s_total"), 3),
        "ingress_gc_collections": [int(_summed(bi, ai, "pauses", "gc", "collections", g)) for g in range(3)],
        "replicas_seen": {"ingress": len(ai), task: len(am), "complete": before["complete"] and after["complete"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    targets = ["service", "raw", "naive-1", "naive-K", "infinity"]
    ap.add_argument("--targets", nargs="+", default=targets, choices=targets)  # naive-K: K is --naive-workers
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--seconds", type=float, default=10.0, help="per load point")
    ap.add_argument("--docs", type=int, default=20, help="candidates per re-rank request")
    ap.add_argument("--doc-words", type=int, help="keep each abstract's first N words (default: 40 on cpu, all on gpu)")
    ap.add_argument("--config", type=Path, help="service config (default: by suite)")
    ap.add_argument("--naive-workers", type=int, help="K for naive-K (default: cores on cpu, 4 on gpu)")
    ap.add_argument("--client-procs", type=int, help="load-generator processes (default: 1 on cpu, 6 on gpu)")
    ap.add_argument("--ranker-replicas", type=int, default=2, help="gpu suite")
    ap.add_argument("--ingress-replicas", type=int, default=4, help="gpu suite")
    ap.add_argument(
        "--intent-replicas", type=int, default=2, help="gpu suite (one replica held classify near 2.5k req/s)"
    )
    ap.add_argument(
        "--ray-env", nargs="*", default=[], help="NAME=VALUE for Ray (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)"
    )
    ap.add_argument("--open-loop", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0],
                    help="offered load as multiples of the service's measured re-rank capacity")  # fmt: skip
    ap.add_argument(
        "--classify-rates", type=float, nargs="*",
        help="classify in open loop at these req/s: a latency target at a throughput is met at a fixed arrival "
        "rate, not in a closed loop whose queue is its concurrency (default: 1000 2000 3000 4000 on gpu, none on cpu)",
    )  # fmt: skip
    ap.add_argument(
        "--classify-multiples", type=float, nargs="*", default=[],
        help="classify in open loop also at these multiples of this run's best closed-loop classify rate (after "
        "--classify-rates): the edge of capacity is where each node has its own, so a fixed rate misses it",
    )  # fmt: skip
    ap.add_argument(
        "--autoscale", nargs="*", choices=["ranker", "intent", "ingress"],
        help="gpu: these deployments (none named: the ranker) autoscale 1..4 replicas through a load step of "
        "their workload (ingress: re-rank), one after the other; the replica count every second",
    )  # fmt: skip
    ap.add_argument("--score-cache", action="store_true", help="keep the config's score cache (default: off)")
    ap.add_argument(
        "--infinity-python",
        help="a Python with infinity-emb installed (its own environment); without it the infinity target is skipped",
    )
    ap.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = args.suite == "gpu"
    procs = args.client_procs or (6 if gpu else 1)
    k_workers = args.naive_workers or (4 if gpu else (os.cpu_count() or 2))
    config = args.config or (
        gpu_config(args.out, args.ranker_replicas, args.ingress_replicas, args.intent_replicas)
        if gpu
        else REPO / "serve_app/default_config.yaml"
    )
    if not args.score_cache:
        config = without_score_cache(config, args.out)
    ray_env = dict(kv.split("=", 1) for kv in args.ray_env)
    default_rates = [1000.0, 2000.0, 3000.0, 4000.0] if gpu else []
    classify_rates = args.classify_rates if args.classify_rates is not None else default_rates
    words = args.doc_words if args.doc_words is not None else (0 if gpu else 40)
    bodies = {"rerank": rerank_bodies(args.docs, words), "classify": classify_bodies()}
    results: dict[str, Any] = {
        "suite": args.suite,
        "machine": machine(),
        "docs_per_request": args.docs,
        "doc_words": words or "whole abstracts",
        "seconds_per_point": args.seconds,
        "config": str(config),
        "ray_env": ray_env,
        "closed": {},
        "open": {},
        "open_classify": {},
        "infinity": INFINITY_NOTE,
    }

    def log(msg: str) -> None:
        print(msg, flush=True)

    threads = ThreadCpu()

    def measured(task: str, figures: Any, url: str, path: str, sent: Any, c: int, rate: float = 0.0) -> dict[str, Any]:
        """A point's load; for the service also its figures over the point (``batching_delta``) and, on Linux,
        its threads' CPU (``thread_cpu``)."""
        before = figures() if figures else None
        watched = threads if figures and threads.available else None
        r = load(url, path, sent, c, args.seconds, procs, rate=rate, threads=watched)
        if before is not None:
            r["batching"] = batching_delta(before, figures(), task)
        return r

    def closed_points(url: str, name: str, figures: Any = None, shape: Any = None, paths: Any = None) -> None:
        for w in args.workloads:
            sent = shape(w, bodies[w]) if shape else bodies[w]
            for c in args.concurrency:
                r = measured(WORKLOADS_TASK[w], figures, url, (paths or WORKLOADS)[w], sent, c)
                if w == "rerank":
                    r["docs_per_s"] = round(r["req_per_s"] * args.docs, 1)
                take_accepted(r)
                results["closed"].setdefault(name, {}).setdefault(w, {})[str(c)] = r
                log(f"{name:12s} {w:8s} c={c:<3d} {json.dumps(r)}")

    def open_points(url: str, name: str, capacity: float, figures: Any = None) -> None:
        for m in args.open_loop:
            rate = max(1.0, m * capacity)
            r = measured("rerank", figures, url, WORKLOADS["rerank"], bodies["rerank"], 0, rate)
            r["offered_req_per_s"] = round(rate, 1)
            r["multiple_of_capacity"] = m
            accepted = take_accepted(r)
            results["open"].setdefault(name, []).append(r)
            r["_accepted"] = accepted
            log(f"{name:12s} open {m}x ({rate:.1f}/s) {json.dumps({k: v for k, v in r.items() if k != '_accepted'})}")

    def classify_rate_points(url: str, name: str, figures: Any = None) -> None:
        # the node's speed in this run: a p99 at a fixed rate follows it more than any setting (H100 nodes,
        # scripts/results/h100-2026-11-25-parts/), so each point says how near that rate was
        closed = results["closed"].get(name, {}).get("classify", {})
        best = max((c["req_per_s"] for c in closed.values()), default=0.0)
        if args.classify_multiples and not best:
            log(f"{name:12s} --classify-multiples skipped: no closed-loop classify rate to multiply (--concurrency?)")
        rates = [*classify_rates, *(round(m * best, 1) for m in args.classify_multiples if best)]
        for rate in rates if "classify" in args.workloads else []:
            r = measured("classify", figures, url, WORKLOADS["classify"], bodies["classify"], 0, rate)
            take_accepted(r)
            r["offered_req_per_s"] = rate
            if best:
                r["offered_vs_closed_loop_best"] = round(rate / best, 2)
            results["open_classify"].setdefault(name, []).append(r)
            log(f"{name:12s} classify open ({rate:.0f}/s) {json.dumps(r)}")

    if "service" in args.targets:
        with Service(config, ray_env) as svc:
            for w in args.workloads:  # warm every path
                load(svc.url, WORKLOADS[w], bodies[w], 8, 3, 1)
            closed_points(svc.url, "service", svc.figures)
            if "rerank" in args.workloads and args.open_loop:
                cap = max(v["req_per_s"] for v in results["closed"]["service"]["rerank"].values())
                open_points(svc.url, "service", cap, svc.figures)
                results["service_capacity_req_per_s"] = cap
            classify_rate_points(svc.url, "service", svc.figures)
            results["service_ingress"] = {  # per ingress replica: its model transport and HAProxy clock bases
                str(replica): {k: seen[k] for k in ("model_calls", "haproxy_clock_base_ms")}
                for replica, seen in svc.figures()["ingress"].items()
            }
            log(f"ingress replicas: {json.dumps(results['service_ingress'])}")
            if args.autoscale is not None:
                for role in args.autoscale or ["ranker"]:
                    workload = "classify" if role == "intent" else "rerank"
                    results.setdefault("autoscale", {})[role] = autoscale_run(
                        svc, role, workload, bodies[workload], procs, log
                    )
    if "raw" in args.targets:
        for w in args.workloads:
            r = raw_backend(config, w, bodies[w], args.seconds)
            results.setdefault("raw", {})[w] = r
            log(f"raw          {w:8s} {json.dumps(r)}")
    for name, workers in (("naive-1", 1), ("naive-K", k_workers)):
        if name not in args.targets:
            continue
        label = f"naive-{workers}"
        with NaiveServer(workers, "transformers" if gpu else "onnxruntime", config) as naive:
            for w in args.workloads:
                load(naive.url, WORKLOADS[w], bodies[w], 8, 3, 1)
            closed_points(naive.url, label)
            if (
                name == "naive-1"
                and "rerank" in args.workloads
                and args.open_loop
                and "service_capacity_req_per_s" in results
            ):
                open_points(naive.url, label, results["service_capacity_req_per_s"])
    if "infinity" in args.targets and args.infinity_python:
        with InfinityServer(args.infinity_python, config, gpu) as inf:
            paths = dict.fromkeys(WORKLOADS, "/embeddings")
            for w in args.workloads:
                load(inf.url, "/embeddings", inf.bodies(w, bodies[w]), 8, 3, 1)
            closed_points(inf.url, "infinity", shape=inf.bodies, paths=paths)
        results["infinity"] = (
            f"infinity-emb, torch engine, {'FP16 on the GPU' if gpu else 'FP32 on the CPU'}, the same model "
            "directory; /embeddings of the same texts (the cosine and the intent head left out)"
        )
    overload_check(results)
    for runs in results["open"].values():
        for r in runs:
            r.pop("_accepted", None)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = ratio_table(results, k_workers)
    (args.out / "table.md").write_text(table)
    plots(results, args.out)
    log(table)
    log(f"wrote {args.out}/results.json, table.md, throughput.png, latency.png")


WORKLOADS_TASK = {"rerank": "rerank", "classify": "classify"}
FIGURE_POLLS = 40  # /v1/models asked at most this often for one snapshot of every replica (Service.figures)


def machine() -> str:
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    return f"{os.cpu_count()} CPUs" + (f", {gpu}" if gpu else ", no GPU")


def within_bar(accepted: list[tuple[float, float, float]], bar_s: float, onset_s: float = 1.0) -> dict[str, Any]:
    """The share of accepted requests (due at, latency, sent late by) answered within ``bar_s`` (the keys name
    the 3x bar it is used with): over the whole point, and apart for those due in its first ``onset_s`` and
    after. An overload is seen only some time after it begins (H100: its first ~100 ms held the start-by mode's
    misses), so the split tells the onset from the steady state.

    Latency counts from when a request was due (no coordinated omission), so a load generator that stalls
    makes its requests late whatever the service does: on an H100 node offered about 3,700 req/s, one second
    in most runs had sends 120-240 ms late. So the share is also given from the actual send, with how many
    were sent 20 ms or more late; the first figure is the one the target is judged on."""

    def share(xs: list[float]) -> float | None:
        return round(sum(x <= bar_s for x in xs) / len(xs), 4) if xs else None

    onset = [x for at, x, _ in accepted if at < onset_s]
    after = [x for at, x, _ in accepted if at >= onset_s]
    return {
        "accepted_within_3x_unloaded_p99": share(onset + after) or 0.0,
        "accepted_first_second": len(onset),
        "accepted_within_3x_first_second": share(onset),
        "accepted_within_3x_after_first_second": share(after),
        "accepted_sent_late_20ms": sum(late >= 0.02 for _, _, late in accepted),
        "accepted_within_3x_from_send": share([x - late for _, x, late in accepted]) or 0.0,
    }


def overload_check(results: dict[str, Any]) -> None:
    """At 4x the capacity: share of accepted requests within 3x the unloaded p99, and the slowest refusal."""
    svc = results["closed"].get("service", {}).get("rerank", {})
    runs = results["open"].get("service", [])
    heavy = [r for r in runs if r["multiple_of_capacity"] >= 4]
    if not svc.get("1") or not heavy:
        return
    unloaded_p99 = svc["1"]["p99_ms"] / 1000
    r = heavy[-1]
    accepted = r["_accepted"]
    results["overload"] = {
        "offered_multiple": r["multiple_of_capacity"],
        "unloaded_p99_ms": round(unloaded_p99 * 1000, 1),
        "accepted": len(accepted),
        **within_bar(accepted, 3 * unloaded_p99),
        "refused": r["requests"] - len(accepted),
        "slowest_refusal_ms": r.get("refusal_max_ms"),
        "refused_by": r.get("refused_by", {}),
        "slowest_refusal_ms_by": r.get("refusal_max_ms_by", {}),
        "slowest_refusal_from_send_ms": r.get("refusal_max_from_send_ms"),
        "client_send_late_max_by_process": r.get("client_send_late_max_by_process", []),
    }


def _client_late(o: dict[str, Any]) -> str:
    """What the load generator's own late sends did to the overload figure (nothing said when it kept time)."""
    if not o.get("accepted_sent_late_20ms"):
        return ""
    return (
        f"; the load generator sent {o['accepted_sent_late_20ms']} of the accepted 20 ms or more late: from the "
        f"actual send {o['accepted_within_3x_from_send'] * 100:.1f}% within 3x, slowest refusal "
        f"{o.get('slowest_refusal_from_send_ms')} ms"
    )


def _onset_split(o: dict[str, Any]) -> str:
    first, after = o.get("accepted_within_3x_first_second"), o.get("accepted_within_3x_after_first_second")
    if first is None or after is None:
        return ""
    n, rest = o["accepted_first_second"], o["accepted"] - o["accepted_first_second"]
    return f" ({first * 100:.1f}% of the {n} sent in the first second, {after * 100:.1f}% of the {rest} after)"


def ratio_table(results: dict[str, Any], k: int) -> str:
    closed = results["closed"]
    svc = closed.get("service", {})
    inf_head = " infinity req/s (p50 / p99 ms) | service ÷ infinity |" if closed.get("infinity") else ""
    lines = [f"Machine: {results['machine']}; {results['docs_per_request']} docs per re-rank request "
             f"(words per doc: {results['doc_words']}); "
             f"{results['seconds_per_point']} s per point.", "",
             "| workload | c | service req/s | p50 / p99 ms | service not 200 | naive-1 req/s | naive-" + str(k)
             + " req/s | service ÷ naive-1 | service ÷ naive-" + str(k) + " | batch (req/batch, rows/fwd) | "
             "padding eff. |" + inf_head,
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (2 if inf_head else 0)]  # fmt: skip
    for w, points in svc.items():
        for c, r in points.items():
            n1 = closed.get("naive-1", {}).get(w, {}).get(c, {})
            nk = closed.get(f"naive-{k}", {}).get(w, {}).get(c, {})
            inf = closed.get("infinity", {}).get(w, {}).get(c, {})

            def ratio(n: dict[str, Any], r: dict[str, Any] = r) -> str:
                return f"{r['req_per_s'] / n['req_per_s']:.2f}" if n.get("req_per_s") else "-"

            b = r.get("batching", {})
            lines.append(
                f"| {w} | {c} | {r['req_per_s']} | {r['p50_ms']} / {r['p99_ms']} | "
                f"{r['requests'] - r['status'].get('200', 0)} | {n1.get('req_per_s', '-')} | "
                f"{nk.get('req_per_s', '-')} | {ratio(n1)} | {ratio(nk)} | "
                f"{b.get('mean_requests_per_batch', '-')}, {b.get('mean_rows_per_forward', '-')} | "
                f"{b.get('padding_efficiency', '-')} |"
                + (
                    f" {inf.get('req_per_s', '-')} ({inf.get('p50_ms', '-')} / {inf.get('p99_ms', '-')}) |"
                    f" {ratio(inf)} |"
                    if inf_head
                    else ""
                )
            )
    p50 = [
        svc.get("rerank", {}).get("1", {}).get("p50_ms"),
        closed.get("naive-1", {}).get("rerank", {}).get("1", {}).get("p50_ms"),
    ]
    if all(p50):
        lines += ["", f"c=1 re-rank p50: service {p50[0]} ms, naive-1 {p50[1]} ms, ratio {p50[0] / p50[1]:.2f}"]
    for w, r in results.get("raw", {}).items():
        best = max(v["req_per_s"] for v in svc.get(w, {}).values()) if svc.get(w) else None
        vs_raw = f"; service best ÷ raw-batched {best / r['raw-batched']['req_per_s']:.2f}" if best else ""
        lines.append(f"raw backend ({r['backend']}), {w}: one request per call {r['raw-1']['req_per_s']} req/s, "
                     f"packed to the token budget {r['raw-batched']['req_per_s']} req/s{vs_raw}")  # fmt: skip
        if "raw-b32" in r and best:
            lines.append(f"raw backend, {w}: 32 requests per forward in arrival order, padded to the longest "
                         f"{r['raw-b32']['req_per_s']} req/s; service best ÷ that "
                         f"{best / r['raw-b32']['req_per_s']:.2f}")  # fmt: skip
        if "ort-b32" in r and best:
            lines.append(f"ONNX Runtime alone (default session, one forward at a time), {w}: 32 requests per "
                         f"forward in arrival order {r['ort-b32']['req_per_s']} req/s; service best ÷ that "
                         f"{best / r['ort-b32']['req_per_s']:.2f}")  # fmt: skip
    for name, runs in results.get("open_classify", {}).items():
        for r in runs:
            other = r["requests"] - r["status"].get("200", 0)
            lines.append(f"classify, {name}, open loop at {r['offered_req_per_s']:.0f} req/s offered: "
                         f"{r['req_per_s']} answered/s, p50 / p99 {r['p50_ms']} / {r['p99_ms']} ms, "
                         f"{other} not answered 200; the load generator sent {r.get('client_sends_late_20ms', '-')} "
                         f"20 ms or more late (p99 from the actual send {r.get('p99_from_send_ms', '-')} ms)"
                         + (f"; offered ÷ this run's best closed-loop classify rate {r['offered_vs_closed_loop_best']}"
                            if "offered_vs_closed_loop_best" in r else "")
                         )  # fmt: skip
    if "overload" in results:
        o = results["overload"]
        lines.append(
            f"overload at {o['offered_multiple']}x capacity: {o['accepted_within_3x_unloaded_p99'] * 100:.1f}% of "
            f"{o['accepted']} accepted within 3x the unloaded p99 ({o['unloaded_p99_ms']} ms)"
            + _onset_split(o)
            + f"; {o['refused']} refused, "
            f"slowest refusal {o['slowest_refusal_ms']} ms"
            + "".join(
                f"; by {who}: {n}, slowest {o['slowest_refusal_ms_by'][who]} ms" for who, n in o["refused_by"].items()
            )
            + _client_late(o)
        )
    points = [("rerank", f"{r['multiple_of_capacity']}x", r) for r in results.get("open", {}).get("service", [])]
    rated = results.get("open_classify", {}).get("service", [])
    points += [("classify", f"{r['offered_req_per_s']:.0f}/s", r) for r in rated]
    for w, at, r in points:  # the service's Server-Timing: where the slowest accepted requests spent their time
        for share, ms in r.get("server_timing_ms", {}).items():
            if share != "all":
                lines.append(f"{w} open loop at {at}, {share.replace('_', ' ')} of accepted requests, mean ms: "
                             + ", ".join(f"{k} {v}" for k, v in ms.items()))  # fmt: skip
    held = [(f"{w} c={c}", r) for w, points in svc.items() for c, r in points.items()]
    held += [(f"{w} open loop at {at}", r) for w, at, r in points]
    if any("threads" in r for _, r in held):
        lines += [
            "",
            "What held each service point: per deployment, each replica's busiest thread's share of the "
            "point (an event loop runs on one core at most), and the cores all its threads used; the "
            "node's CPUs busy and stolen by the hypervisor (a stolen CPU runs nothing; no thread counts it):",
        ]
        lines += [f"- {name}: {summary(r['threads'])}" for name, r in held if "threads" in r]
    for role, a in results.get("autoscale", {}).items():
        lines.append(f"autoscale: peak {a['peak_replicas']} {role} replicas, up at {a['first_scale_up_s']} s, "
                     f"back to 1 at {a['back_to_one_s']} s (load step ends at {a['load_ends_s']} s)")  # fmt: skip
    lines.append(f"Infinity: {results['infinity']}")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, w in zip(axes, WORKLOADS, strict=True):
        for name, per_w in results["closed"].items():
            pts = per_w.get(w)
            if pts:
                cs = sorted(pts, key=int)
                ax.plot([int(c) for c in cs], [pts[c]["req_per_s"] for c in cs], marker="o", label=name)
        raw = results.get("raw", {}).get(w)
        if raw:
            ax.axhline(raw["raw-batched"]["req_per_s"], ls="--", c="gray", label="raw backend (packed)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("req/s")
        ax.set_title(f"{w}: throughput vs concurrency")
        ax.legend(fontsize=8)
    fig.suptitle(results["machine"])
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results["open"].items():
        xs = [r["offered_req_per_s"] for r in runs]
        ax.plot(xs, [r["p50_ms"] for r in runs], marker="o", label=f"{name} p50")
        ax.plot(xs, [r["p99_ms"] for r in runs], marker="x", ls="--", label=f"{name} p99")
    ax.set_yscale("log")
    ax.set_xlabel("offered re-rank load (req/s, open loop)")
    ax.set_ylabel("latency of answered requests (ms)")
    ax.set_title(f"latency vs offered load — {results['machine']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def autoscale_run(
    svc: Service, role: Role, workload: str, bodies: list[dict[str, Any]], procs: int, log: Any
) -> dict[str, Any]:
    """A load step on one deployment autoscaling 1..4: the replica count every second, up and back down."""
    from ray import serve

    from serve_app.config import DeploymentScaling, load_config
    from serve_app.graph import build_app

    cfg = load_config(svc.config_path)
    scaling = cfg.scaling_for(role).model_copy(
        update={
            "min_replicas": 1,
            "max_replicas": 4,
            "initial_replicas": 1,
            "upscale_delay_s": 3,
            "downscale_delay_s": 15,
            "look_back_period_s": 5,
            "metrics_interval_s": 1,
        }
    )
    scaled = cfg.model_copy(
        update={"scaling": {**cfg.scaling, role: DeploymentScaling.model_validate(scaling.model_dump())}}
    )
    serve.run(build_app(scaled), name="bench", route_prefix="/", blocking=False)
    wait_ready(svc.url)
    timeline: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    load_s = 40.0
    with tempfile.TemporaryDirectory():
        with ProcessPoolExecutor(1) as pool:
            concurrency = 256 if workload == "classify" else 64
            fut = pool.submit(load, svc.url, WORKLOADS[workload], bodies, concurrency, load_s, procs)
            while not fut.done() or time.perf_counter() - t0 < load_s + 60:
                timeline.append((round(time.perf_counter() - t0, 1), svc.replicas(role.capitalize())))
                if fut.done() and timeline[-1][1] == 1 and time.perf_counter() - t0 > load_s + 5:
                    break
                time.sleep(1)
            loaded = fut.result()
    take_accepted(loaded)
    up = next((t for t, n in timeline if n >= 2), None)
    down = next((t for t, n in timeline if t > load_s and n == 1), None)
    result = {"load": loaded, "load_ends_s": load_s, "peak_replicas": max(n for _, n in timeline),
              "first_scale_up_s": up, "back_to_one_s": down, "timeline": timeline}  # fmt: skip
    log(f"autoscale {role} {json.dumps(result)}")
    return result


if __name__ == "__main__":
    main()
