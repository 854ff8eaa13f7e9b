"""HTTP ingress and CPU tokenizer in one deployment: validates, tokenizes, calls the models.

Tokenizing here saves an actor hop per request (HTTP → ingress → model instead of HTTP → ingress →
tokenizer → model); the ingress scales on its own CPU replicas, and the sequences travel packed as numpy
arrays (``Sequences``). One module per job:

- ``deployment``: the ``Ingress`` class: dispatch, deadlines, errors mapped to JSON, configuration;
- ``dialects``: the routes, one module per client's shape (TEI, Cohere, OpenAI, ours, operations);
- ``pipeline``: the path every route shares: admit, read, tokenize, call the model;
- ``door``: admission at the door, before a body is read (503 at once, never a hang);
- ``tokenizer_threads``: short inputs on the event loop, long ones split over this replica's threads;
- ``versions``: which version of a route's model answers (serving, canary, shadow, fallback while a
  deploy is under way) and each version's tokenizer;
- ``rerank`` and ``trace``: what a request carries on its way.
"""

from serve_app.deployments.ingress.deployment import Ingress

__all__ = ["Ingress"]
