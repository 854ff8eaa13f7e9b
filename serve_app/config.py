"""One typed configuration, loaded from one YAML file, mapped onto each deployment's ``user_config``."""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from serve_app.core.versions import ModelKey

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")
CONFIG_ENV = "SERVE_APP_CONFIG"
API_KEY_ENV = "SERVE_APP_API_KEY"  # comma-separated bearer keys, added to the config's (rotation: old,new)

BackendKind = Literal["auto", "tensorrt", "torch", "onnxruntime"]
Precision = Literal["fp32", "fp16", "int8"]
Role = Literal["ingress", "ranker", "intent"]  # the deployments: the HTTP ingress tokenizes, the others run models
MODEL_ROLES: tuple[Role, ...] = ("ranker", "intent")  # the deployments that run models
Task = Literal["rerank", "classify"]  # what a model does; each task has one route and one model deployment


def _version_label(v: Any) -> Any:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML's ``version: 2``


# a model version's label: ``1``, ``2``, ``2026-11-20``, ``int8-canary``...
VersionLabel = Annotated[str, BeforeValidator(_version_label), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# where the models run: their own deployments (GPUs, per-model autoscaling) or the ingress's process
ModelPlacement = Literal["deployments", "ingress"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """Dynamic batching of whole requests, bounded by a token budget; forwards per length bucket.

    A ``@serve.batch`` call takes whole requests (a request over ``max_batch_tokens`` is split) until
    their sequences, each padded to its bucket, add up to ``max_batch_tokens``. The batch is then cut
    into forwards of one bucket and at most ``max_batch_size`` rows each, padded to that bucket's
    length. ``batch_slots`` lists the padded row counts a fixed-shape backend (TensorRT, CUDA graphs)
    rounds up to; the CPU backend runs the exact row count.
    """

    max_batch_size: int = Field(32, ge=1, le=1024)  # rows per forward
    max_batch_tokens: int = Field(8192, ge=1)  # padded tokens per batch of requests
    # 0: a batch takes whatever queued while the previous one ran (continuous batching, no added latency)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=5.0)
    max_concurrent_batches: int = Field(1, ge=1, le=16)  # >1 overlaps padding/copies with the device's work
    # per ingress replica and model deployment: handle calls out at once; requests that arrive while they
    # are all out share the next call (a call costs the model replica the same whatever it carries)
    calls_in_flight: int = Field(4, ge=1, le=256)
    # admission control: refuse (503) a request whose expected wait in this replica's queue exceeds this
    max_queue_wait_s: float = Field(0.25, ge=0.0)  # 0 turns it off
    # ... and while it refuses in earnest (refused >= half the admitted, lately: sustained
    # overload, not a closed population at saturation), this shorter budget: the queue then sits at its budget
    # whatever it is, and adds only latency (``batching/admission.py``). 0: max_queue_wait_s throughout.
    # Sized for a GPU: off while a model answers from the CPU, and 10 s after any such answer (the fallback
    # chain's ONNX Runtime link), as is overload_start_within_s: there one call takes longer than such a budget
    overload_queue_wait_s: float = Field(0.0, ge=0.0)
    # ... and a request admitted then must start computing within this long of its arrival (HAProxy's stamp, or
    # the door), or it is refused uncomputed, wherever it waits (the ingress's call slots, the model replica's
    # queue): the queue estimate bounds the mean wait, this the tail (Triton's queue policy: timeout + REJECT).
    # Requests queued when the overload began are held to it too from then on. 0: off
    overload_start_within_s: float = Field(0.0, ge=0.0, le=10.0)
    # ... refused only within this long of its start-by time; past that it is computed (``core.backend.
    # refuses_late``: at an overload's onset, the requests admitted before it was seen were refused up to
    # 60-120 ms after they arrived, on H100 nodes)
    overload_late_refusal_s: float = Field(0.01, ge=0.0, le=10.0)
    overload_window_s: float = Field(0.25, gt=0.0, le=10.0)  # time constant of the refused : admitted it reads
    # refused : admitted over that window at which the overload is judged (a closed population at saturation,
    # refused a few per cent, stays far below it)
    overload_refused_ratio: float = Field(0.5, gt=0.0, le=100.0)
    # the budget also covers the time a request waited before the ingress's handler ran, from HAProxy's stamp
    # (``ray_serve.haproxy_shedding`` sets it): the wait that grows when the ingress's event loop is what is full.
    # Read only where Ray runs our HAProxy launcher with that rule (``launcher_stamps``): elsewhere the header is
    # a caller's.
    # HAProxy may forward to an ingress on another node: the clocks must agree (NTP, to a few ms); one running
    # ahead of HAProxy's makes every request look older by that much. A stamp ahead of the ingress's counts 0
    count_wait_before_ingress: bool = True
    buckets: tuple[int, ...] = (32, 64, 128, 256)
    batch_slots: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # dynamic shapes (ONNX Runtime): a forward of mixed lengths is cut where that saves more padded tokens
    # than one more forward costs; unset = the backend's own figure (ONNX Runtime: 20 per thread)
    forward_cost_tokens: int | None = Field(None, ge=0)
    # Ray Serve's own ``@serve.batch`` metrics (``serve_batch_*``): six records per batch on the replica's event
    # loop, 18-31 % of a model replica's busy loop on an H100 node (py-spy). The ``serve_app_*`` metrics count
    # the same things (batch items, their queue wait, forwards, rows), summed in Python and handed over each second
    ray_batch_metrics: bool = False

    @field_validator("buckets", "batch_slots")
    @classmethod
    def _sorted_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(x <= 0 for x in v) or list(v) != sorted(set(v)):
            raise ValueError("must be a non-empty, strictly increasing list of positive integers")
        return v

    @model_validator(mode="after")
    def _slots_cover_batch(self) -> BatchingConfig:
        if self.batch_slots[-1] < self.max_batch_size:
            raise ValueError("the largest batch slot must be >= max_batch_size")
        if self.max_batch_tokens < self.buckets[-1]:
            raise ValueError("max_batch_tokens must hold one sequence of the largest bucket")
        return self


class BackendConfig(_Strict):
    """Which runtime executes the model; ``auto`` walks TensorRT → PyTorch (GPU) → ONNX Runtime (CPU)."""

    kind: BackendKind = "auto"
    precision: Precision = "fp16"  # GPU backends; ONNX Runtime on the CPU always runs the FP32 graph
    # ONNX Runtime: forwards that run at once, each on intra_op_threads threads. auto: one thread per forward,
    # and as many forwards as the cores this process may run on (a CPU model replica is the compute)
    intra_op_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    parallel_forwards: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    cuda_graphs: bool = True
    gpu_memory_margin: float = Field(0.1, ge=0, lt=1)  # of a replica's num_gpus share, kept free


class GateThresholds(_Strict):
    """An engine may serve only if its outputs stay this close to the FP32 reference."""

    min_cosine: float = Field(..., gt=0, le=1)  # per sequence, worst case in every bucket
    max_metric_drop_pt: float = Field(..., ge=0)  # NDCG@10 (rankers) or accuracy (classifiers), points


class EngineConfig(_Strict):
    """Offline engine builds: one optimization profile per length bucket, batch 1..max_batch_size."""

    targets: tuple[str, ...] = ("SM86", "SM89")  # TensorRT-RTX ahead-of-time targets (A10G, L4)
    workspace_mib: int = Field(1024, ge=16)
    optimization_level: int = Field(3, ge=0, le=5)
    contexts_per_bucket: int = Field(1, ge=1, le=8)  # concurrency slots: one execution context each
    gate: dict[Precision, GateThresholds] = {
        "fp32": GateThresholds(min_cosine=0.99999, max_metric_drop_pt=0.1),
        "fp16": GateThresholds(min_cosine=0.9995, max_metric_drop_pt=0.5),
        "int8": GateThresholds(min_cosine=0.95, max_metric_drop_pt=1.0),
    }
    gate_queries: int = Field(60, ge=5)  # SciFact dev queries (top-30 each) for the NDCG@10 check
    gate_utterances: int = Field(600, ge=50)  # CLINC150 val utterances for the accuracy check
    calibration_sequences: int = Field(256, ge=16)  # real texts whose activations set the int8 recipe's ranges


FusionMethod = Literal["z_linear", "rrf"]
ChunkAggregation = Literal["max", "mean", "first"]


class FusionConfig(_Strict):
    """How a re-ranking request's first-stage scores (when it sends them) mix with the model's
    (``ranking.fusion``). The default was chosen on SciFact dev; README "Score fusion" says how."""

    method: FusionMethod = "z_linear"
    weight: float = Field(0.65, ge=0, le=1)  # of the model's score; the first stage gets 1 - weight
    rrf_k: int = Field(60, ge=1)  # rrf only: the rank offset (60 in the original paper)


class ChunkingConfig(_Strict):
    """Long documents scored as overlapping windows of the largest bucket instead of cut there."""

    enabled: bool = False  # a request may ask either way (``chunking``); this is the default
    overlap_tokens: int = Field(64, ge=0)  # tokens each window repeats from the one before
    aggregation: ChunkAggregation = "max"  # a document's score from its windows' scores
    max_chunks_per_document: int = Field(8, ge=1)  # beyond it the rest is cut (counted as truncated)


class ScoreCacheConfig(_Strict):
    """Output rows of recently seen sequences, per model version, in each model replica."""

    # LRU entries (a document's embedding, or a (query, document) pair's score); 0 turns the cache off
    max_entries: int = Field(0, ge=0)


class ModelConfig(_Strict):
    """A served model.

    ``source`` is ``builtin`` (the packaged all-MiniLM-L6-v2, plus the shipped intent head for
    ``task: classify``), a Hugging Face style model directory (BERT family: ``config.json``,
    ``model.safetensors``, ``tokenizer.json``), or an ``.onnx`` file with ``tokenizer.json`` (and,
    for classifiers, ``labels.json``) beside it.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    # the registry's key is (name, version): routes name a version, responses say which one answered
    version: VersionLabel = "1"
    task: Task
    source: str = "builtin"
    architecture: Literal["auto", "bi_encoder", "cross_encoder"] = "auto"
    oos_label: str | None = "oos"  # the out-of-scope class of an intent model, surfaced in responses
    # other names a request's ``model`` may use for this model: client libraries send their own default
    # (``rerank-v3.5``, ``text-embedding-3-small``, ...) unless told otherwise
    aliases: tuple[str, ...] = ()
    # re-rankers: what the ingress does around the model (part of a model's config, so each version
    # can carry its own); changing them retunes, it reloads nothing
    fusion: FusionConfig = FusionConfig()
    chunking: ChunkingConfig = ChunkingConfig()
    score_cache: ScoreCacheConfig = ScoreCacheConfig()
    # this version's runtime (a candidate may try another precision or engine); None: the app's ``backend``
    backend: BackendConfig | None = None

    @property
    def key(self) -> ModelKey:
        return ModelKey(self.name, self.version)

    def weights_identity(self) -> dict[str, Any]:
        """What decides the loaded graph: a change here reloads the model, a change elsewhere retunes."""
        return self.model_dump(exclude={"aliases", "fusion", "chunking", "score_cache", "oos_label"})

    def answers_to(self, requested: str | None) -> bool:
        """A request without a model name means the served one."""
        return requested is None or requested == self.name or requested in self.aliases


class CanaryConfig(_Strict):
    """A second version of the route's model taking ``weight`` percent of its traffic.

    Sticky per caller: requests with the same ``X-Caller-Id`` always get the same version (for a given
    canary version). Weight 0 aborts the rollout, 100 completes it (every request to the canary).
    """

    version: VersionLabel
    weight: float = Field(..., ge=0, le=100)


class ShadowConfig(_Strict):
    """A version that also scores ``share`` of the route's requests, in the background: its answer is
    discarded, its agreement with the serving version's is measured (metrics and ``/v1/models``)."""

    version: VersionLabel
    share: float = Field(1.0, gt=0, le=1)


class RouteConfig(_Strict):
    """Which model version answers a task's routes (``/v1/rerank``... or ``/v1/classify``...)."""

    model: str  # a model name of the registry
    version: VersionLabel  # the serving version
    canary: CanaryConfig | None = None
    shadow: ShadowConfig | None = None
    # what ``rollback`` returns to; kept by ``python -m serve_app.rollout`` when a canary is promoted
    previous: VersionLabel | None = None

    def keys(self) -> list[ModelKey]:
        """Every version this route refers to: serving first."""
        versions = [self.version]
        versions += [x.version for x in (self.canary, self.shadow) if x is not None]
        versions += [self.previous] if self.previous is not None else []
        return [ModelKey(self.model, v) for v in dict.fromkeys(versions)]

    def weights(self) -> dict[str, float]:
        """Percent of the route's requests each version answers (versions with a share only)."""
        if self.canary is None or self.canary.version == self.version:
            return {self.version: 100.0}
        out = {self.version: 100.0 - self.canary.weight, self.canary.version: self.canary.weight}
        return {v: w for v, w in out.items() if w > 0}


class RoutesConfig(_Strict):
    rerank: RouteConfig
    classify: RouteConfig

    def of(self, task: Task) -> RouteConfig:
        return self.rerank if task == "rerank" else self.classify


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(2_000_000, ge=1_024)
    max_documents: int = Field(1_000, ge=1)
    max_inputs: int = Field(256, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    # sequences one re-ranking request may send to the model once long documents are windowed (413 beyond)
    max_chunks_per_request: int = Field(4_000, ge=1)
    # a request's deadline: past it the answer is 504 at once and its queued work is dropped downstream;
    # a client may ask for less with ``X-Request-Timeout-Ms``, never for more
    request_timeout_s: float = Field(30.0, gt=0, le=600)


class TokenizationConfig(_Strict):
    """How the ingress tokenizes: on worker threads of its own, a whole request per thread when they are busy
    (as TEI's router does), a request split over them when they are idle."""

    # per ingress replica; auto: its num_cpus, rounded up
    threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # per ingress replica and model version: the token ids of this many whitespace-separated chunks of text
    # ("kinase,"), remembered (~150 bytes each: ~20 MiB). A request whose chunks are all known is tokenized on
    # the event loop by lookups (SciFact re-rank, 21 abstracts: 0.6 against 5.1 ms of CPU). 0: off
    chunk_cache_entries: Annotated[int, Field(ge=0)] = 131_072


class PythonGcConfig(_Strict):
    """Python's cyclic garbage collector in every serving process (ingress and model replicas).

    A request allocates and frees many objects; Python collects its youngest generation every 700 net
    allocations, and under load what it then walks is mostly the objects of requests still in flight. On 2
    cores, the ingress collected about 100 times a second at classify c=64 (about 40 ms a second, up to 10 ms
    at a time, each pausing its event loop); at 20,000 it did not collect at all in 10 s. On an H100 node the
    classify p99 at 3,000 req/s fell from 161-246 to 68-115 ms (scripts/results/h100-2026-11-23-gc). Reference
    cycles wait longer to be freed: a few MB at most.
    """

    gen0_threshold: Annotated[int, Field(ge=1)] | None = 20_000  # None: Python's own (700)


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def api_key_digest(key: str) -> str:
    """What is kept of an API key: its SHA-256, compared in constant time (``api.auth``)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class AuthConfig(_Strict):
    """Bearer API keys; none configured means an open service (the laptop default).

    Each entry is a key or its ``sha256:<hex>`` digest. Only digests are kept, so a key never reaches
    ``user_config``, ``serve status``, the dashboard or a log; several keys allow rotation.
    """

    api_keys: tuple[str, ...] = ()

    @field_validator("api_keys")
    @classmethod
    def _digests(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for k in keys:
            k = k.strip()
            if not k:
                raise ValueError("an API key must not be empty")
            out.append(k if _DIGEST.match(k) else api_key_digest(k))
        return tuple(dict.fromkeys(out))

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)


class DeploymentScaling(_Strict):
    """The Serve knobs of one deployment (``serve_config.yaml`` explains the production values).

    Autoscaling is on when ``max_replicas > min_replicas``; Serve then keeps about
    ``target_ongoing_requests`` (running + queued) per replica.
    """

    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0, le=8)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)  # per caller; beyond it the caller gets 503 at once
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(32.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    look_back_period_s: float = Field(15.0, gt=0)  # must exceed metrics_interval_s
    metrics_interval_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)  # in-flight batches finish before a replica stops
    # Serve's controller learns that a replica died only from its next health check, and only then starts a
    # replacement (Serve's default period: 10 s). A check is one small actor call per replica
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)  # a check unanswered this long fails (a busy loop is slow)
    retry_after_s: float = Field(1.0, ge=0)  # Retry-After on a 503 when this deployment's queue is full
    access_log: bool = False  # Serve's per-request log line (errors are logged regardless)

    @model_validator(mode="after")
    def _replica_bounds(self) -> DeploymentScaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be greater than metrics_interval_s")
        return self


class RayServeRuntime(_Strict):
    """Ray Serve's own throughput switches (its performance guide), set as environment defaults.

    Environment variables are read when Ray starts, so these apply where this package starts Ray after
    reading the config (``serve run``, the tests, the benchmark). A cluster sets them on ``ray start``
    (``cluster.yaml``). An environment variable already set wins.
    """

    # RAY_SERVE_THROUGHPUT_OPTIMIZED: user code on the replica's event loop, buffered request logs, gRPC
    # between deployments, direct ingress, GC frozen after start
    throughput_optimized: bool = True
    # RAY_SERVE_ENABLE_HA_PROXY: HAProxy takes HTTP and forwards to the ingress replicas' own ports
    # instead of the Python proxy; auto = on where a haproxy binary exists (ray[serve] ships one on Linux)
    haproxy: Literal["auto", "on", "off"] = "auto"
    # HAProxy resends a request whose ingress replica died before answering (an empty response) to another
    # replica, as it already does for refused connections; every route only reads and scores, so a resend is
    # safe. HAProxy buffers each whole request before sending it on (``deployments/haproxy_launcher.py``):
    # without that its copy for a resend can lack the body, and the request is lost. Requests over
    # ``haproxy_bufsize`` bytes are not kept for a resend (HAProxy's limit).
    resend_lost_requests: bool = True
    haproxy_bufsize: int = Field(65_536, ge=16_384)
    # how many times HAProxy tries again (each on another replica): its balancing (leastconn) favours a replica
    # that just died, since its connections are gone, until 3 errors mark it down; 3 tries (HAProxy's default)
    # could all land there
    haproxy_retries: int = Field(8, ge=0, le=32)
    # HAProxy's line per request: a syslog access-log line (RAY_SERVE_HAPROXY_LOG_TARGET) and one more that Ray's
    # HAProxy manager parses in Python for its serve_num_http_* and serve_haproxy_* metrics. Off: only the
    # requests that went wrong are logged (an error, a timeout, a retry, a 5xx) and those metrics are off;
    # this app counts and times every request itself (ray_serve_app_request_latency_ms, its dashboard's)
    haproxy_request_log: bool = False
    # While the ingress's latest answer on a route was a refusal for overload (its queue full), given less than
    # haproxy_shedding_memory_ms ago, HAProxy answers that route's new requests with the same refusal itself
    # (``deployments/haproxy_shedding.py``): a refusal in HAProxy costs microseconds, one in the ingress costs its
    # event loop nearly what a request does. Only a request whose whole body HAProxy holds is answered so
    haproxy_shedding: bool = True
    haproxy_shedding_memory_ms: int = Field(20, ge=1, le=1000)
    # How the ingress's calls reach the model deployments: Serve's gRPC transport (each call pickled into one
    # gRPC message, ``handle.options(_by_reference=False)``) or Ray actor calls. Set here, not left to
    # RAY_SERVE_THROUGHPUT_OPTIMIZED, which decides it in the process that builds the app: a task of Serve's
    # controller under ``serve deploy``, but under ``serve run`` and the benchmark a process that had imported
    # Serve before the variable was set, so they made actor calls. gRPC on an H100 node, interleaved: classify at
    # c=64 +50-74 %, ingress CPU per classify request -15-20 % (scripts/results/h100-2026-11-24-grpc/). It also
    # carries a cancelled call (a request past its deadline) to the model replica at once, which drops its queued
    # rows; a cancelled actor call does not arrive in time, and its rows wait until their batch forms. A new value
    # in a later config carries the ingress's next calls (every replica serves both transports), no restart
    grpc_between_deployments: bool = True
    # the largest gRPC message a replica takes or a caller accepts back (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH;
    # Ray's default is 4 MiB): a call carries every request queued at the ingress, up to max_body_bytes each
    grpc_max_message_bytes: int = Field(256 * 1024 * 1024, ge=4 * 1024 * 1024)


def resolve_under(path: str | os.PathLike[str], roots: tuple[str, ...]) -> Path:
    """``path`` with links and ``..`` resolved, if that lies under one of ``roots``; else ``ValueError``.

    A model path comes from a config someone else may write: it must not reach outside the directories the
    operator set aside for models, by ``..`` or by a link.
    """
    real = Path(path).expanduser().resolve()
    for root in roots:
        if real.is_relative_to(Path(root).expanduser().resolve()):
            return real
    raise ValueError(f"{path} resolves to {real}, outside model_roots {list(roots)}; add its directory there")


DEFAULT_MODEL_ROOTS = ("models", "~/models")


def _check_sources(models: tuple[ModelConfig, ...], roots: tuple[str, ...]) -> None:
    for model in models:
        if model.source != "builtin":
            try:
                resolve_under(model.source, roots)
            except ValueError as e:
                raise ValueError(f"model {model.name!r}: source {e}") from None


class ModelServingConfig(_Strict):
    """Everything one model deployment needs; sent as its ``user_config``."""

    model: ModelConfig
    batching: BatchingConfig = BatchingConfig()
    backend: BackendConfig = BackendConfig()
    engine: EngineConfig = EngineConfig()
    artifacts_dir: str = "engines"
    model_roots: tuple[str, ...] = DEFAULT_MODEL_ROOTS

    @model_validator(mode="after")
    def _sources_under_roots(self) -> ModelServingConfig:
        _check_sources((self.model,), self.model_roots)
        return self


class TaskServingConfig(_Strict):
    """What one model deployment (Ranker or Intent) loads: every registered version of its task, side by side.

    Sent as its ``user_config``: a new version is loaded, checked against its probe reference and warmed
    beside the others; a version that fails never takes traffic.
    """

    task: Task
    versions: tuple[ModelServingConfig, ...]  # the route's serving version first
    python_gc: PythonGcConfig = PythonGcConfig()

    @property
    def serving(self) -> ModelKey:
        return self.versions[0].model.key


class AppConfig(_Strict):
    # the registry: every model version to load, keyed by (name, version); listed but not routed = standby
    # (loaded and warm: a rollback to it takes seconds)
    models: tuple[ModelConfig, ...]
    routes: RoutesConfig
    batching: BatchingConfig = BatchingConfig()
    backend: BackendConfig = BackendConfig()
    limits: LimitsConfig = LimitsConfig()
    tokenization: TokenizationConfig = TokenizationConfig()
    python_gc: PythonGcConfig = PythonGcConfig()
    auth: AuthConfig = AuthConfig()
    engine: EngineConfig = EngineConfig()
    artifacts_dir: str = "engines"  # built artifacts and engines; a manifest's plan must lie in its own folder
    # where a model ``source`` path may point (after links and ``..``): nothing outside is loaded
    model_roots: tuple[str, ...] = DEFAULT_MODEL_ROOTS
    # "ingress": no model deployments, the ingress process runs both models (one process, no actor hop);
    # "deployments": a Ranker and an Intent deployment each (what fractional GPUs need)
    model_placement: ModelPlacement = "deployments"
    ray_serve: RayServeRuntime = RayServeRuntime()
    scaling: dict[Role, DeploymentScaling] = {}

    @model_validator(mode="after")
    def _registry(self) -> AppConfig:
        _check_sources(self.models, self.model_roots)
        seen: set[ModelKey] = set()
        for m in self.models:
            if m.key in seen:
                raise ValueError(f"models: {m.key} is listed twice")
            seen.add(m.key)
        for task in ("rerank", "classify"):
            route = self.routes.of(task)
            for key in route.keys():
                found = self.find(key)
                if found is None:
                    listed = ", ".join(str(m.key) for m in self.models if m.task == task) or "none"
                    raise ValueError(f"routes.{task}: {key} is not in models (listed for {task}: {listed})")
                if found.task != task:
                    raise ValueError(f"routes.{task}: {key} is a {found.task} model")
        return self

    @model_validator(mode="after")
    def _model_autoscaling_reachable(self) -> AppConfig:
        """A model deployment counts calls, not requests: each ingress replica keeps at most
        ``batching.calls_in_flight`` calls out per model (requests arriving meanwhile share the next one).
        A target that all the ingress replicas together can never send would never scale the model out
        (production had the intent's at 48 with 4 calls per ingress: below 12 ingress replicas it could not
        leave its first replica)."""
        if self.model_placement != "deployments":
            return self
        most_calls = self.batching.calls_in_flight * self.scaling_for("ingress").max_replicas
        for role in MODEL_ROLES:
            s = self.scaling_for(role)
            if s.max_replicas > s.min_replicas and s.target_ongoing_requests * max(1, s.min_replicas) >= most_calls:
                raise ValueError(
                    f"scaling.{role}.target_ongoing_requests={s.target_ongoing_requests:g}: its replicas see at most "
                    f"{most_calls} calls (batching.calls_in_flight {self.batching.calls_in_flight} x scaling.ingress"
                    f".max_replicas {self.scaling_for('ingress').max_replicas}), so it could never scale out; "
                    "set it below that, divided by its min_replicas"
                )
        return self

    def find(self, key: ModelKey) -> ModelConfig | None:
        return next((m for m in self.models if m.key == key), None)

    def model_for(self, task: Task) -> ModelConfig:
        """The version a task's route serves (its canary aside)."""
        route = self.routes.of(task)
        found = self.find(ModelKey(route.model, route.version))
        assert found is not None, "validated"
        return found

    def versions_of(self, task: Task) -> list[ModelConfig]:
        """Every registered version of ``task``: the serving one first."""
        serving = self.model_for(task)
        return [serving, *(m for m in self.models if m.task == task and m.key != serving.key)]

    def with_serving(self, model: ModelConfig) -> AppConfig:
        """This config with ``model`` in place of the version its task's route serves, and routed to."""
        old = self.model_for(model.task)
        route = self.routes.of(model.task).model_copy(update={"model": model.name, "version": model.version})
        models = tuple(model if m.key == old.key else m for m in self.models)
        routes = self.routes.model_copy(update={model.task: route})
        return self.model_copy(update={"models": models, "routes": routes})

    def version_serving(self, model: ModelConfig) -> ModelServingConfig:
        return ModelServingConfig(
            model=model,
            batching=self.batching,
            backend=model.backend or self.backend,
            engine=self.engine,
            artifacts_dir=str(Path(self.artifacts_dir).resolve()),
            model_roots=tuple(str(Path(r).expanduser().resolve()) for r in self.model_roots),
        )

    def serving(self, task: Task) -> ModelServingConfig:
        """The serving version of ``task`` with everything a model replica needs."""
        return self.version_serving(self.model_for(task))

    def task_serving(self, task: Task) -> TaskServingConfig:
        return TaskServingConfig(
            task=task,
            versions=tuple(self.version_serving(m) for m in self.versions_of(task)),
            python_gc=self.python_gc,
        )

    def scaling_for(self, which: Role) -> DeploymentScaling:
        return self.scaling.get(which, DeploymentScaling())

    def tokenizer_threads(self) -> int:
        threads = self.tokenization.threads
        return max(1, math.ceil(self.scaling_for("ingress").num_cpus)) if threads == "auto" else threads


PACKAGED_CONFIGS = Path(__file__).with_name("configs")


def load_config(path: str | os.PathLike[str] | None = None) -> AppConfig:
    """Read the YAML at ``path``, else ``$SERVE_APP_CONFIG``, else the packaged default; add the API keys
    of ``$SERVE_APP_API_KEY``.

    A bare name such as ``production`` means ``serve_app/configs/production.yaml`` (what a cluster's
    ``runtime_env`` refers to, wherever the package is installed).
    """
    chosen = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    if not chosen.exists() and (PACKAGED_CONFIGS / f"{chosen}.yaml").exists():
        chosen = PACKAGED_CONFIGS / f"{chosen}.yaml"
    data = yaml.safe_load(chosen.read_text()) or {}
    env_keys = env_api_keys()
    if env_keys:
        auth = dict(data.get("auth") or {})
        auth["api_keys"] = [*(auth.get("api_keys") or []), *env_keys]
        data["auth"] = auth
    return AppConfig.model_validate(data)


def env_api_keys() -> list[str]:
    """The keys of ``$SERVE_APP_API_KEY`` in this process (set on ``ray start``: every replica has them, even
    when a ``serve deploy`` file carries a ``user_config`` written elsewhere)."""
    return [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
