"""PyTorch on the GPU: the fallback when no TensorRT engine fits this GPU (e.g. TensorRT-RTX on Hopper).

The encoder is written out here from the same safetensors weights as the ONNX builder, using nothing
that syncs the host, so every fixed (batch slot x bucket) shape can be captured as a CUDA graph. A
MiniLM-sized forward is launch-bound on an H100 (about 3 ms eager whatever the batch); graph replay
removes most of that. What is left is memory traffic, so each layer is few kernels: one QKV projection,
fused attention (``scaled_dot_product_attention``: the scores never reach memory, and its softmax
accumulates in FP32), and LayerNorm on the compute dtype (the kernel accumulates in FP32). Pooling and
heads run in FP32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.config import ModelServingConfig
from serve_app.core.backend import BackendInfo
from serve_app.core.sequences import PaddedBatch
from serve_app.core.timing import Processor
from serve_app.models.artifacts import ModelArtifacts
from serve_app.models.bert_onnx import BertConfig

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class BertEncoder(torch.nn.Module):
    """BERT encoder + the model's head, mirroring serve_app.models.bert_onnx."""

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        cfg: BertConfig,
        architecture: str,
        dtype: torch.dtype,
        linear_head: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        p = "bert." if any(k.startswith("bert.") for k in weights) else ""
        self.cfg, self.architecture, self.dtype = cfg, architecture, dtype
        fp32_heads = ("pooler.", "classifier.")  # a cross-encoder's head runs in FP32, as in the ONNX recipe
        self.w = {
            k.removeprefix(p): v.float() if k.removeprefix(p).startswith(fp32_heads) else v.to(dtype)
            for k, v in weights.items()
        }
        for i in range(cfg.num_layers):  # one projection for query, key and value
            lp = f"encoder.layer.{i}.attention.self."
            for part in ("weight", "bias"):
                parts = [self.w.pop(f"{lp}{n}.{part}") for n in ("query", "key", "value")]
                self.w[f"{lp}qkv.{part}"] = torch.cat(parts)
        self.head = (
            None
            if linear_head is None
            else (torch.from_numpy(linear_head[0]).float(), torch.from_numpy(linear_head[1]).float())
        )

    def to_device(self, device: torch.device) -> BertEncoder:
        self.w = {k: v.to(device) for k, v in self.w.items()}
        if self.head is not None:
            self.head = (self.head[0].to(device), self.head[1].to(device))
        return self

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(
            x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.cfg.layer_norm_eps
        )

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        w, cfg = self.w, self.cfg
        b, s = ids.shape
        pos = torch.arange(s, device=ids.device)
        h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][types]
        h = self._ln(h + w["embeddings.position_embeddings.weight"][pos], "embeddings.LayerNorm")
        # additive, as the ONNX graph does: an all-padding row (a batch slot's filler) stays finite
        additive = ((1.0 - mask.to(self.dtype)) * -10000.0)[:, None, None, :]
        nh, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        for i in range(cfg.num_layers):
            lp = f"encoder.layer.{i}."
            q, k, v = self._lin(h, f"{lp}attention.self.qkv").view(b, s, 3, nh, hd).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
            ctx = ctx.transpose(1, 2).reshape(b, s, cfg.hidden_size)
            h = self._ln(self._lin(ctx, f"{lp}attention.output.dense") + h, f"{lp}attention.output.LayerNorm")
            ff = F.gelu(self._lin(h, f"{lp}intermediate.dense"))
            h = self._ln(self._lin(ff, f"{lp}output.dense") + h, f"{lp}output.LayerNorm")
        if self.architecture == "cross_encoder" or "classifier.weight" in w:
            pooled = torch.tanh(self._lin(h[:, 0].float(), "pooler.dense"))
            return self._lin(pooled, "classifier")
        m = mask.float()[:, :, None]
        emb = (h.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.head is not None:
            return emb @ self.head[0].T + self.head[1]
        return emb


class TorchBackend:
    def __init__(
        self, module: BertEncoder, device: torch.device, precision: str, cuda_graphs: bool, reason: str = ""
    ) -> None:
        self._m = module
        self._device = device
        self._use_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        self.output_name = "logits" if module.architecture != "bi_encoder" else "embeddings"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.info = BackendInfo(
            name="torch",
            device=f"{device} ({name})",
            precision=precision,
            fixed_shapes=self._use_graphs,
            processor=Processor.GPU if device.type == "cuda" else Processor.CPU,
            reason=reason,
            extra={"torch": torch.__version__, "cuda_graphs": self._use_graphs},
        )

    @classmethod
    def create(cls, art: ModelArtifacts, cfg: ModelServingConfig, device: str | None = None) -> TorchBackend:
        from serve_app.core.backend import BackendUnavailable

        if device is None:  # serving: GPU only (the CPU is ONNX Runtime's); tests may ask for "cpu"
            if not torch.cuda.is_available():
                raise BackendUnavailable("torch sees no CUDA device")
            device = "cuda:0"
        dev = torch.device(device)
        if art.source_dir is None:
            raise BackendUnavailable("the torch backend needs model weights (a HF directory), not a bare .onnx file")
        from safetensors.torch import load_file

        precision = "fp32" if cfg.backend.precision == "fp32" or dev.type == "cpu" else "fp16"
        dtype = torch.float16 if precision == "fp16" else torch.float32
        head = None
        head_path = Path(art.directory) / "head.npz"
        if art.architecture == "classifier" and head_path.exists():
            npz = np.load(head_path)
            head = (npz["weight"], npz["bias"])
        weights = load_file(str(art.source_dir / "model.safetensors"))
        module = BertEncoder(
            weights, BertConfig.from_model_dir(art.source_dir), art.architecture, dtype, head
        ).to_device(dev)
        return cls(module, dev, precision, cfg.backend.cuda_graphs)

    def _run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self._m(*tensors)

    def _capture(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        static = [torch.zeros((rows, length), dtype=torch.int64, device=self._device) for _ in INPUTS]
        static[1].fill_(1)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm kernels and allocator before capture
                self._run(static)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            out = self._m(*static)
        return graph, static, out

    def infer(self, batch: PaddedBatch) -> np.ndarray:
        feeds = batch.feeds()
        host = [torch.from_numpy(feeds[n]) for n in INPUTS]
        key = batch.shape
        if self._use_graphs:
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)
            graph, static, out = self._graphs[key]
            for dst, src in zip(static, host, strict=True):
                dst.copy_(src, non_blocking=True)
            graph.replay()
            result = out[: batch.rows].float().cpu()
        else:
            result = self._run([t.to(self._device, non_blocking=True) for t in host])[: batch.rows].float().cpu()
        return result.numpy()

    def warmup(self, shapes: list[tuple[int, int]]) -> None:
        for rows, length in shapes:
            z = np.zeros((rows, length), dtype=np.int64)
            self.infer(PaddedBatch(z, np.ones_like(z), z, rows))

    def gpu_memory(self) -> tuple[int, int] | None:
        if self._device.type != "cuda":
            return None
        return int(torch.cuda.memory_reserved(self._device)), int(torch.cuda.mem_get_info(self._device)[1])

    def close(self) -> None:
        self._graphs.clear()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.empty_cache()
