"""SciFact dev re-ranking quality: NDCG@10 / MRR@10 of the bi-encoder over the BM25 top-k candidates.

Two ways, same numbers expected:
  offline  (default)   embeds every candidate once with a backend (ONNX Runtime FP32 unless --backend torch)
  --url URL            sends one /v1/rerank request per query to a running service

    python scripts/eval_scifact.py                     # all 809 queries, top-100
    python scripts/eval_scifact.py --url http://127.0.0.1:8000 --queries 50
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from serve_app.evaluation.data import load_scifact
from serve_app.evaluation.metrics import mean, mrr_at_k, ndcg_at_k, rerank


def offline_scores(
    data_queries: dict[str, str], cands: dict[str, list[str]], corpus: dict[str, str], backend: str, threads: int
) -> dict[str, list[float]]:
    from serve_app.backends.onnxruntime import OnnxRuntimeBackend
    from serve_app.batching.plan import run_bucketed
    from serve_app.config import load_config
    from serve_app.models.artifacts import resolve
    from serve_app.models.tokenizer import TextEncoder

    cfg = load_config()
    art = resolve(cfg.ranker, cfg.artifacts_dir)
    enc = TextEncoder(art.tokenizer_path, min(art.max_length, cfg.batching.buckets[-1]))
    if backend == "torch":
        from serve_app.backends.torch import TorchBackend

        runner = TorchBackend.create(art, cfg.serving("ranker"))
    else:
        runner = OnnxRuntimeBackend(art.onnx_path, threads)
    doc_ids = sorted({d for ds in cands.values() for d in ds})
    qids = list(data_queries)
    emb_d = run_bucketed(
        runner, enc.encode([corpus[d] for d in doc_ids]), cfg.batching.buckets, 32, cfg.batching.batch_slots
    )
    emb_q = run_bucketed(
        runner, enc.encode([data_queries[q] for q in qids]), cfg.batching.buckets, 32, cfg.batching.batch_slots
    )
    row = {d: i for i, d in enumerate(doc_ids)}
    return {q: [float(emb_d[row[d]] @ emb_q[i]) for d in cands[q]] for i, q in enumerate(qids)}


def service_scores(
    url: str, queries: dict[str, str], cands: dict[str, list[str]], corpus: dict[str, str]
) -> dict[str, list[float]]:
    out = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for q, text in queries.items():
            docs = [corpus[d] for d in cands[q]]
            r = client.post("/v1/rerank", json={"query": text, "documents": docs})
            r.raise_for_status()
            scores = [0.0] * len(docs)
            for item in r.json()["results"]:
                scores[item["index"]] = item["relevance_score"]
            out[q] = scores
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--queries", type=int, default=0, help="first N queries (0 = all 809)")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--backend", choices=["onnxruntime", "torch"], default="onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    sf = load_scifact(top_k=args.top_k)
    qids = [q for q in sf.queries if q in sf.candidates and q in sf.qrels]
    if args.queries:
        qids = qids[: args.queries]
    queries = {q: sf.queries[q] for q in qids}
    t0 = time.perf_counter()
    if args.url:
        scores = service_scores(args.url, queries, sf.candidates, sf.corpus)
    else:
        scores = offline_scores(queries, sf.candidates, sf.corpus, args.backend, args.threads)
    elapsed = time.perf_counter() - t0
    ranked = {q: rerank(sf.candidates[q], scores[q]) for q in qids}
    bm25 = {q: sf.candidates[q] for q in qids}
    result = {
        "queries": len(qids),
        "top_k": args.top_k,
        "mode": f"service {args.url}" if args.url else f"offline {args.backend}",
        "ndcg@10": round(mean([ndcg_at_k(ranked[q], sf.qrels[q]) for q in qids]), 4),
        "mrr@10": round(mean([mrr_at_k(ranked[q], sf.qrels[q]) for q in qids]), 4),
        "bm25_ndcg@10": round(mean([ndcg_at_k(bm25[q], sf.qrels[q]) for q in qids]), 4),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
