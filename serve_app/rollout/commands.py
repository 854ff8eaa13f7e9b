"""Rollout steps as config changes, and the command that applies them.

Every step is a new ``AppConfig`` (pure functions, unit-tested); applying one is a ``serve deploy`` whose
only change is the deployments' ``user_config``, which Serve applies in place: no replica restarts. A
version named by a step must already be registered (``models``): loaded and warm on every replica, so
``promote`` and ``rollback`` take effect as soon as the ingress replicas are reconfigured (seconds).

    python -m serve_app.rollout status   --config prod.yaml
    python -m serve_app.rollout canary   --config prod.yaml --task rerank --version 2 --weight 5 --deploy
    python -m serve_app.rollout promote  --config prod.yaml --task rerank --deploy
    python -m serve_app.rollout rollback --config prod.yaml --task rerank --deploy
    python -m serve_app.rollout shadow   --config prod.yaml --task classify --version 2 --share 0.2 --deploy

The edited config is written back to ``--config`` (or ``--out``; PyYAML drops comments, so keep the file
under version control), the ``serve deploy`` file beside it (``--serve-file``), and with ``--deploy`` it is
deployed (``serve deploy <file> -a $RAY_DASHBOARD_ADDRESS``).
"""

from __future__ import annotations

from serve_app.config import AppConfig, CanaryConfig, RouteConfig, ShadowConfig, Task
from serve_app.core.versions import ModelKey


class RolloutError(ValueError):
    """A step that does not apply to the route as it is (nothing to promote, nothing to roll back to)."""


def _with_route(cfg: AppConfig, task: Task, route: RouteConfig) -> AppConfig:
    # validated again: a step must leave a config that names registered versions only
    data = cfg.model_dump(mode="json")
    data["routes"][task] = route.model_dump(mode="json")
    return AppConfig.model_validate(data)


def _registered(cfg: AppConfig, task: Task, version: str) -> None:
    route = cfg.routes.of(task)
    if cfg.find(ModelKey(route.model, version)) is None:
        listed = [m.version for m in cfg.models if m.name == route.model]
        raise RolloutError(f"{route.model}/{version} is not registered (models: {listed}); add it to models first")


def canary(cfg: AppConfig, task: Task, version: str, weight: float) -> AppConfig:
    """Send ``weight`` percent of the route's requests to ``version`` (0 aborts, 100 sends them all)."""
    route = cfg.routes.of(task)
    _registered(cfg, task, version)
    if version == route.version:
        raise RolloutError(f"{route.model}/{version} already serves {task}")
    return _with_route(cfg, task, route.model_copy(update={"canary": CanaryConfig(version=version, weight=weight)}))


def promote(cfg: AppConfig, task: Task) -> AppConfig:
    """The canary becomes the serving version; the old serving version is kept as ``previous``."""
    route = cfg.routes.of(task)
    if route.canary is None:
        raise RolloutError(f"routes.{task} has no canary to promote")
    update = {"version": route.canary.version, "previous": route.version, "canary": None}
    return _with_route(cfg, task, route.model_copy(update=update))


def rollback(cfg: AppConfig, task: Task) -> AppConfig:
    """Abort a canary if there is one; otherwise serve ``previous`` again (and keep the other as previous)."""
    route = cfg.routes.of(task)
    if route.canary is not None:
        return _with_route(cfg, task, route.model_copy(update={"canary": None}))
    if route.previous is None:
        raise RolloutError(f"routes.{task} has no canary and no previous version to roll back to")
    return _with_route(cfg, task, route.model_copy(update={"version": route.previous, "previous": route.version}))


def shadow(cfg: AppConfig, task: Task, version: str | None, share: float = 1.0) -> AppConfig:
    """Score ``share`` of the route's requests with ``version`` too, in the background; None stops it."""
    route = cfg.routes.of(task)
    if version is None:
        return _with_route(cfg, task, route.model_copy(update={"shadow": None}))
    _registered(cfg, task, version)
    return _with_route(cfg, task, route.model_copy(update={"shadow": ShadowConfig(version=version, share=share)}))


def describe(cfg: AppConfig) -> dict[str, dict[str, object]]:
    """Each route's versions and their configured traffic share."""
    out: dict[str, dict[str, object]] = {}
    for task in ("rerank", "classify"):
        route = cfg.routes.of(task)
        out[task] = {
            "model": route.model,
            "serving": route.version,
            "traffic_share": route.weights(),
            "shadow": route.shadow.model_dump() if route.shadow else None,
            "previous": route.previous,
            "registered": [m.version for m in cfg.models if m.name == route.model],
        }
    return out
