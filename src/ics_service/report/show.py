"""`ics show`: classify one image with the engine's preprocessing and model, and draw it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..capture.record import content_type_of
from ..config import Settings
from ..imaging import Limits, Preprocessor
from ..models import get_card, load_runtime
from ..models.device import device_for
from ..models.remote import RemoteOptions
from ..models.runtime import available_cpus, takes_bytes
from ..policies import Decision, decide
from ..sources import read
from .pictures import annotated

#: Longest side of the image in the annotated picture.
SHOWN_SIDE = 512


@dataclass(frozen=True)
class Shown:
    decision: Decision
    width: int
    height: int
    format: str


def classify_one(uri: str, settings: Settings) -> tuple[Shown, bytes]:
    """The decision for one image (raises the ItemError that would fail its item)."""
    card = get_card(settings.model, settings)
    data = read(uri, settings.max_bytes)
    limits = Limits.from_settings(settings)
    img, info = Preprocessor(card, limits).decode(data)  # a bad image fails before the model
    # One image: one session on every core (unless the settings choose), as the server
    # runs a lone request.
    threads = settings.inference_threads or available_cpus()
    device = device_for(card.kind, card.name, settings.device)
    runtime = load_runtime(
        card,
        settings.models_dir,
        threads=threads,
        device=device,
        remote=RemoteOptions.of(settings),
    )
    try:
        if takes_bytes(runtime):  # a remote model sent the encoded image, as classify does
            probs = runtime.predict_bytes(  # type: ignore[attr-defined]
                [data], content_types=[content_type_of(info.format)]
            )
        else:
            tensor = Preprocessor.for_runtime(runtime, limits).input_of(np.asarray(img))
            probs = runtime.predict(tensor[None])
        # The runtime's card: a remote model may have learned its labels from its endpoint.
        used = runtime.card
        (decision,) = decide(
            probs,
            threshold=settings.threshold,
            top_k=settings.top_k,
            labels=used.labels,
            label_thresholds=used.decision_thresholds(settings.threshold),
        )
    finally:
        close = getattr(runtime, "close", None)  # a remote model's connections
        if close is not None:
            close()
    return Shown(decision, info.width, info.height, info.format), data


def draw(shown: Shown, data: bytes, name: str, out: Path) -> None:
    """Write the image, reduced to SHOWN_SIDE, with its status, label and top-k chart."""
    # The Preprocessor decoded this image under the limits already: it is safe to open.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opened = Image.open(BytesIO(data))
        opened.draft("RGB", (SHOWN_SIDE, SHOWN_SIDE))
        img = ImageOps.exif_transpose(opened).convert("RGB")
    img.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
    d = shown.decision
    title = f"{name}: {d.status.value}, {d.label} {d.confidence:.1%}"
    annotated(img, d.top_k, title).save(out, format="PNG")
