"""``python -m serve_app.engine build|check|show``: offline engine builds, and the probe gate, for the registry.

python -m serve_app.engine build --model all-MiniLM-L6-v2/1 --precision fp16 --precision int8
python -m serve_app.engine check             # every registered version on this node's backend, as a replica would
python -m serve_app.engine show engines/all-MiniLM-L6-v2/<digest>/trt-fp16/manifest.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from serve_app.config import AppConfig, Precision, load_config
from serve_app.engine.build import build_and_validate
from serve_app.engine.manifest import Manifest
from serve_app.engine.trt_shim import import_tensorrt
from serve_app.models.artifacts import resolve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve_app.engine", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and validate engines; the manifest records both")
    b.add_argument("--config")
    b.add_argument("--model", action="append", help="a registered model: name or name/version; default: every one")
    b.add_argument("--precision", action="append", choices=list(get_args(Precision)), help="default: fp16")
    b.add_argument("--flavor", choices=["tensorrt", "tensorrt_rtx"], help="default: whichever is installed")
    c = sub.add_parser("check", help="run each version's probe gate on the backend this node would choose")
    c.add_argument("--config")
    s = sub.add_parser("show", help="print a manifest")
    s.add_argument("manifest", type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "show":
        print(json.dumps(Manifest.read(args.manifest).model_dump(mode="json"), indent=2))
        return 0
    if args.cmd == "check":
        return _check(load_config(args.config))
    cfg = load_config(args.config)
    trt = import_tensorrt(args.flavor)
    failed = 0
    wanted = args.model or [str(m.key) for m in cfg.models]
    unknown = [w for w in wanted if not any(w in (m.name, str(m.key)) for m in cfg.models)]
    if unknown:
        ap.error(f"not in the config's models: {unknown}; registered: {[str(m.key) for m in cfg.models]}")
    for model in (m for m in cfg.models if m.name in wanted or str(m.key) in wanted):
        art = resolve(model, cfg.artifacts_dir)
        for precision in args.precision or ["fp16"]:
            m = build_and_validate(art, precision, cfg.batching, cfg.engine, trt)
            v = m.validation
            assert v is not None
            failed += not v.passed
            print(
                json.dumps(
                    {
                        "model": m.model,
                        "precision": m.precision,
                        "flavor": f"{m.flavor} {m.tensorrt_version}",
                        "targets": m.compute_capabilities,
                        "profiles": len(m.profiles),
                        "build_seconds": m.build_seconds,
                        "plan_mib": round(m.plan_bytes / 2**20, 1),
                        "gate": "pass" if v.passed else "FAIL",
                        "min_cosine": min(c.min_cosine for c in v.buckets.values()),
                        "metric": v.metric,
                        "metric_drop_pt": round(v.metric_drop_pt, 3),
                        "failures": v.failures,
                    }
                )
            )
    return 1 if failed else 0


def _check(cfg: AppConfig) -> int:
    """What a replica does at warm-up, for every registered version: backend choice, warm-up, probe gate."""
    from serve_app.backends.select import select_backend
    from serve_app.core.backend import GateFailed
    from serve_app.engine.probe_check import check_backend, probe_reference

    failed = 0
    for model in cfg.models:
        serving = cfg.version_serving(model)
        art = resolve(model, serving.artifacts_dir)
        b = serving.batching
        ref = probe_reference(art, serving.artifacts_dir, min(art.max_length, b.buckets[-1]))
        backend = select_backend(art, serving)
        info = backend.info
        row: dict[str, object] = {"model": str(model.key), "backend": info.name, "precision": info.precision,
                                  "device": info.device, "reason": info.reason}  # fmt: skip
        try:
            gate = serving.engine.gate[info.precision if info.precision in ("fp32", "fp16", "int8") else "fp32"]  # type: ignore[index]
            row.update(check_backend(backend, ref, gate, b.buckets, b.batch_slots).as_dict())
        except GateFailed as e:
            failed += 1
            row.update(passed=False, error=str(e))
        finally:
            backend.close()
        print(json.dumps(row))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
