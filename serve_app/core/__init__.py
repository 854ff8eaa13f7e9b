"""The lowest layer: types every other layer shares (sequences, padded batches, the backend contract).

Nothing here imports from the rest of ``serve_app``, so ``api``, ``batching``, ``backends`` and
``deployments`` can all depend on it without importing upward.
"""
