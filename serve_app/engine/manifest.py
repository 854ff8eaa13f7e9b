"""What an engine was built from, for, and how it validated; checked before a plan is deserialized."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import Precision

SCHEMA_VERSION = 1
FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"  # no separator, no leading dot: stays in its folder


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Profile(_M):
    index: int
    bucket: int
    slot: int  # concurrency slot: each (bucket, slot) gets its own execution context
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]


class TensorIO(_M):
    name: str
    mode: str  # "input" | "output"
    dtype: str
    shape: tuple[int, ...]


class BucketCheck(_M):
    sequences: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float


class Validation(_M):
    passed: bool
    runner: str  # what produced the candidate outputs: the engine itself, or ONNX Runtime on the recipe graph
    reference: str
    thresholds: dict[str, float]
    buckets: dict[str, BucketCheck]
    metric: str
    metric_reference: float
    metric_candidate: float
    metric_drop_pt: float
    failures: list[str]
    seconds: float


class Manifest(_M):
    schema_version: int = SCHEMA_VERSION
    model: str
    model_version: str
    architecture: str
    precision: Precision
    onnx_file: str  # the graph it was built from, relative to the manifest (a record; never opened from here)
    onnx_sha256: str
    plan_file: str = Field(..., pattern=FILE_NAME)  # a file of the manifest's own folder, never a path
    plan_sha256: str
    plan_bytes: int
    flavor: str
    tensorrt_version: str
    compute_capabilities: list[str]  # the AOT targets (RTX) or the build GPU's (datacenter)
    build_gpu: str | None
    profiles: list[Profile]
    io: list[TensorIO]
    build_seconds: float
    optimization_level: int
    workspace_mib: int
    validation: Validation | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.model_validate_json(path.read_text())


class EngineRefused(RuntimeError):
    """The plan on disk must not be deserialized here; the message says why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def engine_dir(model_dir: Path, precision: Precision) -> Path:
    return model_dir / f"trt-{precision}"


def check_compatible(
    manifest: Manifest, plan_path: Path, flavor: str, tensorrt_version: str, compute_capability: str
) -> None:
    """Refuse tampered, foreign or unvalidated plans before any byte reaches the deserializer."""
    if manifest.schema_version != SCHEMA_VERSION:
        raise EngineRefused(f"manifest schema {manifest.schema_version}, expected {SCHEMA_VERSION}")
    if manifest.flavor != flavor:
        raise EngineRefused(f"engine built with {manifest.flavor}, this node runs {flavor}")
    if manifest.tensorrt_version != tensorrt_version:
        raise EngineRefused(
            f"engine built with {manifest.flavor} {manifest.tensorrt_version}, this node has {tensorrt_version}"
        )
    if compute_capability not in manifest.compute_capabilities:
        raise EngineRefused(
            f"engine targets {', '.join(manifest.compute_capabilities)}; this GPU is {compute_capability}"
        )
    if manifest.validation is None or not manifest.validation.passed:
        why = "; ".join(manifest.validation.failures) if manifest.validation else "never validated"
        raise EngineRefused(f"engine did not pass the validation gate ({why})")
    if not plan_path.exists():
        raise EngineRefused(f"{plan_path} is missing")
    if plan_path.resolve().parent != plan_path.parent.resolve():
        raise EngineRefused(f"{plan_path} links outside its engine folder")
    if plan_path.stat().st_size != manifest.plan_bytes or sha256_file(plan_path) != manifest.plan_sha256:
        raise EngineRefused(f"{plan_path} does not match its manifest's sha256 (modified or truncated)")
