"""SciFact dev re-ranking quality (NDCG@10, MRR@10) over the BM25 top-k: BM25 alone, the model alone, the model
fused with BM25's scores, each with documents truncated at the largest bucket and scored as windows.

    python scripts/eval_scifact.py                          # offline, all 809 queries, top-100 (~8 min, 2 cores)
    python scripts/eval_scifact.py --grid                   # + the fusion grid the default weight was chosen on
    python scripts/eval_scifact.py --url http://127.0.0.1:8000 --queries 50    # through a running service

Offline runs the configured ranker (``$SERVE_APP_CONFIG`` or the packaged default) on ONNX Runtime in this
process with the service's own tokenization, windows, batching, aggregation and fusion code
(``serve_app.evaluation.scifact``); the service answers the same figures (``tests/test_service_quality.py``).
Figures are given for all queries and for two halves of the queries in id order: ``tune`` (the 1st, 3rd,
5th, ...: where the defaults were chosen) and ``held_out`` (the others, never looked at while choosing).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from serve_app.config import FusionConfig, load_config
from serve_app.evaluation import scifact as offline
from serve_app.evaluation.data import SciFact, load_scifact

Scores = dict[str, list[float]]


def service_scores(url: str, sf: SciFact, qids: list[str]) -> dict[str, Scores]:
    """Per query: the model's scores and the fused ones, truncated and windowed (two requests per query)."""
    out: dict[str, Scores] = {"model": {}, "fused": {}, "model_windows": {}, "fused_windows": {}}
    with httpx.Client(base_url=url, timeout=300) as client:
        for q in qids:
            pairs = zip(sf.candidates[q], sf.candidate_scores[q], strict=True)
            docs = [{"text": sf.corpus[d], "score": s} for d, s in pairs]
            for windows in (False, True):
                r = client.post("/v1/rerank", json={"query": sf.queries[q], "documents": docs, "chunking": windows})
                r.raise_for_status()
                results = sorted(r.json()["results"], key=lambda x: x["index"])
                suffix = "_windows" if windows else ""
                out["model" + suffix][q] = [x["model_score"] for x in results]
                out["fused" + suffix][q] = [x["relevance_score"] for x in results]
    return out


def offline_scores(sf: SciFact, qids: list[str], threads: int | None) -> tuple[dict[str, Scores], dict[str, Any]]:
    cfg = load_config()
    backend, encoder = offline.offline_ranker(cfg)
    truncated = offline.bi_encoder_scores(sf, qids, backend, encoder, cfg, windows=False)
    windows = offline.bi_encoder_scores(sf, qids, backend, encoder, cfg, windows=True)
    model = truncated.per_document("first")
    model_windows = windows.per_document(cfg.model_for("rerank").chunking.aggregation)
    scores = {
        "model": model,
        "fused": offline.fused(sf, model, cfg.model_for("rerank").fusion),
        "model_windows": model_windows,
        "fused_windows": offline.fused(sf, model_windows, cfg.model_for("rerank").fusion),
    }
    cost = {
        "documents": truncated.documents,
        "sequences_truncated": truncated.sequences,
        "sequences_windows": windows.sequences,
        "windows_per_document": round(windows.sequences / truncated.sequences, 2),
    }
    return scores, cost


def halves(qids: list[str]) -> tuple[list[str], list[str]]:
    """``tune`` and ``held_out``: alternate queries in id order."""
    ordered = sorted(qids, key=int)
    return ordered[0::2], ordered[1::2]


def table(sf: SciFact, qids: list[str], scores: dict[str, Scores]) -> dict[str, dict[str, float]]:
    tune, held = halves(qids)
    parts = {"all": qids, "tune": tune, "held_out": held}
    rows = {"bm25": offline.bm25_scores(sf, qids), **scores}
    return {
        name: {
            f"{metric}_{half}": round(value, 4)
            for half, qs in parts.items()
            if qs
            for metric, value in offline.quality(sf, s, qs).items()
        }
        for name, s in rows.items()
    }


def grid(sf: SciFact, qids: list[str], model: Scores) -> list[dict[str, Any]]:
    """NDCG@10 of each fusion setting on the tune half (where the default was chosen) and the held-out half."""
    tune, held = halves(qids)
    settings = [FusionConfig(method="z_linear", weight=w / 100) for w in range(20, 85, 5)]
    settings += [FusionConfig(method="rrf", weight=w, rrf_k=k) for k in (5, 20, 60) for w in (0.3, 0.5, 0.7)]
    out = []
    for f in settings:
        fused = offline.fused(sf, model, f)
        out.append(
            {
                "method": f.method,
                "weight": f.weight,
                "rrf_k": f.rrf_k if f.method == "rrf" else None,
                "ndcg@10_tune": round(offline.quality(sf, fused, tune)["ndcg@10"], 4),
                "ndcg@10_held_out": round(offline.quality(sf, fused, held)["ndcg@10"], 4),
            }
        )
    return sorted(out, key=lambda r: -r["ndcg@10_tune"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running service: send the queries there instead of scoring offline")
    ap.add_argument("--queries", type=int, default=0, help="first N queries (0 = all 809)")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads offline (default: every core)")
    ap.add_argument("--grid", action="store_true", help="also the fusion settings the default was chosen among")
    args = ap.parse_args()

    sf = load_scifact(top_k=args.top_k)
    qids = [q for q in sf.queries if q in sf.candidates and q in sf.qrels]
    if args.queries:
        qids = qids[: args.queries]
    t0 = time.perf_counter()
    cost: dict[str, Any] = {}
    if args.url:
        scores = service_scores(args.url, sf, qids)
    else:
        scores, cost = offline_scores(sf, qids, args.threads)
    cfg = load_config().model_for("rerank")
    result: dict[str, Any] = {
        "queries": len(qids),
        "top_k": args.top_k,
        "mode": f"service {args.url}" if args.url else "offline onnxruntime fp32",
        "fusion": cfg.fusion.model_dump(),
        "chunking": cfg.chunking.model_dump(exclude={"enabled"}),
        "ndcg_mrr": table(sf, qids, scores),
        "cost": cost,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.grid:
        result["fusion_grid"] = grid(sf, qids, scores["model"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
