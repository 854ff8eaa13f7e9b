"""On a real GPU (the device machine): the CUDA layer of the TensorRT backend, the PyTorch GPU backend, and
the graph serving on it. Skipped where no CUDA device is visible."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serve_app.backends.onnxruntime import OnnxRuntimeBackend
from serve_app.batching.plan import run_bucketed
from serve_app.config import AppConfig, DeploymentScaling, Task
from serve_app.core.timing import Processor
from serve_app.evaluation.data import load_scifact
from serve_app.models.artifacts import resolve
from serve_app.models.tokenizer import TextEncoder

pytestmark = pytest.mark.gpu
BUCKETS = (32, 64, 128, 256)
SLOTS = (1, 2, 4, 8, 16, 32)


def test_pinned_and_device_buffers_round_trip_on_many_streams() -> None:
    from serve_app.backends import cuda_runtime as cr

    n = 8
    shape = (32, 256)
    errors: list[str] = []

    def worker(i: int) -> None:
        stream = cr.Stream()
        src = cr.PinnedBuffer(shape, np.dtype(np.int64))
        dst = cr.PinnedBuffer(shape, np.dtype(np.int64))
        dev = cr.DeviceBuffer(src.nbytes)
        try:
            for rep in range(50):
                src.array[...] = np.arange(src.array.size).reshape(shape) * (i + 1) + rep
                dst.array[...] = -1
                stream.h2d(dev, src, src.nbytes)
                stream.d2h(dst, dev, src.nbytes)
                stream.synchronize()
                if not np.array_equal(src.array, dst.array):
                    errors.append(f"stream {i} rep {rep}: data mismatch")
        finally:
            for b in (src, dst, dev):
                b.free()
            stream.destroy()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_cuda_graph_capture_and_replay_of_copies() -> None:
    from serve_app.backends import cuda_runtime as cr

    stream = cr.Stream()
    a = cr.PinnedBuffer((1024,), np.dtype(np.float32))
    b = cr.PinnedBuffer((1024,), np.dtype(np.float32))
    dev = cr.DeviceBuffer(a.nbytes)
    stream.begin_capture()
    stream.h2d(dev, a, a.nbytes)
    stream.d2h(b, dev, a.nbytes)
    graph = stream.end_capture()
    for k in range(3):  # replay reads the *current* host contents: addresses are fixed, data is not
        a.array[...] = np.random.default_rng(k).standard_normal(1024)
        graph.launch(stream)
        stream.synchronize()
        assert np.array_equal(a.array, b.array)
    graph.destroy()
    for buf in (a, b, dev):
        buf.free()
    stream.destroy()


def test_cuda_errors_are_raised_not_returned() -> None:
    from serve_app.backends import cuda_runtime as cr

    with pytest.raises(cr.CudaError):
        cr.DeviceBuffer(1 << 60)  # more memory than any GPU has


@pytest.fixture(scope="module")
def real_texts(shared_data: Path) -> list[str]:
    sf = load_scifact(shared_data, top_k=3)
    qids = sorted(sf.queries)[:40]
    return [sf.queries[q] for q in qids] + [sf.corpus[d] for q in qids for d in sf.candidates.get(q, [])[:2]]


@pytest.mark.parametrize("role", ["rerank", "classify"])
def test_torch_gpu_backend_matches_fp32_reference(app_config: AppConfig, real_texts: list[str], role: Task) -> None:
    from serve_app.backends.torch import TorchBackend

    serving = app_config.serving(role)
    art = resolve(serving.model, serving.artifacts_dir)
    seqs = TextEncoder(art.tokenizer_path, 256).encode(real_texts)
    ref = run_bucketed(OnnxRuntimeBackend(art.onnx_path, 4), seqs, BUCKETS, 32)
    backend = TorchBackend.create(art, serving)
    assert backend.info.precision == "fp16" and backend.info.fixed_shapes
    assert backend.info.processor is Processor.GPU  # its answers keep the ingress's overload budgets on
    backend.warmup([(r, b) for b in BUCKETS for r in SLOTS])
    out = run_bucketed(backend, seqs, BUCKETS, 32, SLOTS)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    print(
        f"{role}: torch fp16 + CUDA graphs vs ONNX fp32: "
        f"min cosine {cos.min():.6f}, max abs diff {np.abs(out - ref).max():.2e}"
    )
    assert cos.min() > 0.9995
    if role == "classify":
        assert (out.argmax(1) == ref.argmax(1)).mean() > 0.98
    eager = TorchBackend.create(
        art, serving.model_copy(update={"backend": serving.backend.model_copy(update={"cuda_graphs": False})})
    )
    out_eager = run_bucketed(eager, seqs, BUCKETS, 32, SLOTS)
    assert np.abs(out_eager - out).max() < 1e-2
    backend.close()
    eager.close()


def test_graph_serves_on_gpu_through_the_torch_backend(ray_session: None, app_config: AppConfig) -> None:
    """auto on a GPU without a usable TensorRT engine: PyTorch on the GPU, 0.25 GPU per replica."""
    from conftest import HTTP_PORT, wait_ready
    from ray import serve

    from serve_app.graph import build_app

    gpu_share = DeploymentScaling(num_cpus=1, num_gpus=0.25, max_ongoing_requests=64, max_queued_requests=256)
    scaling = {**app_config.scaling, "ranker": gpu_share, "intent": gpu_share}
    budgets = {"overload_queue_wait_s": 0.02, "overload_start_within_s": 0.02}  # production's start-by mode
    cfg = app_config.model_copy(update={"scaling": scaling, "batching": app_config.batching.model_copy(update=budgets)})
    serve.run(build_app(cfg), name="gpu", route_prefix="/gpu", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/gpu"
    wait_ready(url)
    models = {m["task"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["models"]}
    for m in models.values():
        assert m["backend"] == "torch" and m["device"].startswith("cuda"), m
        assert "tensorrt" in m["backend_reason"]  # why TensorRT was skipped is visible
        print(f"{m['name']}: {m['backend']} {m['precision']} on {m['device']}; skipped: {m['backend_reason']}")
    r = httpx.post(
        f"{url}/v1/rerank",
        json={"query": "reset password", "documents": ["Click forgot password.", "Sunny weather."]},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["results"][0]["index"] == 0
    c = httpx.post(f"{url}/v1/classify", json={"inputs": ["what is my bank balance"]}, timeout=60)
    assert c.json()["results"][0]["label"] == "balance"
    answered = {m["task"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["models"]}
    for m in answered.values():  # answers from the GPU: the start-by mode holds (on the CPU it turns itself off)
        assert m["admission"]["overload_budgets_on"] is True, m["admission"]
    serve.delete("gpu")


def test_gpu_budget_is_reported_and_enforced(ray_session: None, app_config: AppConfig) -> None:
    """0.25 of the card fits and shows in /v1/models; 0.002 of it cannot hold the model and is refused."""
    from conftest import HTTP_PORT, wait_ready
    from ray import serve

    from serve_app.graph import Ranker, build_app

    share = DeploymentScaling(num_cpus=1, num_gpus=0.25)
    scaling = {**app_config.scaling, "ranker": share, "intent": share}
    cfg = app_config.model_copy(update={"scaling": scaling, "model_placement": "deployments"})  # GPU shares
    serve.run(build_app(cfg), name="budget", route_prefix="/budget", blocking=False)
    url = f"http://127.0.0.1:{HTTP_PORT}/budget"
    wait_ready(url)
    for m in httpx.get(f"{url}/v1/models", timeout=30).json()["models"]:
        b = m["gpu_budget"]
        print(f"{m['name']}: holds {b['used_mib']} MiB of a {b['budget_mib']} MiB budget (num_gpus {b['fraction']})")
        assert b["fraction"] == 0.25 and 0 < b["used_bytes"] <= b["budget_bytes"]
    serve.delete("budget")

    tiny: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.002},
        "num_replicas": 1,
        "max_constructor_retry_count": 1,
        "user_config": app_config.task_serving("rerank").model_dump(mode="json"),
    }
    serve._run(Ranker.options(**tiny).bind(), name="too-small", route_prefix=None, _blocking=False)
    deadline = time.monotonic() + 180
    message = ""
    while time.monotonic() < deadline:
        status = serve.status().applications.get("too-small")
        if status is not None and status.status == "DEPLOY_FAILED":
            message = status.deployments["Ranker"].message
            break
        time.sleep(1)
    serve.delete("too-small")
    print(f"num_gpus=0.002 refused: {message[-300:]}")
    assert "raise num_gpus" in message
