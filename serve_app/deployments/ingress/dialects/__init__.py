"""The routes, one module per client dialect: each parses its client's body, runs the shared request path
(``pipeline.Pipeline``) and shapes the answer as that client expects. Nothing else differs between them.

- ``tei``: Hugging Face TEI (``/rerank``, ``/embed``, ``/predict``);
- ``cohere``: Cohere v1 and v2 re-ranking (``/v1/rerank``, ``/v2/rerank``; Jina speaks v1);
- ``openai``: OpenAI embeddings (``/v1/embeddings``);
- ``native``: this project's own (``/v1/classify``, and ``/v1/search``: re-rank and query intent in one call);
- ``operations``: health, readiness, the models and their versions (``/v1/models``, TEI's ``/info``), OpenAPI.
"""
