"""Model cards: everything needed to feed a model and read its answers.

Preprocessing is built from the card (as timm builds it from a `PretrainedCfg`), so no
input size, mean or crop is written anywhere else. A bundled card is written in
`models/registry.py`; a card of a model added with `ics models add` is the `card.toml`
beside its files (`ModelCard.to_toml` / `ModelCard.from_toml`).
"""

from __future__ import annotations

import functools
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import ConfigError, install_hint

#: How to install what building a card's ONNX file needs (torch, onnx, the weights).
CONVERT_HINT = install_hint("convert")

Kind = Literal["onnx", "python", "sagemaker", "v2"]
Layout = Literal["NCHW", "NHWC"]
Outputs = Literal["logits", "probabilities", "sigmoid"]
Interpolation = Literal["bilinear", "bicubic"]
Channels = Literal["RGB", "BGR"]
ResizeMode = Literal["shorter", "squash"]

KINDS: tuple[str, ...] = get_args(Kind)
LAYOUTS: tuple[str, ...] = get_args(Layout)
OUTPUTS: tuple[str, ...] = get_args(Outputs)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
CHANNELS: tuple[str, ...] = get_args(Channels)
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)

#: The card file of an added model, in its folder.
CARD_FILE = "card.toml"
#: The prefixes of ad hoc remote models' names (`sagemaker:ENDPOINT`, `v2:URL`;
#: models/remote.py).
REMOTE_PREFIXES = ("sagemaker:", "v2:")


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    description: str
    #: Side of the square input, in pixels.
    input_size: int
    #: Centre-crop fraction: the shorter side is resized to input_size / crop_pct, then cropped.
    crop_pct: float = 0.875
    interpolation: Interpolation = "bilinear"
    #: Per-channel normalisation of pixel values: (x * scale - mean) / std, in the order of
    #: `channels`.
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    #: File of class names (one per line) shipped in ics_service/models/data (bundled cards).
    labels_file: str = "imagenet1k_labels.txt"
    #: What the model's outputs are: logits (softmax is applied), probabilities (used as
    #: they are) or independent per-label probabilities of a multi-label model (sigmoid).
    outputs: Outputs = "logits"
    #: How the ONNX file is produced by `ics models prepare` (bundled cards).
    build: dict[str, Any] = field(default_factory=dict)
    #: What runs the model: an ONNX file, a Python class, a SageMaker or v2 endpoint.
    kind: Kind = "onnx"
    #: The input tensor's layout: (N, 3, H, W) or (N, H, W, 3).
    layout: Layout = "NCHW"
    #: Pixel values 0..255 are multiplied by it before (x - mean) / std (1/255 for 0..1).
    scale: float = 1.0
    #: Channel order of the input tensor.
    channels: Channels = "RGB"
    #: Side the image is resized to before the centre crop; None: input_size / crop_pct.
    resize: int | None = None
    #: "shorter": the shorter side is resized to `resize_size`, keeping the aspect ratio;
    #: "squash": both sides are, ignoring it. Then the centre input_size × input_size.
    resize_mode: ResizeMode = "shorter"
    #: The model's own default threshold (an explicit threshold setting wins over it).
    threshold: float | None = None
    #: Absolute path of the labels file of an added model (bundled cards use labels_file).
    labels_path: str | None = None
    #: The class names themselves, for a model whose card is written in code (a Python
    #: model's); over labels_path and labels_file.
    classes: tuple[str, ...] | None = None
    #: Absolute path of the model file of an added ONNX model.
    model_path: str | None = None
    #: Where the model came from: the file or class it was added from, the content hash
    #: (sha256 of model.onnx), when; an endpoint or URL for remote kinds.
    source: dict[str, Any] = field(default_factory=dict)
    #: Encode the squashed image as a JPEG of this quality and decode it again before the
    #: crop, as some models' reference pipelines did (resize_mode "squash" only; None: no
    #: round trip). The image is then resized whole, round-tripped and cropped, step by step.
    jpeg_quality: int | None = None
    #: Decode JPEGs at a reduced DCT scale while the resize size stays covered (faster; the
    #: pixels differ slightly from a full decode). False decodes every pixel, as the
    #: reference pipeline of a model fitted on full decodes does.
    reduced_decode: bool = True
    #: A multi-label card's (outputs "sigmoid") thresholds of single labels: label ->
    #: threshold. A label not named here is decided against the run's threshold.
    label_thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_card(self)

    @property
    def resize_size(self) -> int:
        return self.resize if self.resize is not None else round(self.input_size / self.crop_pct)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input's shape, without the batch axis."""
        s = self.input_size
        return (3, s, s) if self.layout == "NCHW" else (s, s, 3)

    @property
    def added(self) -> bool:
        """Whether it is a user's model (added, or registered by entry point), not bundled."""
        return bool(self.source)

    @property
    def labels(self) -> tuple[str, ...]:
        if self.classes is not None:
            return self.classes
        if self.labels_path is not None:
            return read_labels(self.labels_path)
        if not self.labels_file:  # a remote model whose endpoint has not named them yet
            raise ConfigError(f"model {self.name} has no labels file: give it with --labels FILE")
        return _load_labels(self.labels_file)

    @property
    def multi_label(self) -> bool:
        return self.outputs == "sigmoid"

    def decision_thresholds(self, threshold: float) -> tuple[float, ...] | None:
        """Each label's threshold for a multi-label card (its own, else `threshold`); None for
        a single-label card, whose top label alone is compared to `threshold`."""
        if not self.multi_label:
            return None
        labels = self.labels
        unknown = sorted(set(self.label_thresholds) - set(labels))
        if unknown:
            raise ConfigError(
                f"model {self.name}: label_thresholds names {', '.join(map(repr, unknown))}, "
                "which is not one of its labels; use the names of its labels file"
            )
        return tuple(self.label_thresholds.get(label, threshold) for label in labels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "kind": self.kind,
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "resize_mode": self.resize_mode,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "layout": self.layout,
            "channels": self.channels,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": len(self.labels),
            "outputs": self.outputs,
            "threshold": self.threshold,
            "jpeg_quality": self.jpeg_quality,
            "reduced_decode": self.reduced_decode,
            "label_thresholds": dict(self.label_thresholds),
            "source": dict(self.source),
        }

    def to_toml(self) -> str:
        """The card as card.toml: every field but the paths, which are files beside it."""
        lines = [f"# ICS model card of {self.name}; see `ics models info {self.name}`."]
        tables: list[tuple[str, dict[str, Any]]] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("labels_path", "model_path", "build"):
                continue
            if f.name == "labels_file":
                if self.labels_path is None:
                    continue  # a bundled file of ICS's, or the card's own classes
                value = Path(self.labels_path).name
            if isinstance(value, dict):
                tables.append((f.name, value))
            elif value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        if self.model_path is not None:
            lines.append(f"model_file = {_toml_value(Path(self.model_path).name)}")
        for name, table in tables:
            if table:
                lines.append(f"\n[{name}]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, base_dir: Path | None, *, where: str = "card") -> ModelCard:
        """A card from card.toml; its labels and model files are relative to `base_dir`."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where} is not valid TOML: {e}") from None
        return cls.from_mapping(data, base_dir, where=where)

    @classmethod
    def from_mapping(
        cls, data: dict[str, Any], base_dir: Path | None, *, where: str = "card"
    ) -> ModelCard:
        data = dict(data)
        known = {f.name for f in fields(cls)} - {"labels_path", "model_path"}
        model_file = data.pop("model_file", None)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)}; a card has "
                f"{', '.join(sorted(known | {'model_file'}))}"
            )
        missing = [k for k in ("name", "input_size") if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        data.setdefault("version", "1")
        data.setdefault("description", "")
        if isinstance(data.get("classes"), list):
            data["classes"] = tuple(str(c) for c in data["classes"])
        for key in ("mean", "std"):
            if key in data:
                if not isinstance(data[key], list | tuple) or len(data[key]) != 3:
                    raise ConfigError(f"{where}: {key} must be 3 numbers, one per channel")
                data[key] = tuple(data[key])
        if base_dir is not None:
            if "labels_file" in data:
                data["labels_path"] = str((base_dir / data["labels_file"]).resolve())
            if model_file is not None:
                data["model_path"] = str((base_dir / model_file).resolve())
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None


def check_card(card: ModelCard) -> None:
    """ConfigError naming the field when a card cannot drive preprocessing or decisions."""
    problems = []

    def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, not {value!r}")

    def number(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            problems.append(f"{name} must be a number, not {value!r}")
        elif value < lo or value > hi or (open_lo and value == lo):
            low = f"over {lo:g}" if open_lo else f"at least {lo:g}"
            problems.append(f"{name} must be {low} and at most {hi:g}, not {value!r}")

    if not isinstance(card.name, str) or not card.name:
        problems.append("name must be a non-empty string")
    if isinstance(card.input_size, bool) or not isinstance(card.input_size, int):
        problems.append(f"input_size must be a whole number of pixels, not {card.input_size!r}")
    elif not 8 <= card.input_size <= 4096:
        problems.append(f"input_size must be 8 to 4096 pixels, not {card.input_size}")
    number("crop_pct", card.crop_pct, 0.0, 1.0, open_lo=True)
    number("scale", card.scale, 0.0, 1e6, open_lo=True)
    if card.resize is not None and (
        isinstance(card.resize, bool)
        or not isinstance(card.resize, int)
        or not isinstance(card.input_size, int)
        or not card.input_size <= card.resize <= 16384
    ):
        problems.append(
            f"resize must be a whole number of pixels at least input_size ({card.input_size}), "
            f"not {card.resize!r}"
        )
    for key in ("mean", "std"):
        values = getattr(card, key)
        if len(values) != 3:
            problems.append(f"{key} must be 3 numbers, one per channel")
            continue
        for v in values:
            number(key, v, -1e6 if key == "mean" else 0.0, 1e6, open_lo=key == "std")
    if card.threshold is not None:
        number("threshold", card.threshold, 0.0, 1.0)
    choice("kind", card.kind, KINDS)
    choice("layout", card.layout, LAYOUTS)
    choice("outputs", card.outputs, OUTPUTS)
    choice("interpolation", card.interpolation, INTERPOLATIONS)
    choice("channels", card.channels, CHANNELS)
    choice("resize_mode", card.resize_mode, RESIZE_MODES)
    if card.jpeg_quality is not None:
        if isinstance(card.jpeg_quality, bool) or not isinstance(card.jpeg_quality, int):
            problems.append(f"jpeg_quality must be a whole number, not {card.jpeg_quality!r}")
        elif not 1 <= card.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be 1 to 100, not {card.jpeg_quality}")
        if card.resize_mode != "squash":
            problems.append(
                "jpeg_quality needs resize_mode = 'squash' (the round trip comes between the "
                "resize and the crop)"
            )
    if not isinstance(card.reduced_decode, bool):
        problems.append(f"reduced_decode must be true or false, not {card.reduced_decode!r}")
    if not isinstance(card.label_thresholds, dict):
        problems.append("label_thresholds must be a table of label = threshold")
    else:
        if card.label_thresholds and card.outputs != "sigmoid":
            problems.append(
                "label_thresholds are for a multi-label model (outputs = 'sigmoid'); a "
                "single-label model's top label is compared to its threshold"
            )
        for label, value in card.label_thresholds.items():
            number(f"label_thresholds.{label}", value, 0.0, 1.0)
    if card.classes is not None and (
        not card.classes or not all(isinstance(c, str) and c.strip() for c in card.classes)
    ):
        problems.append("classes must be a non-empty list of class names")
    if not isinstance(card.source, dict) or not isinstance(card.build, dict):
        problems.append("source and build must be tables")
    if problems:
        raise ConfigError(f"model card {card.name!r}: " + "; ".join(problems))


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Class names from a labels file, one per line (blank lines skipped)."""
    return _read_labels_file(str(path))


@functools.cache
def _read_labels_file(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"labels file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"labels file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read labels file {path}: {e.strerror or e}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def _load_labels(filename: str) -> tuple[str, ...]:
    text = resources.files("ics_service").joinpath("models", "data", filename).read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _toml_key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    # JSON's strings, numbers and arrays are TOML's too (TOML has no null: None is left out).
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"no TOML for {value}")
        return repr(value)
    if isinstance(value, int | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")
