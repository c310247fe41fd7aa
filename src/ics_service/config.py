"""One typed settings object, read once from `ics.toml` < `ICS_*` environment < flags.

`load_settings` builds it and records where each value came from; the rest of the code
receives the `Settings` object and never reads the environment itself.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .subscriptions import Subscription
from .types import Step

log = logging.getLogger(__name__)

ENV_PREFIX = "ICS_"
DEFAULT_CONFIG_FILE = "ics.toml"
# Environment variables with the prefix that are not settings.
# ICS_SKIP_POSTGRES is `make test`'s switch, read by the test suite.
_ENV_NOT_SETTINGS = {"ICS_CONFIG", "ICS_SKIP_POSTGRES"}


#: Endpoint and variant names (SageMaker's rule): they are folder names of the capture.
CAPTURE_NAME = r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,62}$"

#: Values of the `device` setting: cpu, auto, cuda or cuda:N (models/device.py resolves them).
DEVICE_SPEC = re.compile(r"cpu|auto|cuda(?::\d{1,3})?")

#: `ics serve`'s batch limit when max_batch_size is unset: on a CPU a bigger batch buys
#: nothing per image, a GPU does more work per run the fuller its batches.
CPU_MAX_BATCH = 8
CUDA_MAX_BATCH = 64

#: The steps that have a retry policy.
RETRY_STEPS = (Step.SERIALIZE_IMAGE_DATA, Step.CLASSIFY_IMAGE, Step.NOTIFY)


def _refuse_bools(model: type[BaseModel], data: Any) -> Any:
    """Refuse `true`/`false` for a number or text setting instead of reading it as 1 or 0."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            info = model.model_fields.get(key)
            if isinstance(value, bool) and info is not None and bool not in _types(info.annotation):
                raise ValueError(f"{key} must be {_kind(info.annotation)}, not a boolean")
    return data


def _types(annotation: Any) -> set[Any]:
    args = getattr(annotation, "__args__", None)
    return set(args) if args and getattr(annotation, "__origin__", None) is None else {annotation}


def _kind(annotation: Any) -> str:
    types = _types(annotation) - {type(None)}
    if types <= {int}:
        return "a whole number"
    if types <= {int, float}:
        return "a number"
    return "text" if types <= {str, Path} else "a value of its type"


class RetryPolicy(BaseModel):
    """Retry fields of one step, as in a Step Functions Retrier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_equals: tuple[str, ...] = ("States.Transient",)
    interval_seconds: float = Field(default=1.0, ge=0.0)
    #: Retries after the first attempt (Step Functions' MaxAttempts); 0 disables retrying.
    max_attempts: int = Field(default=3, ge=0, le=99)
    backoff_rate: float = Field(default=2.0, ge=1.0)
    max_delay_seconds: float | None = Field(default=None, gt=0.0)
    jitter: Literal["FULL", "NONE"] = "FULL"

    @model_validator(mode="before")
    @classmethod
    def _no_bools(cls, data: Any) -> Any:
        return _refuse_bools(cls, data)


def _default_retry() -> dict[str, RetryPolicy]:
    return {
        Step.SERIALIZE_IMAGE_DATA: RetryPolicy(),
        Step.CLASSIFY_IMAGE: RetryPolicy(max_attempts=2),
        Step.NOTIFY: RetryPolicy(interval_seconds=2.0, max_attempts=5, max_delay_seconds=60.0),
    }


#: In `serve_models` (`ics serve --model all`): every registered model.
ALL_MODELS = "all"

#: A production variant as `ics serve --variant` and ICS_VARIANTS spell it.
VARIANT_SPEC = re.compile(r"(?P<name>[^=]+)=(?P<model>[^:]+)(?::(?P<weight>[^:]+))?")


class ProductionVariant(BaseModel):
    """A production variant of the SageMaker endpoint `ics serve` is: a served model under
    a variant name, and its share of the traffic (SageMaker's variant weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=CAPTURE_NAME)
    model: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=0.0, le=1_000_000.0)

    @model_validator(mode="before")
    @classmethod
    def _spelled(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return _refuse_bools(cls, data)
        match = VARIANT_SPEC.fullmatch(data.strip())
        if match is None:
            raise ValueError(
                f"variant {data!r}: spell it NAME=MODEL or NAME=MODEL:WEIGHT "
                "(e.g. blue=efficientnet-lite0:3)"
            )
        spelled: dict[str, Any] = {"name": match["name"].strip(), "model": match["model"].strip()}
        if match["weight"] is not None:
            try:
                spelled["weight"] = float(match["weight"])
            except ValueError:
                raise ValueError(
                    f"variant {data!r}: its weight {match['weight']!r} is not a number"
                ) from None
        return spelled


#: Settings that hold alert subscriptions (channel URLs, which may hold secrets).
SUBSCRIPTION_SETTINGS = ("notify", "sagemaker_async_success_notify", "sagemaker_async_error_notify")


class Settings(BaseModel):
    """Every setting ICS has, with its default."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    home: Path = Field(
        default=Path("~/.cache/ics"),
        description="Folder for the model cache, the default store and default result files.",
    )
    store: str | None = Field(
        default=None,
        description="Execution store URL (sqlite:///PATH or postgresql://...); "
        "default sqlite:///HOME/ics.db.",
    )
    model: str = Field(
        default="efficientnet-lite0",
        description="Model name (`ics models list`), or a remote model: "
        "sagemaker:ENDPOINT[/VARIANT] or v2:http(s)://HOST:PORT/v2/models/NAME.",
    )
    labels: Path | None = Field(
        default=None,
        description="Labels file (one class a line) of a remote model given as "
        "sagemaker:... or v2:..., where the endpoint answers bare probabilities.",
    )
    threshold: float = Field(
        default=0.94,
        ge=0.0,
        le=1.0,
        description="Top confidence at or above which an item SUCCEEDS (when not set, the "
        "model card's own threshold if it has one).",
    )
    top_k: int = Field(default=5, ge=1, le=1000, description="Predictions kept per item.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Images per inference batch.")
    device: str = Field(
        default="cpu",
        description="Where models run: 'cpu'; 'cuda' or 'cuda:N' (GPU N through onnxruntime's "
        "CUDA provider, from the onnxruntime-gpu package; missing, ICS stops with exit 4 and "
        "never falls back to the CPU); or 'auto' (CUDA when onnxruntime has it, else the "
        "CPU; the choice is logged).",
    )
    decode_workers: int = Field(
        default=0, ge=0, le=256, description="Threads reading and decoding images (0: automatic)."
    )
    inference_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="onnxruntime intra-op threads per batch (0: automatic, 1 per inference "
        "worker).",
    )
    inference_workers: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Batches run at once on the one model session (0: automatic, one per core).",
    )
    remote_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Requests to a remote model (sagemaker:, v2:) in flight at once; the decode "
        "threads keep reading and decoding meanwhile.",
    )
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="Where batch executions run: 'local' (this process: pipelined decode and "
        "batched inference) or 'ray' (Ray actors, one per model replica, on a Ray cluster; "
        "needs the ics-service[ray] extra). `ics serve` and `ics watch` run locally.",
    )
    ray_address: str | None = Field(
        default=None,
        description='The Ray cluster of `executor = "ray"` (ray.init\'s address: HOST:PORT, '
        "'auto' or ray://...; also read from RAY_ADDRESS); unset: a local Ray is started for "
        "the run and shut down after it.",
    )
    ray_replicas: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Model replicas (Ray actors) of the Ray executor (0: as many as the "
        "cluster's CPUs hold at ray_num_cpus each, at least one).",
    )
    ray_num_cpus: float = Field(
        default=1.0,
        gt=0.0,
        le=256.0,
        description="CPUs Ray reserves for each replica; a replica runs one single-thread "
        "model session per whole CPU (at least one) and decodes on as many threads, at least 2.",
    )
    ray_chunk_size: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Items (their URIs) handed to a replica at a time by the Ray executor.",
    )
    ray_chunks_in_flight: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Chunks queued on each replica at once (the Ray executor's backpressure).",
    )
    remote_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=600.0,
        description="Timeout of one request to a remote model (connect, send and the whole "
        "answer); a request that times out is retried by the ClassifyImage policy.",
    )
    max_pixels: int = Field(
        default=64_000_000, ge=1, description="Images with more pixels are refused before decoding."
    )
    max_bytes: int = Field(
        default=50_000_000, ge=1, description="Files larger than this are refused before reading."
    )
    decode_memory: int = Field(
        default=1_000_000_000,
        ge=1_000_000,
        description="Bytes of memory that images being decoded may take at once, shared by "
        "every decode thread; an image that alone needs more is ImageTooLarge.",
    )
    low_confidence: Literal["flag", "fail"] = Field(
        default="flag",
        description="What LOW_CONFIDENCE items mean for their execution: 'flag' (they are "
        "alerted and counted, and only FAILED items count against the tolerated failures) or "
        "'fail' (they count as failures too, the strict rule).",
    )
    tolerated_failure_percentage: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Percentage of failed items an execution tolerates: FAILED ones, and "
        "LOW_CONFIDENCE ones with low_confidence = 'fail' (unset, with no count either: none).",
    )
    tolerated_failure_count: int | None = Field(
        default=None,
        ge=0,
        description="Number of failed items an execution tolerates: FAILED ones, and "
        "LOW_CONFIDENCE ones with low_confidence = 'fail'.",
    )
    retry: dict[str, RetryPolicy] = Field(
        default_factory=_default_retry,
        description="Retry policy per step (SerializeImageData, ClassifyImage, Notify); "
        "a [retry.STEP] table in ics.toml, or JSON in ICS_RETRY.",
    )
    history: Literal["failures", "full"] = Field(
        default="failures",
        description="Execution history detail: 'failures' records execution events and "
        "failed, low-confidence and retried items; 'full' adds every item's steps.",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="Lowest level of log lines written to stderr."
    )
    # --- `ics serve` -------------------------------------------------------------------
    host: str = Field(
        default="127.0.0.1", description="Address `ics serve` binds (0.0.0.0: every interface)."
    )
    port: int = Field(default=8080, ge=0, le=65535, description="Port `ics serve` listens on.")
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of `ics serve`'s gRPC endpoint (the Open Inference Protocol's "
        "GRPCInferenceService, as Triton serves it); 0 turns it off; unset: the HTTP port + 1, "
        "as Triton's 8000 and 8001 (off when the HTTP port is 0).",
    )
    serve_models: list[str] = Field(
        default_factory=list,
        description="Models `ics serve` serves beside `model`, which stays the default (for "
        'requests that name none); ["all"]: every registered model. `ics serve --model A '
        "--model B` sets model to A and this to [B].",
    )
    variants: list[ProductionVariant] = Field(
        default_factory=list,
        description="Production variants of the SageMaker endpoint: each a served model "
        "under a variant name, with a weight (its share of the invocations that name no "
        "TargetVariant, chosen at random by weight, as SageMaker splits traffic). "
        "`ics serve --variant NAME=MODEL[:WEIGHT]`; in ics.toml a list of such strings or of "
        "{name, model, weight} tables. Each model is served (as by serve_models). Empty: one "
        "variant, capture_variant, serving the default model.",
    )
    api_token: str | None = Field(
        default=None,
        description="Bearer token every API request must carry (ICS_API_TOKEN); unset: none.",
    )
    docs_public: bool = Field(
        default=False,
        description="Serve the API description (/openapi.json) without credentials, so /docs "
        "opens with no token; by default the /docs page asks for the API token (with SigV4 "
        "keys and no token, only this setting opens /docs).",
    )
    token_file: Path | None = Field(
        default=None, description="File holding the API token (instead of api_token)."
    )
    sigv4_access_key_id: str | None = Field(
        default=None,
        description="Accept SigV4-signed SageMaker runtime requests from this AWS access key "
        "(boto3 cannot send a bearer token); enforced with or without an API token, and "
        "without one only signed invocations are served.",
    )
    sigv4_secret_access_key: str | None = Field(
        default=None, description="The secret of sigv4_access_key_id, to verify signatures."
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Most requests `ics serve` classifies in one model run (unset: "
        f"{CPU_MAX_BATCH} on the CPU, {CUDA_MAX_BATCH} on a CUDA device).",
    )
    max_delay_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=10_000.0,
        description="Most time a request waits for others to fill its batch.",
    )
    max_queue: int = Field(
        default=256,
        ge=1,
        description="Requests waiting for the model at most; beyond, 503 with Retry-After.",
    )
    max_body_bytes: int = Field(
        default=20_000_000, ge=1, description="Largest request body accepted (413 beyond)."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, description="A request not answered in this time gets a 504."
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="A request whose line and headers have not all arrived in this time gets "
        "408 and its connection is closed.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="A request body not all received in this time (from its headers) gets 408 "
        "and its connection is closed.",
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="HTTP connections `ics serve` keeps open at most; a new one beyond closes "
        "the connection idle the longest, or, with none idle, is answered 503 and closed "
        "unread. Unset: the open-file limit (ulimit -n) less 256, within 32 and 10,000.",
    )
    unauthenticated_body_memory: int = Field(
        default=64_000_000,
        ge=1,
        description="Bytes that bodies read before their request is authenticated (SigV4 "
        "signatures cover the body) may take at once, all such requests together; beyond, "
        "503 with Retry-After, unread.",
    )
    record_realtime: bool = Field(
        default=True,
        description="Record real-time results in the store, as items of one execution a day.",
    )
    allowed_sources: list[str] = Field(
        default_factory=list,
        description="Prefixes (local folders, s3:// or http(s):// URLs) that `uri` inputs and "
        "batch sources of the HTTP API may read; empty: none.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (10.0.0.0/8) of the reverse proxies in front of "
        "`ics serve` whose X-Forwarded-For and X-Forwarded-Proto it believes: a request through "
        "one counts as its client's (the per-address body budget, logs). Empty: none, and a "
        "client cannot pose as another address; '*': any (only where nothing but the proxy "
        "reaches the server).",
    )
    resume_orphans: bool = Field(
        default=True,
        description="`ics serve` resumes executions whose process died, when it starts.",
    )
    replica_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="This process's name among the `ics serve` replicas that share one store: "
        "the owner of the executions it runs, part of its capture files' names, shown by "
        "/healthz. Unique to each replica. Unset: the host name and process id.",
    )
    execution_lease_s: float = Field(
        default=30.0,
        ge=5.0,
        le=3600.0,
        description="Seconds a running execution's process may go unheard (it says it is alive "
        "every 2 s) before another process takes it for dead: an `ics serve` replica then "
        "takes the execution over and finishes it.",
    )
    max_running_executions: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Batch executions `ics serve` runs at once; more wait in a queue.",
    )
    # --- alerts --------------------------------------------------------------------------
    notify: list[Subscription] = Field(
        default_factory=list,
        description="Alert subscriptions: channel URLs (https://, file://, sns://, apprise "
        "URLs), each with optional ics-kinds, ics-mode (each|digest), ics-rate (10/1m) and, "
        "for a webhook, ics-secret query parameters (removed before sending); in ics.toml "
        "URL strings or tables (url, kinds, mode, rate_limit, secret); ICS_NOTIFY: JSON or "
        "one URL.",
    )
    notify_timeout_s: float = Field(
        default=10.0, gt=0.0, le=300.0, description="Most time one alert delivery may take."
    )
    notify_drain_s: float = Field(
        default=5.0,
        ge=0.0,
        le=600.0,
        description="At its end, most time a command waits for due alerts to be delivered "
        "(the rest stays in the store's outbox for the next ICS process).",
    )
    notify_digest_window_s: float = Field(
        default=3600.0,
        gt=0.0,
        description="A digest subscription gets one summary per execution at its end, and "
        "one per this many seconds of an execution still running (the server's real-time day).",
    )
    notify_sns_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint for SNS, else AWS_ENDPOINT_URL_SNS / AWS_ENDPOINT_URL as "
        "botocore reads them.",
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL where this ICS's HTTP API is reachable; alerts then link to "
        "their execution and item.",
    )

    # --- SageMaker asynchronous inference -----------------------------------------------
    sagemaker_async_output_path: str | None = Field(
        default=None,
        description="s3://BUCKET/PREFIX where InvokeEndpointAsync writes each answer, as "
        "PREFIX/INFERENCE_ID.out (AsyncInferenceConfig's S3OutputPath); unset: "
        "InvokeEndpointAsync is refused.",
    )
    sagemaker_async_failure_path: str | None = Field(
        default=None,
        description="s3://BUCKET/PREFIX where a failed asynchronous inference's error goes, as "
        "PREFIX/INFERENCE_ID.error (S3FailurePath); unset: beside the answers, under "
        "sagemaker_async_output_path.",
    )
    sagemaker_async_success_notify: list[Subscription] = Field(
        default_factory=list,
        description="Where each finished asynchronous inference is announced (SuccessTopic): "
        "sns://TOPIC_ARN or any channel URL `notify` takes, sent through the alerts outbox "
        "(at least once).",
    )
    sagemaker_async_error_notify: list[Subscription] = Field(
        default_factory=list,
        description="Where each failed asynchronous inference is announced (ErrorTopic), "
        "as sagemaker_async_success_notify.",
    )

    # --- data capture (capture/) --------------------------------------------------------
    capture: str | None = Field(
        default=None,
        description="Local folder or s3://BUCKET/PREFIX that every classified item's input "
        "and output go to, in SageMaker Model Monitor's data capture format (to S3: each "
        "file is uploaded once complete, with the storage settings); unset: no capture.",
    )
    capture_sampling: float = Field(
        default=100.0,
        ge=0.0,
        le=100.0,
        description="Percentage of items captured, chosen per item from its inference id "
        "(a resume chooses the same ones).",
    )
    capture_mode: Literal["input", "output", "input_and_output"] = Field(
        default="input_and_output",
        description="What a capture record holds: the image, the probabilities, or both.",
    )
    capture_endpoint: str = Field(
        default="ics",
        pattern=CAPTURE_NAME,
        description="Endpoint name: the first folder under the capture folder.",
    )
    capture_variant: str = Field(
        default="AllTraffic",
        pattern=CAPTURE_NAME,
        description="Variant name: the folder under the endpoint's.",
    )
    capture_queue_mb: float = Field(
        default=64.0,
        gt=0.0,
        description="Megabytes of images and probabilities that may wait for the capture "
        "writer; past it, classification waits for the writer (backpressure).",
    )
    # --- `ics report` -------------------------------------------------------------------
    drift_psi_limit: float = Field(
        default=0.2,
        ge=0.0,
        description="`ics report --baseline` reports drift, and exits 5, when the population "
        "stability index of the labels or the confidences is above this.",
    )

    # --- object storage ------------------------------------------------------------------
    storage: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec storage options per protocol, e.g. a [storage.s3] table with "
        "endpoint_url, key, secret, client_kwargs (JSON in ICS_STORAGE); unset: the standard "
        "AWS environment and credential chain. Secrets are never shown.",
    )
    http_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description="Timeout of http(s):// sources: of each connect and read, and of the "
        "whole read of one item, redirects included.",
    )
    http_allow_link_local: bool = Field(
        default=False,
        description="Let http(s):// sources read link-local and cloud metadata addresses "
        "(169.254.0.0/16, fe80::/10, fd00:ec2::254); off, such URLs and redirects fail.",
    )
    # --- `ics watch` and `POST /v1/events` ---------------------------------------------
    watch_max_items: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="Most new objects in one micro-batch (one execution) of `ics watch`.",
    )
    watch_max_wait_s: float = Field(
        default=5.0,
        ge=0.0,
        le=3600.0,
        description="Most seconds a new object waits for its micro-batch to fill up.",
    )
    watch_settle_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description="Seconds a file must stay unchanged (size and mtime) before it is read: "
        "files still being written are not read half-way.",
    )
    watch_poll_interval_s: float = Field(
        default=2.0,
        gt=0.0,
        le=3600.0,
        description="Seconds between two listings of a watched source when polling.",
    )
    watch_polling: bool = Field(
        default=False,
        description="Watch folders by listing them every watch_poll_interval_s instead of "
        "by filesystem events (network file systems send none).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bools(cls, data: Any) -> Any:
        return _refuse_bools(cls, data)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        spec = v.strip().lower()
        if DEVICE_SPEC.fullmatch(spec) is None:
            raise ValueError("device must be cpu, cuda, cuda:N (N: the GPU's index) or auto")
        return spec

    @field_validator("retry", mode="after")
    @classmethod
    def _steps(cls, v: dict[str, RetryPolicy]) -> dict[str, RetryPolicy]:
        unknown = set(v) - set(RETRY_STEPS)
        if unknown:
            raise ValueError(f"unknown step {sorted(unknown)}; steps: {', '.join(RETRY_STEPS)}")
        return {**_default_retry(), **v}

    @model_validator(mode="before")
    @classmethod
    def _local_capture(cls, data: Any) -> Any:
        # Model-level, so that the error does not repeat the value: a URL may hold a secret.
        capture = data.get("capture") if isinstance(data, Mapping) else None
        if isinstance(capture, str) and not capture.strip():
            raise ValueError("capture must name a folder")
        if isinstance(capture, str) and "://" in capture:
            scheme, _, rest = capture.partition("://")
            if scheme.lower() != "s3":
                raise ValueError("capture goes to a local folder or to s3://BUCKET/PREFIX")
            if "@" in rest.partition("/")[0]:
                raise ValueError(
                    "capture URL holds credentials; give them in the storage settings "
                    "([storage.s3] key and secret) or the AWS environment"
                )
        return data

    @field_validator("trusted_proxies", mode="after")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (such as 10.0.0.5, "
                    "10.0.0.0/8 or ::1), nor '*'"
                ) from None
        return v

    @field_validator("variants", mode="after")
    @classmethod
    def _variants(cls, v: list[ProductionVariant]) -> list[ProductionVariant]:
        names = [variant.name for variant in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"variant {twice[0]!r} is named twice: give each variant one name")
        if v and not sum(variant.weight for variant in v) > 0:
            raise ValueError("every variant weighs 0: give at least one a weight above 0")
        return v

    @field_validator(*SUBSCRIPTION_SETTINGS, mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | dict) else v

    @field_validator("sagemaker_async_output_path", "sagemaker_async_failure_path")
    @classmethod
    def _object_prefix(cls, v: str | None) -> str | None:
        if v is None:
            return None
        scheme, sep, rest = v.partition("://")
        if not sep or scheme.lower() in ("file", "http", "https") or not rest.split("/")[0]:
            raise ValueError(
                f"{v!r} is not an object storage prefix: give s3://BUCKET or s3://BUCKET/PREFIX"
            )
        return v.rstrip("/")

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def served_grpc_port(self) -> int:
        """The port of the gRPC endpoint, 0 for none: grpc_port, or the HTTP port + 1."""
        if self.grpc_port is not None:
            return self.grpc_port
        if self.port in (0, 65535):
            return 0
        return self.port + 1

    @property
    def token(self) -> str | None:
        """The API token: api_token, or the first line of token_file."""
        if self.api_token is not None:
            if not self.api_token.strip():
                # An empty ICS_API_TOKEN would otherwise serve every route open.
                raise ConfigError(
                    "api_token is empty (ICS_API_TOKEN=''): set the token the API must "
                    "require, or unset it to serve without one"
                )
            return self.api_token
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the token file {self.token_file}: {e}") from None
        if not token:
            raise ConfigError(f"the token file {self.token_file} is empty")
        return token

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.home / 'ics.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def results_dir(self) -> Path:
        return self.home / "results"


@dataclass(frozen=True)
class LoadedSettings:
    settings: Settings
    #: For each setting: "default", "file PATH", "env ICS_NAME" or "flag"; the threshold
    #: may be "card NAME" (the model card's own, set by the CLI when none other is).
    sources: dict[str, str]
    config_file: Path | None


def default(name: str) -> Any:
    """A setting's default value: the one place defaults are written (help texts read it)."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}); TOML files must be UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    # Accept both a flat file and one with an [ics] table.
    if set(data) == {"ics"} and isinstance(data["ics"], dict):
        data = data["ics"]
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> LoadedSettings:
    """Build the settings: defaults < config file < ICS_* environment < `overrides` (flags).

    `flag_names` maps a setting to the flag that set it (`decode_workers` → `--workers`),
    so that an error names a flag that exists.
    """
    env = os.environ if environ is None else environ
    fields = Settings.model_fields
    values: dict[str, Any] = {}
    sources = {name: "default" for name in fields}

    path: Path | None = None
    if config_file is not None:
        path = Path(config_file)
    elif env.get("ICS_CONFIG"):
        path = Path(env["ICS_CONFIG"])
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None:
        for key, value in _read_file(path).items():
            if key not in fields:
                raise ConfigError(
                    f"unknown setting {key!r} in {path}; known settings: {', '.join(fields)}"
                )
            kind = _kind(fields[key].annotation)
            if kind.endswith("number") and isinstance(value, bool | str):
                raise ConfigError(
                    f"bad value {json.dumps(value)} for {key} (file {path}): it must be "
                    f"{kind}" + ("; write it without quotes" if isinstance(value, str) else "")
                )
            values[key] = value
            sources[key] = f"file {path}"

    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_SETTINGS:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key in fields:
            structured = getattr(fields[key].annotation, "__origin__", None) in (list, dict)
            values[key] = _parse_env(var, value) if structured else value
            sources[key] = f"env {var}"
        elif not key.startswith("test_"):
            log.warning("ignoring environment variable %s: no setting %r", var, key)

    # Ray's own variable, as Ray reads it: over the file, under ICS_RAY_ADDRESS and the flag.
    if env.get("RAY_ADDRESS") and not sources["ray_address"].startswith("env "):
        values["ray_address"] = env["RAY_ADDRESS"]
        sources["ray_address"] = "env RAY_ADDRESS"

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = value
        sources[key] = "flag"

    try:
        settings = Settings.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_explain(e, sources, flag_names or {})) from None
    return LoadedSettings(settings=settings, sources=sources, config_file=path)


def _parse_env(var: str, value: str) -> Any:
    one_url = var.removeprefix("ICS_").lower() in SUBSCRIPTION_SETTINGS
    if one_url and not value.lstrip().startswith(("[", "{")):
        return value  # one subscription URL
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"environment variable {var} must be JSON: {e}") from None


def _explain(
    error: ValidationError, sources: Mapping[str, str], flag_names: Mapping[str, str]
) -> str:
    problems = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "value_error" and not err["loc"]:
            # A model-level check (e.g. a boolean for a number) names its key itself.
            problems.append(str(err["ctx"].get("error", err["msg"])))
            continue
        top = key.split(".")[0]
        where = sources.get(top, "")
        if where == "flag":
            origin = "flag " + flag_names.get(top, "--" + top.replace("_", "-"))
        else:
            origin = where.replace("env ", "environment variable ")
        if (
            top in SUBSCRIPTION_SETTINGS
        ):  # its input may hold secrets; the message names the URL safely
            problems.append(f"bad value for {key} ({origin}): {err['msg']}")
            continue
        problems.append(f"bad value {err.get('input')!r} for {key} ({origin}): {err['msg']}")
    return "; ".join(problems)


def owner_id() -> str:
    """This process: its host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_of(settings: Settings) -> str:
    """The owner this process records on the executions it runs (and names its capture
    files after): its `replica_id`, else its host name and process id (`owner_id`)."""
    return settings.replica_id or owner_id()
