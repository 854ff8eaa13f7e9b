"""Model rollouts: which version answers a request (``router``), how a shadow's answers compare
(``agreement``), and the one-command config changes (``commands``, ``python -m serve_app.rollout``)."""
