"""``python -m serve_app.rollout``: one command per rollout step (see ``serve_app.rollout.commands``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from serve_app.config import load_config
from serve_app.graph import serve_deploy_config
from serve_app.rollout import commands


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve_app.rollout", description=commands.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("step", choices=["status", "canary", "promote", "rollback", "shadow", "unshadow"])
    ap.add_argument("--config", required=True, help="the app config (YAML) to change")
    ap.add_argument("--task", choices=["rerank", "classify"], default="rerank")
    ap.add_argument("--version", help="canary / shadow: the registered version")
    ap.add_argument("--weight", type=float, default=5.0, help="canary: percent of requests (0 aborts, 100 all)")
    ap.add_argument("--share", type=float, default=1.0, help="shadow: share of requests also scored")
    ap.add_argument("--out", type=Path, help="where to write the changed config (default: --config)")
    ap.add_argument("--serve-file", type=Path, help="the serve deploy file (default: <config>.serve.yaml)")
    ap.add_argument("--ref", help="SERVE_APP_CONFIG on the cluster (default: the config's path)")
    ap.add_argument("--deploy", action="store_true", help="serve deploy it (address: $RAY_DASHBOARD_ADDRESS)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    if args.step == "status":
        print(json.dumps(commands.describe(cfg), indent=2))
        return 0
    try:
        if args.step == "canary":
            if args.version is None:
                ap.error("canary needs --version")
            new = commands.canary(cfg, args.task, args.version, args.weight)
        elif args.step == "promote":
            new = commands.promote(cfg, args.task)
        elif args.step == "rollback":
            new = commands.rollback(cfg, args.task)
        elif args.step == "shadow":
            if args.version is None:
                ap.error("shadow needs --version")
            new = commands.shadow(cfg, args.task, args.version, args.share)
        else:
            new = commands.shadow(cfg, args.task, None)
    except commands.RolloutError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(args.config)
    out.write_text(yaml.safe_dump(new.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    serve_file = args.serve_file or out.with_suffix(".serve.yaml")
    deploy = serve_deploy_config(new, args.ref or str(out.resolve()))
    serve_file.write_text(yaml.safe_dump(deploy, sort_keys=False))
    print(json.dumps({"step": args.step, "routes": commands.describe(new), "config": str(out),
                      "serve_file": str(serve_file)}, indent=2))  # fmt: skip
    if args.deploy:
        address = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
        return subprocess.call(["serve", "deploy", str(serve_file), "-a", address])
    print(f"apply with: serve deploy {serve_file} -a http://<head node>:8265")
    return 0


if __name__ == "__main__":
    sys.exit(main())
