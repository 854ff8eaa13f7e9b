"""Build a BERT-family encoder as an ONNX graph straight from its safetensors weights.

Why not ``torch.onnx.export``: the CPU default must not need torch, and owning the graph lets the same
builder emit the FP16 recipe that strongly typed TensorRT needs (every elementwise op sees one dtype;
LayerNorm, Softmax and pooling stay FP32), with no converter in between. The PyTorch model remains the
reference: ``scripts/export_models.py`` and the tests compare against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
Precision = Literal["fp32", "fp16"]
Head = Literal["mean_pool_normalize", "sequence_classification", "linear_on_embedding"]

_MASK_NEG = -10000.0  # representable in FP16; exp() of it underflows to 0 in both precisions


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    hidden_act: str

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BertConfig:
        cfg = json.loads((model_dir / "config.json").read_text())
        if cfg.get("model_type") not in {"bert", None}:
            raise ValueError(
                f"{model_dir}: model_type {cfg.get('model_type')!r} is not BERT-family; "
                "export it to ONNX yourself and point the config at the .onnx file"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_dir}: only absolute position embeddings are supported")
        return cls(
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            hidden_act=cfg.get("hidden_act", "gelu"),
        )


class _GraphWriter:
    """Accumulates nodes and initializers; names are generated so the graph stays readable."""

    def __init__(self, precision: Precision) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.precision = precision
        self.compute = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, array: np.ndarray, hint: str) -> str:
        """A float weight stored in the compute precision."""
        dtype = np.float16 if self.precision == "fp16" else np.float32
        return self.const(array.astype(dtype), hint)

    def fp32_weight(self, array: np.ndarray, hint: str) -> str:
        return self.const(array.astype(np.float32), hint)

    def to_fp32(self, x: str) -> str:
        return x if self.precision == "fp32" else self.op("Cast", [x], "to_fp32", to=TensorProto.FLOAT)

    def to_compute(self, x: str) -> str:
        return x if self.precision == "fp32" else self.op("Cast", [x], "to_fp16", to=self.compute)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, hint: str) -> str:
        """y = x @ w.T + b, with w in PyTorch's [out, in] layout."""
        y = self.op("MatMul", [x, self.weight(np.ascontiguousarray(w.T), f"{hint}_w")], hint)
        return self.op("Add", [y, self.weight(b, f"{hint}_b")], hint)

    def layer_norm(self, x: str, gamma: np.ndarray, beta: np.ndarray, eps: float) -> str:
        """LayerNorm always runs in FP32: FP16 variance overflow is the classic BERT failure."""
        y = self.op(
            "LayerNormalization",
            [self.to_fp32(x), self.fp32_weight(gamma, "ln_g"), self.fp32_weight(beta, "ln_b")],
            "layernorm",
            axis=-1,
            epsilon=eps,
        )
        return self.to_compute(y)


def _gelu(g: _GraphWriter, x: str) -> str:
    # exact (erf) GELU, as BERT's "gelu"; opset 17 has no Gelu op
    dtype = np.float16 if g.precision == "fp16" else np.float32
    scaled = g.op("Mul", [x, g.const(np.array(1 / np.sqrt(2), dtype), "inv_sqrt2")])
    erf = g.op("Erf", [scaled])
    one_plus = g.op("Add", [erf, g.const(np.array(1.0, dtype), "one")])
    half_x = g.op("Mul", [x, g.const(np.array(0.5, dtype), "half")])
    return g.op("Mul", [half_x, one_plus], "gelu")


def _encoder(g: _GraphWriter, w: dict[str, np.ndarray], cfg: BertConfig, prefix: str) -> tuple[str, str]:
    """Embeddings + transformer layers. Returns (hidden states [B,S,H], float32 mask [B,S])."""
    p = prefix
    dtype = np.float16 if g.precision == "fp16" else np.float32
    words = g.op("Gather", [g.weight(w[f"{p}embeddings.word_embeddings.weight"], "word_emb"), "input_ids"])
    types = g.op("Gather", [g.weight(w[f"{p}embeddings.token_type_embeddings.weight"], "type_emb"), "token_type_ids"])
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(np.array(1, np.int64), "axis1")], "seq_len")
    positions = g.op("Range", [g.const(np.array(0, np.int64), "zero"), seq_len, g.const(np.array(1, np.int64), "step")])
    pos = g.op("Gather", [g.weight(w[f"{p}embeddings.position_embeddings.weight"], "pos_emb"), positions])
    h = g.op("Add", [g.op("Add", [words, types]), pos], "embeddings")
    h = g.layer_norm(h, w[f"{p}embeddings.LayerNorm.weight"], w[f"{p}embeddings.LayerNorm.bias"], cfg.layer_norm_eps)

    mask_f32 = g.op("Cast", ["attention_mask"], "mask_f32", to=TensorProto.FLOAT)
    # additive mask [B,1,1,S]: 0 where attended, -10000 where padded
    inv = g.op("Sub", [g.const(np.array(1.0, np.float32), "one_f32"), mask_f32])
    additive = g.op("Mul", [inv, g.const(np.array(_MASK_NEG, np.float32), "neg")])
    additive = g.op("Unsqueeze", [additive, g.const(np.array([1, 2], np.int64), "axes12")], "mask4d")

    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    split_shape = g.const(np.array([0, 0, heads, head_dim], np.int64), "split_heads")
    merge_shape = g.const(np.array([0, 0, cfg.hidden_size], np.int64), "merge_heads")
    scale = g.const(np.array(1 / np.sqrt(head_dim), dtype), "attn_scale")
    for i in range(cfg.num_layers):
        lp = f"{p}encoder.layer.{i}."
        att = f"{lp}attention.self."

        heads_of: dict[str, str] = {}
        for name, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = g.linear(h, w[f"{att}{name}.weight"], w[f"{att}{name}.bias"], f"l{i}_{name}")
            heads_of[name] = g.op("Transpose", [g.op("Reshape", [y, split_shape])], perm=perm)
        q, k, v = heads_of["query"], heads_of["key"], heads_of["value"]
        scores = g.op("Mul", [g.op("MatMul", [q, k]), scale], f"l{i}_scores")
        # softmax in FP32 with the FP32 mask, then back to the compute type
        probs = g.op("Softmax", [g.op("Add", [g.to_fp32(scores), additive])], f"l{i}_probs", axis=-1)
        ctx = g.op("MatMul", [g.to_compute(probs), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        attn_out = g.linear(
            ctx, w[f"{lp}attention.output.dense.weight"], w[f"{lp}attention.output.dense.bias"], f"l{i}_ao"
        )
        h = g.layer_norm(
            g.op("Add", [attn_out, h]),
            w[f"{lp}attention.output.LayerNorm.weight"],
            w[f"{lp}attention.output.LayerNorm.bias"],
            cfg.layer_norm_eps,
        )
        ff = _gelu(g, g.linear(h, w[f"{lp}intermediate.dense.weight"], w[f"{lp}intermediate.dense.bias"], f"l{i}_ff1"))
        ff = g.linear(ff, w[f"{lp}output.dense.weight"], w[f"{lp}output.dense.bias"], f"l{i}_ff2")
        h = g.layer_norm(
            g.op("Add", [ff, h]), w[f"{lp}output.LayerNorm.weight"], w[f"{lp}output.LayerNorm.bias"], cfg.layer_norm_eps
        )
    return h, mask_f32


def _mean_pool_normalize(g: _GraphWriter, h: str, mask_f32: str) -> str:
    """sentence-transformers Pooling(mean) + Normalize, in FP32."""
    h32 = g.to_fp32(h)
    m3 = g.op("Unsqueeze", [mask_f32, g.const(np.array([2], np.int64), "axis2")])
    summed = g.op("ReduceSum", [g.op("Mul", [h32, m3]), g.const(np.array([1], np.int64), "axis1")], keepdims=0)
    counts = g.op("ReduceSum", [m3, g.const(np.array([1], np.int64), "axis1b")], keepdims=0)
    counts = g.op("Max", [counts, g.const(np.array(1e-9, np.float32), "min_count")])
    mean = g.op("Div", [summed, counts], "mean_pool")
    norm = g.op("ReduceL2", [mean], axes=[1], keepdims=1)  # opset 17: axes is still an attribute here
    norm = g.op("Max", [norm, g.const(np.array(1e-12, np.float32), "min_norm")])
    return g.op("Div", [mean, norm], "normalized")


def build_bert_onnx(
    weights: dict[str, np.ndarray],
    cfg: BertConfig,
    head: Head,
    precision: Precision = "fp32",
    linear_head: tuple[np.ndarray, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Encoder + head as one ONNX graph with dynamic batch and sequence axes.

    Inputs are int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape [batch, seq];
    the single FP32 output is ``embeddings`` [batch, hidden] for a bi-encoder or ``logits``
    [batch, classes] for a classifier / cross-encoder.
    """
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    g = _GraphWriter(precision)
    h, mask_f32 = _encoder(g, weights, cfg, prefix)
    if head == "mean_pool_normalize":
        out = _mean_pool_normalize(g, h, mask_f32)
        out_name, width = "embeddings", cfg.hidden_size
    elif head == "linear_on_embedding":
        if linear_head is None:
            raise ValueError("linear_on_embedding needs linear_head=(W [classes, hidden], b [classes])")
        emb = _mean_pool_normalize(g, h, mask_f32)
        w_head, b_head = linear_head
        y = g.op("MatMul", [emb, g.fp32_weight(np.ascontiguousarray(w_head.T), "head_w")])
        out = g.op("Add", [y, g.fp32_weight(b_head, "head_b")], "logits")
        out_name, width = "logits", int(w_head.shape[0])
    else:  # sequence_classification: BertForSequenceClassification (pooler + classifier), e.g. cross-encoders
        cls_tok = g.op("Gather", [h, g.const(np.array(0, np.int64), "cls_index")], axis=1)
        pooled = g.op(
            "Tanh",
            [
                g.linear(
                    cls_tok, weights[f"{prefix}pooler.dense.weight"], weights[f"{prefix}pooler.dense.bias"], "pooler"
                )
            ],
        )
        logits = g.linear(pooled, weights["classifier.weight"], weights["classifier.bias"], "classifier")
        out = g.to_fp32(logits)
        out_name, width = "logits", int(weights["classifier.weight"].shape[0])
    g.nodes.append(helper.make_node("Identity", [out], [out_name], name="output"))

    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", width])]
    graph = helper.make_graph(g.nodes, f"bert_{head}_{precision}", inputs, outputs, g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="serve_app.models.bert_onnx"
    )
    model.ir_version = 8  # readable by every ONNX Runtime and TensorRT parser in use
    onnx.checker.check_model(model)
    return model
