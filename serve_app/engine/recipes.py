"""Precision recipes as ONNX graphs: TensorRT 11 and TensorRT-RTX are strongly typed, so precision lives here.

- ``fp32``: the reference graph.
- ``fp16``: written directly by the graph builder in FP16, with LayerNorm, Softmax, pooling and I/O in
  FP32 (every elementwise op sees one dtype, which the strongly typed parser requires).
- ``int8``: explicit, symmetric Q/DQ (what TensorRT consumes) on the weight MatMuls, calibrated on real
  text. The FFN output projection stays FP16/FP32: its post-GELU inputs have outliers that per-tensor
  INT8 cannot hold (quantizing it dropped worst-case cosine from 0.98 to 0.72 on SciFact text).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from serve_app.batching.buckets import bucket_for, pad_batch
from serve_app.config import Precision
from serve_app.core.sequences import Encoded
from serve_app.models.artifacts import ModelArtifacts


def recipe_onnx(
    art: ModelArtifacts, precision: Precision, calibration: list[Encoded] | None, buckets: tuple[int, ...]
) -> Path:
    if precision in ("fp32", "fp16"):
        return art.precision_onnx(precision)
    path = art.directory / "model.int8.onnx"
    if not path.exists():
        if not calibration:
            raise ValueError("the int8 recipe needs calibration sequences (real text)")
        quantize_int8(art.onnx_path, path, calibration, buckets)
    return path


def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and any(x in inits for x in n.input) and "_ff2" not in n.name
    ]


def quantize_int8(src: Path, dst: Path, calibration: list[Encoded], buckets: tuple[int, ...], batch: int = 16) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    ordered = sorted(calibration, key=len)  # batches of similar length, each padded to its bucket

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = self._batches()

        def _batches(self) -> Iterator[dict[str, object]]:
            for i in range(0, len(ordered), batch):
                chunk = ordered[i : i + batch]
                yield dict(pad_batch(chunk, bucket_for(len(chunk[-1]), buckets)).feeds())

        def get_next(self) -> dict[str, object] | None:
            return next(self._it, None)

    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        quantize_static(
            str(src),
            tmp,
            Reader(),
            quant_format=QuantFormat.QDQ,
            nodes_to_quantize=_weight_matmuls(onnx.load(str(src), load_external_data=False)),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},  # TensorRT wants zero points 0
        )
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
