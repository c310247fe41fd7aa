"""Model cards: everything needed to feed a model and read its answers.

Preprocessing is built from the card (as timm builds it from a `PretrainedCfg`), so no
input size, mean or crop is written anywhere else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from .errors import install_hint

#: How to install what building a card's ONNX file needs (torch, onnx, the weights).
CONVERT_HINT = install_hint("convert")


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    description: str
    #: Side of the square input, in pixels.
    input_size: int
    #: Centre-crop fraction: the shorter side is resized to input_size / crop_pct, then cropped.
    crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    #: Per-channel normalisation of 0..255 pixel values: (x - mean) / std.
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    #: File of class names (one per line) shipped in ics_service/models/data.
    labels_file: str = "imagenet1k_labels.txt"
    #: Whether the model's outputs are logits (softmax is applied) or probabilities.
    outputs: Literal["logits", "probabilities"] = "logits"
    #: How the ONNX file is produced by `ics models prepare`.
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def resize_size(self) -> int:
        return round(self.input_size / self.crop_pct)

    @property
    def labels(self) -> tuple[str, ...]:
        return _load_labels(self.labels_file)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": len(self.labels),
            "outputs": self.outputs,
        }


@functools.cache
def _load_labels(filename: str) -> tuple[str, ...]:
    text = resources.files("ics_service").joinpath("models", "data", filename).read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
