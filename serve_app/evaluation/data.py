"""Readers for the evaluation sets in ``shared/data`` (SciFact in BEIR layout, CLINC150). Nothing is downloaded."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "SERVE_APP_DATA"


def data_root() -> Path:
    """``$SERVE_APP_DATA``, else ``shared/data`` beside the checkout (where CI puts it)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo / "shared" / "data", repo.parent / "shared" / "data"):
        if candidate.exists():
            return candidate
    return repo.parent / "shared" / "data"


@dataclass(frozen=True)
class SciFact:
    corpus: dict[str, str]  # doc id -> "title text" (sentence-transformers' BEIR convention: title + " " + text)
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    candidates: dict[str, list[str]]  # query id -> BM25 top-k doc ids, best first
    candidate_scores: dict[str, list[float]]  # query id -> their BM25 scores, aligned with ``candidates``


def load_scifact(root: Path | None = None, top_k: int = 100) -> SciFact:
    d = (root or data_root()) / "rerank" / "scifact"
    corpus = {}
    with (d / "corpus.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            corpus[r["_id"]] = f"{r['title']} {r['text']}".strip()
    queries = {}
    with (d / "queries.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            queries[r["_id"]] = r["text"]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (d / "qrels" / "train.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    candidates: dict[str, list[str]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    with (d / "candidates" / "bm25-top100.train.trec").open() as f:
        for line in f:
            qid, _, doc, rank, score, _ = line.split()
            if int(rank) <= top_k:
                candidates[qid].append(doc)
                scores[qid].append(float(score))
    return SciFact(corpus, queries, dict(qrels), dict(candidates), dict(scores))


def load_clinc150(root: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Splits ``train``, ``val``, ``oos_train``, ``oos_val`` as (text, label) pairs."""
    raw = json.loads(((root or data_root()) / "intent" / "clinc150" / "data_full.json").read_text())
    return {k: [(t, lab) for t, lab in v] for k, v in raw.items()}
