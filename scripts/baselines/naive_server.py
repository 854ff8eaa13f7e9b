"""The naive baseline: what a team writes in an afternoon. One request → one model call, no batching across
requests, no serving framework; Starlette on uvicorn (``--workers K`` for K processes).

    NAIVE_ENGINE=onnxruntime uvicorn scripts.baselines.naive_server:app --port 8200 --workers 2
    NAIVE_ENGINE=transformers uvicorn scripts.baselines.naive_server:app --port 8200 --workers 4   # GPU, FP16

Same model, same tokenizer, same routes and body shapes as the service (``/v1/rerank``, ``/v1/classify``),
so the benchmark sends both the same requests. Scores are checked against the service's in the benchmark.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tokenizers import Tokenizer

from serve_app.config import load_config
from serve_app.models.artifacts import resolve

ENGINE = os.environ.get("NAIVE_ENGINE", "onnxruntime")
_cfg = load_config(os.environ.get("NAIVE_CONFIG"))
_ranker = resolve(_cfg.model_for("rerank"), _cfg.artifacts_dir)
_intent = resolve(_cfg.model_for("classify"), _cfg.artifacts_dir)


def _tokenizer(path: Any) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=256)
    tok.enable_padding()  # pad to the longest text of the call
    return tok


class OnnxModel:
    def __init__(self, onnx_path: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        return np.asarray(out)


class TransformersModel:
    """transformers AutoModel in FP16 on the GPU, eager, mean pooling (+ the intent head)."""

    def __init__(self, model_dir: Any, head: Any = None) -> None:
        import torch
        from transformers import AutoModel

        self.torch = torch
        self.model = AutoModel.from_pretrained(str(model_dir)).half().cuda().eval()
        self.head = None
        if head is not None:
            npz = np.load(head)
            self.head = (torch.from_numpy(npz["weight"]).cuda(), torch.from_numpy(npz["bias"]).cuda())

    def __call__(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            i, m = t.from_numpy(ids).cuda(), t.from_numpy(mask).cuda()
            h = self.model(input_ids=i, attention_mask=m, token_type_ids=t.from_numpy(types).cuda()).last_hidden_state
            mf = m[:, :, None].float()
            emb = (h.float() * mf).sum(1) / mf.sum(1).clamp_min(1e-9)
            emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.head is not None:
                emb = emb @ self.head[0].T + self.head[1]
            return emb.cpu().numpy()


def _model(art: Any) -> Any:
    if ENGINE == "transformers":
        head = art.directory / "head.npz" if art.architecture == "classifier" else None
        return TransformersModel(art.source_dir, head)
    return OnnxModel(art.onnx_path)


_rank_tok, _intent_tok = _tokenizer(_ranker.tokenizer_path), _tokenizer(_intent.tokenizer_path)
_rank_model, _intent_model = _model(_ranker), _model(_intent)
_labels = list(_intent.labels)


def _encode(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    enc = tok.encode_batch(texts)
    return (
        np.array([e.ids for e in enc], dtype=np.int64),
        np.array([e.attention_mask for e in enc], dtype=np.int64),
        np.array([e.type_ids for e in enc], dtype=np.int64),
    )


async def rerank(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    docs = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
    emb = _rank_model(*_encode(_rank_tok, [body["query"], *docs]))
    scores = emb[1:] @ emb[0]
    order = np.argsort(-scores)[: body.get("top_n") or len(docs)]
    results = [{"index": int(i), "relevance_score": float(scores[i])} for i in order]
    return JSONResponse({"results": results, "model": _cfg.model_for("rerank").name})


async def classify(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    texts = [body["inputs"]] if isinstance(body["inputs"], str) else body["inputs"]
    logits = _intent_model(*_encode(_intent_tok, texts))
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    results = [{"index": i, "label": _labels[int(p.argmax())], "score": float(p.max())} for i, p in enumerate(probs)]
    return JSONResponse({"results": results, "model": _cfg.model_for("classify").name})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


app = Starlette(
    routes=[
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/ready", ready),
    ]
)
