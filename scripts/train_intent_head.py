"""Train the shipped intent head: multinomial logistic regression on frozen all-MiniLM-L6-v2 embeddings.

Reproducible (fixed solver, no randomness): CLINC150 ``train`` + ``oos_train`` from ../shared/data, the
regularisation picked on a per-intent held-out fifth of ``train`` (``val`` stays untouched for reporting).
Writes serve_app/assets/intent_clinc150/{head.npz,labels.json}.

    python scripts/train_intent_head.py --data ../shared/data/intent/clinc150/data_full.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from serve_app.backends.onnxruntime import OnnxRuntimeBackend
from serve_app.batching.plan import run_bucketed
from serve_app.config import load_config
from serve_app.models.artifacts import BUILTIN_INTENT_HEAD, resolve
from serve_app.models.tokenizer import TextEncoder


def embed(texts: list[str], threads: int) -> np.ndarray:
    cfg = load_config()
    art = resolve(cfg.model_for("rerank"), cfg.artifacts_dir)  # the plain bi-encoder: normalized embeddings
    enc = TextEncoder(art.tokenizer_path, min(art.max_length, cfg.batching.buckets[-1]))
    return run_bucketed(OnnxRuntimeBackend(art.onnx_path, threads), enc.encode(texts), cfg.batching.buckets, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/intent/clinc150/data_full.json"))
    ap.add_argument("--out", type=Path, default=BUILTIN_INTENT_HEAD)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    data = json.loads(args.data.read_text())
    train = data["train"] + data["oos_train"]
    texts = [t for t, _ in train]
    labels = sorted({lab for _, lab in train})
    y = np.array([labels.index(lab) for _, lab in train])
    x = embed(texts, args.threads)

    # pick C on a held-out fifth of each intent (every 5th example), then refit on all of train
    hold = np.arange(len(y)) % 5 == 0
    best = (0.0, 1.0)
    for c in (3.0, 10.0, 30.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x[~hold], y[~hold])
        acc = float((clf.predict(x[hold]) == y[hold]).mean())
        print(f"C={c:g}: held-out accuracy {acc:.4f}")
        best = max(best, (acc, c))
    clf = LogisticRegression(C=best[1], max_iter=2000).fit(x, y)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "head.npz", weight=clf.coef_.astype(np.float32), bias=clf.intercept_.astype(np.float32))
    (args.out / "labels.json").write_text(json.dumps(labels, indent=0) + "\n")
    print(f"wrote {args.out} (C={best[1]:g}, {len(labels)} labels)")


if __name__ == "__main__":
    main()
