"""Export the configured models to ``engines/<model>/<version>/model.onnx`` and check them against PyTorch.

The graph is built from the safetensors weights by serve_app.models.bert_onnx (no torch needed; the
replicas do the same on start when the file is missing). With torch installed (the ``export`` or
``test`` extra) each graph is compared with the PyTorch model on real text and the max abs diff is
recorded in ``export.json`` beside it.

    python scripts/export_models.py [--config my.yaml] [--precision fp16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import numpy as np

from serve_app.backends.onnxruntime import OnnxRuntimeBackend
from serve_app.batching.plan import run_bucketed
from serve_app.config import load_config
from serve_app.models.artifacts import ModelArtifacts, resolve
from serve_app.models.tokenizer import TextEncoder

CHECK_TEXTS = [
    "how do I reset my password",
    "what is the balance of my checking account",
    "Likelihood ratios are one of the best measures of diagnostic accuracy, although they are seldom used.",
    "Vitamin D deficiency is associated with an increased risk of cardiovascular disease. " * 12,
]


def torch_reference(art: ModelArtifacts, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    assert art.source_dir is not None
    enc = TextEncoder(art.tokenizer_path, art.max_length).encode(texts)
    if art.architecture == "cross_encoder":
        model = AutoModelForSequenceClassification.from_pretrained(str(art.source_dir)).eval()
    else:
        model = AutoModel.from_pretrained(str(art.source_dir)).eval()
    rows = []
    with torch.no_grad():
        for e in enc:
            ids = torch.tensor(e.ids[None])
            out = model(input_ids=ids, token_type_ids=torch.tensor(e.type_ids[None]))
            if art.architecture == "cross_encoder":
                rows.append(out.logits[0].numpy())
                continue
            emb = out.last_hidden_state[0].mean(0)
            emb = emb / emb.norm().clamp_min(1e-12)
            if art.architecture == "classifier":
                head = np.load(art.directory / "head.npz")
                rows.append(emb.numpy() @ head["weight"].T + head["bias"])
            else:
                rows.append(emb.numpy())
    return np.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    args = ap.parse_args()
    cfg = load_config(args.config)
    for model in cfg.models:
        t0 = time.perf_counter()
        art = resolve(model, cfg.artifacts_dir)
        path = art.precision_onnx(args.precision)
        record: dict[str, object] = {
            "model": art.name,
            "version": art.version,
            "onnx": str(path),
            "precision": args.precision,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if art.source_dir is not None and importlib.util.find_spec("torch") is not None:
            seqs = TextEncoder(art.tokenizer_path, art.max_length).encode(CHECK_TEXTS)
            ours = run_bucketed(OnnxRuntimeBackend(path, 2), seqs, cfg.batching.buckets, 8)
            record["max_abs_diff_vs_pytorch"] = float(np.abs(ours - torch_reference(art, CHECK_TEXTS)).max())
        (art.directory / f"export.{args.precision}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
