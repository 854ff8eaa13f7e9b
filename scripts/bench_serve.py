"""End-to-end load on the real graph: throughput and latency for 1, 2, 4 ranker replicas sharing one GPU,
per-replica GPU memory, and (``--autoscale``) how the replica count follows a load step.

    python scripts/bench_serve.py --replicas 1 2 4 --num-gpus 0.25 --seconds 20
    python scripts/bench_serve.py --autoscale --max-replicas 4 --num-gpus 0.25

Requests are /v1/rerank with a real SciFact query and --docs of its BM25 candidates, sent by a
bounded number of concurrent clients on loopback for a bounded time. One JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from typing import Any

import httpx

from serve_app.config import AppConfig, DeploymentScaling, load_config
from serve_app.evaluation.data import load_scifact

PORT = 8000


def _requests(docs: int, n: int = 200) -> list[dict[str, Any]]:
    sf = load_scifact(top_k=docs)
    qids = [q for q in sorted(sf.queries) if len(sf.candidates.get(q, [])) >= docs][:n]
    return [{"query": sf.queries[q], "documents": [sf.corpus[d] for d in sf.candidates[q]]} for q in qids]


async def _load(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def client(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await c.post("/v1/rerank", json=bodies[k % len(bodies)])
                latencies.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                k += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies),
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "status": codes,
    }


async def _direct_load(app: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float) -> dict[str, Any]:
    """The ranker deployment alone, through a handle, on pre-tokenized requests: no HTTP, ingress or tokenizer."""
    from ray import serve

    from serve_app.models.artifacts import tokenizer_spec

    cfg = load_config()
    spec = tokenizer_spec(cfg.ranker, cfg.batching.buckets[-1])
    from serve_app.models.tokenizer import TextEncoder

    enc = TextEncoder(spec.tokenizer_path, spec.max_length)
    encoded = [enc.encode([b["query"], *b["documents"]]) for b in bodies]
    handle = serve.get_deployment_handle("Ranker", app_name=app)
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal done
        k = i
        while time.perf_counter() < deadline:
            seqs = encoded[k % len(encoded)]
            await handle.score.remote(seqs[0], seqs[1:])
            done += 1
            k += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"direct_req_per_s": round(done / (time.perf_counter() - t0), 1)}


def gpu_memory_by_pid() -> dict[int, int]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {int(p): int(m) for p, m in (line.split(", ") for line in out.strip().splitlines() if line)}


def _config(base: AppConfig, ranker: DeploymentScaling) -> AppConfig:
    cpu = DeploymentScaling(
        num_cpus=1, max_ongoing_requests=512, max_queued_requests=2048, min_replicas=2, max_replicas=2
    )
    return base.model_copy(
        update={"scaling": {"ingress": cpu, "tokenizer": cpu, "ranker": ranker, "intent": base.scaling_for("intent")}}
    )


def _ranker_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["Ranker"]
    return int(status.replica_states.get("RUNNING", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--num-gpus", type=float, default=0.25)
    ap.add_argument("--num-cpus", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--autoscale", action="store_true")
    ap.add_argument("--direct", action="store_true", help="also load the ranker through a handle, bypassing HTTP")
    ap.add_argument("--max-replicas", type=int, default=4)
    ap.add_argument("--ray-cpus", type=int, help="logical CPUs for ray.init (default: the machine's)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from serve_app.graph import build_app

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    url = f"http://127.0.0.1:{PORT}"
    bodies = _requests(args.docs)
    base = load_config()
    runs = [] if args.autoscale else args.replicas
    for n in runs:
        ranker = DeploymentScaling(
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            min_replicas=n,
            max_replicas=n,
            max_ongoing_requests=64,
            max_queued_requests=1024,
        )
        before = set(gpu_memory_by_pid())
        serve.run(build_app(_config(base, ranker)), name="bench", route_prefix="/", blocking=False)
        asyncio.run(_load(url, bodies, 8, 5))  # warm every replica
        result = asyncio.run(_load(url, bodies, args.concurrency, args.seconds))
        mem = {pid: mib for pid, mib in gpu_memory_by_pid().items() if pid not in before}
        if args.direct:
            result.update(asyncio.run(_direct_load("bench", bodies, args.concurrency, args.seconds)))
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
        ranker_info = next(m for m in models if m["task"] == "rerank")
        print(
            json.dumps(
                {
                    "ranker_replicas": n,
                    "num_gpus_each": args.num_gpus,
                    "docs_per_request": args.docs,
                    "concurrency": args.concurrency,
                    **result,
                    "docs_per_s": round(result["req_per_s"] * args.docs, 1),
                    "backend": f"{ranker_info['backend']} {ranker_info['precision']} {ranker_info['device']}",
                    "gpu_mib_per_process": sorted(mem.values()),
                }
            ),
            flush=True,
        )
        serve.delete("bench")
    if args.autoscale:
        ranker = DeploymentScaling(
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            min_replicas=1,
            max_replicas=args.max_replicas,
            target_ongoing_requests=4,
            upscale_delay_s=3,
            downscale_delay_s=15,
            look_back_period_s=5,
            metrics_interval_s=1,  # the look-back must exceed it (validated in DeploymentScaling)
            max_ongoing_requests=16,
            max_queued_requests=4096,
        )
        serve.run(build_app(_config(base, ranker)), name="bench", route_prefix="/", blocking=False)
        timeline: list[tuple[float, int]] = []
        t0 = time.perf_counter()

        async def sample(stop: asyncio.Event) -> None:
            while not stop.is_set():
                timeline.append((round(time.perf_counter() - t0, 1), _ranker_replicas("bench")))
                await asyncio.sleep(1)

        async def scenario() -> dict[str, Any]:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(stop))
            loaded = await _load(url, bodies, args.concurrency, args.seconds)
            idle_until = time.perf_counter() + 60
            while time.perf_counter() < idle_until and _ranker_replicas("bench") > 1:
                await asyncio.sleep(1)
            stop.set()
            await sampler
            return loaded

        loaded = asyncio.run(scenario())
        peak = max(n for _, n in timeline)
        up = next((t for t, n in timeline if n >= 2), None)
        down = next((t for t, n in timeline if t > args.seconds and n == 1), None)
        print(
            json.dumps(
                {
                    "autoscale": True,
                    "load": loaded,
                    "peak_replicas": peak,
                    "first_scale_up_s": up,
                    "back_to_one_s_after_load": None if down is None else round(down - args.seconds, 1),
                    "timeline": timeline,
                    "gpu_mib_per_process": sorted(gpu_memory_by_pid().values()),
                }
            ),
            flush=True,
        )
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
