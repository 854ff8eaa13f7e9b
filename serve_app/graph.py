"""Wires the deployments into one Serve application from one ``AppConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from serve_app.config import AppConfig, DeploymentScaling, Role, load_config
from serve_app.deployments import encoder, ingress
from serve_app.deployments.ray_runtime import apply_ray_env


def _deployment(cls: type) -> Deployment:
    # Ray's overloads of serve.deployment type a bare class as a decorator factory
    return cast(Deployment, serve.deployment(cls))


# the classes stay plain Python; this module is where they become Serve deployments
Ranker = _deployment(encoder.Ranker)
Intent = _deployment(encoder.Intent)
Ingress = _deployment(ingress.Ingress)


def deployment_options(s: DeploymentScaling, user_config: dict[str, Any]) -> dict[str, Any]:
    """Serve options of one deployment: resources, queue limits, and replicas or autoscaling."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        # one log line per request costs more than a small model's forward; errors are still logged
        "logging_config": {"enable_access_log": s.access_log},
        "user_config": user_config,
    }
    if s.max_replicas > s.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "initial_replicas": s.initial_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
            "metrics_interval_s": s.metrics_interval_s,
        }
    else:
        opts["num_replicas"] = s.min_replicas
    return opts


ROLES: dict[str, Role] = {"Ingress": "ingress", "Ranker": "ranker", "Intent": "intent"}


def deployed_roles(cfg: AppConfig) -> dict[str, Role]:
    """The deployments ``cfg`` creates: all three, or the ingress alone when it runs the models."""
    if cfg.model_placement == "ingress":
        return {"Ingress": "ingress"}
    return ROLES


def serve_deploy_config(cfg: AppConfig, config_ref: str, app_name: str = "search", port: int = 8000) -> dict[str, Any]:
    """The ``serve deploy`` file for ``cfg``: the same options and ``user_config`` ``build_app`` sets.

    The ``user_config`` in the file is what makes a model rollout (a new version, a canary weight, a
    rollback) a ``serve deploy`` that reconfigures the replicas in place: Serve applies a changed
    ``user_config`` without restarting them, while a changed ``runtime_env`` or ``args`` would replace
    every replica. ``config_ref`` (``SERVE_APP_CONFIG``) names the same config for the code's defaults.
    """
    configs = user_configs(cfg)
    deployments = []
    for name, role in deployed_roles(cfg).items():
        opts = deployment_options(cfg.scaling_for(role), configs[name])
        deployments.append({"name": name, **opts})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": port, "request_timeout_s": 60},
        "applications": [
            {
                "name": app_name,
                "route_prefix": "/",
                "import_path": "serve_app:graph",
                "runtime_env": {"env_vars": {"SERVE_APP_CONFIG": config_ref}},
                "deployments": deployments,
            }
        ],
    }


def user_configs(cfg: AppConfig) -> dict[str, dict[str, Any]]:
    """Each deployment's ``user_config``: the ingress gets the whole config, a model deployment every
    registered version of its task (``TaskServingConfig``)."""
    app_cfg = cfg.model_copy(update={"artifacts_dir": str(Path(cfg.artifacts_dir).resolve())})
    return {
        "Ingress": app_cfg.model_dump(mode="json"),
        "Ranker": app_cfg.task_serving("rerank").model_dump(mode="json"),
        "Intent": app_cfg.task_serving("classify").model_dump(mode="json"),
    }


def build_app(cfg: AppConfig) -> Application:
    configs = user_configs(cfg)
    ingress = Ingress.options(**deployment_options(cfg.scaling_for("ingress"), configs["Ingress"]))
    if cfg.model_placement == "ingress":
        return ingress.bind()
    ranker = Ranker.options(**deployment_options(cfg.scaling_for("ranker"), configs["Ranker"])).bind()
    intent = Intent.options(**deployment_options(cfg.scaling_for("intent"), configs["Intent"])).bind()
    return ingress.bind(ranker, intent)


def app_builder(args: dict[str, str]) -> Application:
    """``serve run serve_app.graph:app_builder config=path.yaml``."""
    cfg = load_config(args.get("config"))
    apply_ray_env(cfg.ray_serve)
    return build_app(cfg)
