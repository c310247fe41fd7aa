"""Triton's model configuration and statistics extensions: the documents that the HTTP routes
(`/v2/models/NAME/config`, `/v2/models[/NAME]/stats`) answer as JSON and the gRPC RPCs
(ModelConfig, ModelStatistics) as the same messages, in the shapes of Triton's
model_config.proto and grpc_service.proto.

The configuration is read from the served model: its card (inputs, outputs, the
preprocessing ICS applies, in `parameters`) and its batcher (max_batch_size, the dynamic
batching delay and queue, the inference workers as its instance group). The statistics are
read from the server's metrics (`Metrics.model_counters`), the counters /metrics exports.
"""

from __future__ import annotations

from typing import Any

from ..modelcard import ModelCard
from ..models.runtime import takes_bytes
from .metrics import PHASES, Duration, Metrics
from .service import ServedModel, on_cuda
from .v2_wire import IMAGES, OUTPUT, TENSOR

#: Triton's platform and backend of each kind of model ICS runs. Triton has no backend for
#: a remote endpoint: those name their kind.
_PLATFORMS = {"onnx": ("onnxruntime_onnx", "onnxruntime"), "python": ("", "python")}


def platform_of(card: ModelCard) -> tuple[str, str]:
    """(platform, backend) of a model, as Triton names them."""
    return _PLATFORMS.get(card.kind, ("", card.kind))


def model_config(model: ServedModel) -> dict[str, Any]:
    """The model's configuration in Triton's JSON shape (ModelConfig)."""
    card = model.runtime.card
    platform, backend = platform_of(card)
    settings = model.settings
    batcher = model.batcher
    doc: dict[str, Any] = {"name": card.name}
    if platform:
        doc["platform"] = platform
    doc["backend"] = backend
    doc |= {
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": batcher.max_batch_size,
        "input": [
            # A batch of encoded images is [N]: Triton writes it as dims [1] reshaped to [].
            {
                "name": IMAGES,
                "data_type": "TYPE_STRING",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
            {
                "name": TENSOR,
                "data_type": "TYPE_FP32",
                "format": f"FORMAT_{card.layout}",
                "dims": list(card.input_shape),
                "optional": True,
            },
        ],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [len(card.labels)]}],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(settings.max_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": settings.max_queue},
        },
        "instance_group": [
            {
                "name": card.name,
                "kind": _instance_kind(model),
                "count": batcher.workers,
            }
        ],
        "parameters": {key: {"string_value": value} for key, value in _parameters(model).items()},
    }
    return doc


def _instance_kind(model: ServedModel) -> str:
    if model.runtime.card.kind in ("sagemaker", "v2"):  # an endpoint places its model itself
        return "KIND_MODEL"
    return "KIND_GPU" if on_cuda(model.runtime) else "KIND_CPU"


def _parameters(model: ServedModel) -> dict[str, str]:
    """What ICS does around the model, as Triton's string parameters."""
    card = model.runtime.card
    params = {
        "ics.kind": card.kind,
        "ics.version": card.version,
        "ics.labels": str(len(card.labels)),
        "ics.outputs": card.outputs,
        "ics.threshold": f"{model.threshold:g}",
    }
    if model.device is not None:
        params["ics.device"] = model.device
    if takes_bytes(model.runtime):
        params["ics.preprocessing"] = "none: the encoded image is sent to the model as it is"
    elif getattr(model.runtime, "preprocess", None) is not None:
        params["ics.preprocessing"] = "the model's own preprocess"
    else:
        params["ics.preprocessing"] = "the model card's"
        params |= {
            "ics.input_size": str(card.input_size),
            "ics.resize_size": str(card.resize_size),
            "ics.resize_mode": card.resize_mode,
            "ics.interpolation": card.interpolation,
            "ics.scale": f"{card.scale:g}",
            "ics.mean": ",".join(f"{v:g}" for v in card.mean),
            "ics.std": ",".join(f"{v:g}" for v in card.std),
            "ics.channels": card.channels,
            "ics.layout": card.layout,
            "ics.reduced_decode": str(card.reduced_decode).lower(),
        }
        if card.jpeg_quality is not None:
            params["ics.jpeg_quality"] = str(card.jpeg_quality)
    return params


def model_stats(metrics: Metrics, models: list[ServedModel]) -> dict[str, Any]:
    """The models' statistics in Triton's JSON shape (ModelStatisticsResponse)."""
    return {"model_stats": [_stats(metrics, model) for model in models]}


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def _stats(metrics: Metrics, model: ServedModel) -> dict[str, Any]:
    counted = metrics.model_counters(model.name)
    sizes = sorted(counted.runs)
    # An input shares its run's time with the others of that run, as Triton counts it.
    inputs = sum(size * counted.runs[size].count for size in sizes)

    def per_input(phase: str) -> dict[str, int]:
        return _duration(inputs, sum(size * counted.runs[size].seconds[phase] for size in sizes))

    def of(duration: Duration) -> dict[str, int]:
        return _duration(duration.count, duration.seconds)

    return {
        "name": model.name,
        "version": model.runtime.card.version,
        "last_inference": round(counted.last_inference_s * 1000),
        "inference_count": inputs,
        "execution_count": sum(counted.runs[size].count for size in sizes),
        "inference_stats": {
            "success": of(counted.success),
            "fail": of(counted.fail),
            "queue": _duration(inputs, counted.queued_s),
            **{f"compute_{phase}": per_input(phase) for phase in PHASES},
            "cache_hit": _duration(0, 0.0),
        },
        "batch_stats": [
            {
                "batch_size": size,
                **{
                    f"compute_{phase}": _duration(
                        counted.runs[size].count, counted.runs[size].seconds[phase]
                    )
                    for phase in PHASES
                },
            }
            for size in sizes
        ],
    }
