"""Model runtimes: one small contract, and the onnxruntime implementation behind it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InferenceError, ModelNotPrepared, permission_denied
from ..modelcard import ModelCard
from .answers import check_scores
from .answers import softmax as softmax  # where benchmarks import it from
from .device import CPU, Device, check_session, cuda_failure


class ModelRuntime(Protocol):
    """Runs a model on a batch of preprocessed inputs (N, 3, H, W) float32."""

    card: ModelCard

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, num_classes), float32."""
        ...


class BytesRuntime(Protocol):
    """A runtime sent the encoded images instead of tensors (a remote endpoint decodes them
    itself): `takes = "bytes"`. The engine still decodes every image first, so that a broken
    one ends FAILED before any remote call."""

    card: ModelCard
    takes: str

    def predict_bytes(
        self, images: Sequence[bytes], *, content_types: Sequence[str] | None = None
    ) -> np.ndarray:
        """Class probabilities, shape (len(images), num_classes), float32; `content_types`
        are the images' MIME types (image/jpeg...) where the caller knows them."""
        ...


def takes_bytes(runtime: object) -> bool:
    """Whether the runtime is sent encoded images (`BytesRuntime`) rather than tensors."""
    return getattr(runtime, "takes", "tensor") == "bytes"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def onnx_session(path: str | Path, *, threads: int = 0, device: Device = CPU) -> Any:
    """An onnxruntime session on `device` with ICS's settings (the benchmarks' peers use it
    too); DeviceUnavailable when a CUDA device's provider does not start."""
    import onnxruntime as ort

    check_readable(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Decode threads share the cores with inference: idle inference threads must sleep,
    # not spin, or they steal the time decoding needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        # No fallback: onnxruntime would otherwise retry on the CPU, saying so only on stdout.
        session = ort.InferenceSession(
            str(path), opts, providers=device.providers(), enable_fallback=0
        )
    except (RuntimeError, ValueError) as e:
        failure = cuda_failure(e, device)
        if failure is None:
            raise
        raise failure from None
    check_session(session, device)
    return session


def check_readable(path: str | Path) -> None:
    """PermissionDenied naming the model file when this user cannot read it (onnxruntime
    would only say "system error number 13")."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError as e:
        raise permission_denied(
            e,
            "model file",
            f"make it readable for this user (chmod a+r {path}), or prepare the model in a "
            "models folder of this user's (`ics models prepare` with --home / ICS_HOME)",
        ) from None


class OnnxRuntime:
    """A model card's ONNX file run by onnxruntime on the CPU or a CUDA device."""

    def __init__(
        self, card: ModelCard, path: Path, *, threads: int = 0, device: Device = CPU
    ) -> None:
        self.card = card
        self.path = path
        self.device = device
        self.session = onnx_session(path, threads=threads, device=device)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        if len(outputs) != 1:
            names = ", ".join(f"{o.name} {o.shape}" for o in outputs)
            raise ModelNotPrepared(
                f"model {card.name}'s file {path} has {len(outputs)} outputs ({names}); ICS "
                "reads one output of (N, classes) scores: export the model with that output "
                f"only and add it again (`ics models add {card.name} --replace ...`)"
            )
        self.output_name = outputs[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return check_scores(self.card, out, where=f"model {self.card.name}", error=InferenceError)
