"""The ONNX graphs we build from safetensors, checked against the PyTorch models on real text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from serve_app.backends.onnxruntime import OnnxRuntimeBackend
from serve_app.batching.plan import run_bucketed
from serve_app.config import ModelConfig, Task
from serve_app.core.timing import Processor
from serve_app.models.artifacts import builtin_model_dir, resolve, tokenizer_spec
from serve_app.models.tokenizer import TextEncoder

TEXTS = [
    "how do I reset my password",
    "Likelihood ratios are one of the best measures of diagnostic accuracy, although they are seldom used.",
    "0-dimensional biomaterials show inductive properties. " * 30,  # > 256 tokens: truncated
    "a",
]
BUCKETS = (32, 64, 128, 256)


@pytest.fixture(scope="module")
def ranker(artifacts_dir: Path):  # type: ignore[no-untyped-def]
    return resolve(ModelConfig(name="all-MiniLM-L6-v2", task="rerank"), artifacts_dir)


def test_default_graph_is_dynamic_opset17_and_matches_sentence_transformers(ranker) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    model = onnx.load(str(ranker.onnx_path))
    assert model.opset_import[0].version >= 17
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    enc = TextEncoder(ranker.tokenizer_path, 256)
    seqs = enc.encode(TEXTS)
    assert [s.truncated for s in seqs] == [False, False, True, False]
    ours = run_bucketed(OnnxRuntimeBackend(ranker.onnx_path, 2), seqs, BUCKETS, 8)
    ref = SentenceTransformer(str(builtin_model_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert np.abs(ours - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_padding_to_a_longer_bucket_does_not_change_outputs(ranker) -> None:  # type: ignore[no-untyped-def]
    enc = TextEncoder(ranker.tokenizer_path, 256)
    backend = OnnxRuntimeBackend(ranker.onnx_path, 2)
    seqs = enc.encode(TEXTS[:2])
    tight = run_bucketed(backend, seqs, BUCKETS, 8)
    loose = run_bucketed(backend, seqs, (256,), 8)
    assert np.abs(tight - loose).max() < 1e-5


def test_forwards_side_by_side_on_one_session_equal_forwards_one_at_a_time(ranker) -> None:  # type: ignore[no-untyped-def]
    """The CPU default runs a forward per core on one session (``parallel_forwards``, one thread each): the
    same rows as one forward at a time, from any thread."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.backends.onnxruntime import available_cores
    from serve_app.batching.plan import run_forwards
    from serve_app.core.sequences import Sequences

    backend = OnnxRuntimeBackend(ranker.onnx_path, "auto", "auto")
    assert backend.info.extra["intra_op_threads"] == 1
    assert backend.info.concurrency == available_cores()
    assert OnnxRuntimeBackend(ranker.onnx_path, 2, "auto").info.concurrency == max(1, available_cores() // 2)
    assert OnnxRuntimeBackend(ranker.onnx_path, 1, 3).info.concurrency == 3
    enc = TextEncoder(ranker.tokenizer_path, 256)
    reqs = [Sequences.pack(enc.encode([t, *TEXTS])) for t in TEXTS]
    alone, _ = run_forwards(backend, reqs, BUCKETS, 2)
    with ThreadPoolExecutor(4) as pool:
        side_by_side = list(pool.map(lambda _: run_forwards(backend, reqs, BUCKETS, 2, pool=None)[0], range(8)))
        with ThreadPoolExecutor(2) as forwards:
            split, stats = run_forwards(backend, reqs, BUCKETS, 2, pool=forwards)
    assert stats.forwards > 2
    for outputs in [*side_by_side, split]:
        assert max(float(np.abs(a - b).max()) for a, b in zip(outputs, alone, strict=True)) < 1e-6


def test_fp16_graph_keeps_cosine(ranker) -> None:  # type: ignore[no-untyped-def]
    enc = TextEncoder(ranker.tokenizer_path, 256)
    seqs = enc.encode(TEXTS)
    fp32 = run_bucketed(OnnxRuntimeBackend(ranker.onnx_path, 2), seqs, BUCKETS, 8)
    fp16 = run_bucketed(OnnxRuntimeBackend(ranker.precision_onnx("fp16"), 2), seqs, BUCKETS, 8)
    assert (fp32 * fp16).sum(axis=1).min() > 0.9995
    fp16_types = {i.data_type for i in onnx.load(str(ranker.precision_onnx("fp16"))).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in fp16_types


def make_cross_encoder(directory: Path, seed: int = 0) -> Path:
    """A BertForSequenceClassification with the MiniLM encoder and a random 1-logit head (shape checks)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    src = builtin_model_dir()
    cfg = BertConfig.from_pretrained(str(src), num_labels=1, architectures=["BertForSequenceClassification"])
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    from safetensors.torch import load_file

    missing = model.bert.load_state_dict(load_file(str(src / "model.safetensors")), strict=False)
    assert not [k for k in missing.missing_keys if not k.startswith("pooler")]
    model.save_pretrained(str(directory), safe_serialization=True)
    shutil.copyfile(src / "tokenizer.json", directory / "tokenizer.json")
    return directory


def test_cross_encoder_directory_matches_pytorch(tmp_path: Path, artifacts_dir: Path) -> None:
    import torch
    from transformers import BertForSequenceClassification

    src = make_cross_encoder(tmp_path / "cross")
    cfg = ModelConfig(name="tiny-cross", task="rerank", source=str(src))
    art = resolve(cfg, artifacts_dir)
    assert art.architecture == "cross_encoder" and art.output_name == "logits"
    spec = tokenizer_spec(cfg, 256)
    assert spec.pairs
    seqs = TextEncoder(spec.tokenizer_path, spec.max_length).encode_pairs("password reset", TEXTS)
    ours = run_bucketed(OnnxRuntimeBackend(art.onnx_path, 2), seqs, BUCKETS, 8)
    model = BertForSequenceClassification.from_pretrained(str(src)).eval()
    with torch.no_grad():
        for s, row in zip(seqs, ours, strict=True):
            ref = model(
                input_ids=torch.tensor(s.ids[None]), token_type_ids=torch.tensor(s.type_ids[None])
            ).logits.numpy()[0]
            assert np.abs(row - ref).max() < 1e-4
    # and the same graph given as a bare .onnx file is accepted as a cross-encoder
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(art.onnx_path, bare / "model.onnx")
    shutil.copyfile(art.tokenizer_path, bare / "tokenizer.json")
    art2 = resolve(ModelConfig(name="bare-cross", task="rerank", source=str(bare / "model.onnx")), artifacts_dir)
    assert art2.architecture == "cross_encoder" and art2.source_dir is None


def test_intent_head_ships_with_labels(artifacts_dir: Path) -> None:
    art = resolve(ModelConfig(name="minilm-clinc150-intent", task="classify"), artifacts_dir)
    labels = json.loads((art.directory / "labels.json").read_text())
    assert len(labels) == 151 and "oos" in labels
    assert art.output_name == "logits"


def test_missing_source_is_a_clear_error(artifacts_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(ModelConfig(name="x", task="rerank", source="/nonexistent/model"), artifacts_dir)


@pytest.mark.parametrize("task", ["rerank", "classify"])
def test_torch_encoder_matches_the_onnx_graph_on_cpu(artifacts_dir: Path, task: Task) -> None:
    """The PyTorch backend's own encoder (the GPU fallback) on the CPU: FP32 equals the ONNX graph, and its FP16
    recipe (fused QKV, fused attention, LayerNorm on FP16 inputs) stays within the FP16 gate's cosine."""
    import torch

    from serve_app.backends.torch import BertEncoder, TorchBackend
    from serve_app.config import load_config
    from serve_app.models.bert_onnx import BertConfig

    cfg = load_config().model_copy(update={"artifacts_dir": str(artifacts_dir)})
    serving = cfg.serving(task)
    art = resolve(serving.model, serving.artifacts_dir)
    seqs = TextEncoder(art.tokenizer_path, 256).encode(TEXTS)
    ref = run_bucketed(OnnxRuntimeBackend(art.onnx_path, 2), seqs, BUCKETS, 8)
    fp32 = TorchBackend.create(art, serving, device="cpu")
    assert fp32.info.processor is Processor.CPU  # torch on the CPU: its answers keep the ingress's long budget
    # fixed shapes on the CPU too: padding rows and padding to the bucket must not change a real row
    out = run_bucketed(fp32, seqs, BUCKETS, 8, (1, 2, 4, 8))
    assert np.abs(out - ref).max() < 1e-4
    assert fp32._m.w["encoder.layer.0.attention.self.qkv.weight"].shape[0] == 3 * 384

    from safetensors.torch import load_file

    assert art.source_dir is not None
    head = None
    if (art.directory / "head.npz").exists():
        npz = np.load(art.directory / "head.npz")
        head = (npz["weight"], npz["bias"])
    weights = load_file(str(art.source_dir / "model.safetensors"))
    half = BertEncoder(weights, BertConfig.from_model_dir(art.source_dir), art.architecture, torch.float16, head)
    fp16 = TorchBackend(half, torch.device("cpu"), "fp16", cuda_graphs=False)
    out16 = run_bucketed(fp16, seqs, BUCKETS, 8)
    cos = (out16 * ref).sum(1) / (np.linalg.norm(out16, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9995
