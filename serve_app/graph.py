"""Wires the deployments into one Serve application from one ``AppConfig``."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import AppConfig, DeploymentScaling, load_config
from serve_app.deployments.encoder import Intent, Ranker
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.tokenizer import Tokenizer


def deployment_options(s: DeploymentScaling, user_config: dict[str, Any]) -> dict[str, Any]:
    """Serve options of one deployment: resources, queue limits, and replicas or autoscaling."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "user_config": user_config,
    }
    if s.max_replicas > s.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = s.min_replicas
    return opts


def build_app(cfg: AppConfig) -> Application:
    app_cfg = cfg.model_copy(update={"artifacts_dir": str(cfg.serving("ranker").artifacts_dir)})
    whole = app_cfg.model_dump(mode="json")
    tokenizer = Tokenizer.options(**deployment_options(cfg.scaling_for("tokenizer"), whole)).bind()
    ranker = Ranker.options(
        **deployment_options(cfg.scaling_for("ranker"), app_cfg.serving("ranker").model_dump(mode="json"))
    ).bind()
    intent = Intent.options(
        **deployment_options(cfg.scaling_for("intent"), app_cfg.serving("intent").model_dump(mode="json"))
    ).bind()
    return Ingress.options(**deployment_options(cfg.scaling_for("ingress"), whole)).bind(tokenizer, ranker, intent)


def app_builder(args: dict[str, str]) -> Application:
    """``serve run serve_app.graph:app_builder config=path.yaml``."""
    return build_app(load_config(args.get("config")))
