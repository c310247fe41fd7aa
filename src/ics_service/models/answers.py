"""Reading a remote model's answers (`sagemaker`, `v2remote`): its probabilities (and its
labels, where it names them), checked against the card."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ModelError
from ..modelcard import ModelCard
from .runtime import softmax

#: Keys of a JSON answer that hold the probabilities, as SageMaker containers write them
#: (TensorFlow Serving's "predictions", scikit-learn's "prediction", JumpStart's
#: "probabilities").
PROBABILITY_KEYS = ("predictions", "prediction", "probabilities", "scores")
#: Keys of a JSON answer that name the classes.
LABEL_KEYS = ("labels", "classes")


def probabilities_of(doc: Any, *, where: str) -> tuple[list[list[float]], list[str] | None]:
    """The rows of class probabilities of an answer, and its labels when it names them.

    Accepts a JSON array of numbers (one image), an array of such arrays (one per image), or
    an object holding either under `PROBABILITY_KEYS`, with the labels under `LABEL_KEYS`.
    ModelError, naming `where`, for anything else.
    """
    labels = None
    if isinstance(doc, dict):
        key = next((k for k in PROBABILITY_KEYS if k in doc), None)
        if key is None:
            raise ModelError(
                f"{where} answered a JSON object without probabilities (keys: "
                f"{', '.join(sorted(map(str, doc))[:8]) or 'none'}); ICS reads "
                f"{', '.join(PROBABILITY_KEYS)} or a bare JSON array"
            )
        label_key = next((k for k in LABEL_KEYS if k in doc), None)
        if label_key is not None:
            labels = doc[label_key]
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise ModelError(f"{where} answered {label_key} that is not a list of strings")
        doc = doc[key]
    if isinstance(doc, list) and doc and all(_is_number(x) for x in doc):
        return [doc], labels
    if (
        isinstance(doc, list)
        and doc
        and all(isinstance(row, list) and row and all(_is_number(x) for x in row) for row in doc)
    ):
        return doc, labels
    raise ModelError(
        f"{where} answered {_kind(doc)}, not class probabilities (a JSON array of numbers, "
        "or an array of them per image)"
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _kind(doc: Any) -> str:
    if isinstance(doc, list):
        return "an empty array" if not doc else "an array of something other than numbers"
    return f"a JSON {type(doc).__name__}"


def checked(
    rows: Sequence[Sequence[float]] | np.ndarray,
    card: ModelCard,
    *,
    where: str,
    count: int,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """The answer as (count, C) float32 scores the engine can decide on: softmax applied for
    a "logits" card; ModelError naming `where` when it does not fit the card's labels."""
    probs = np.asarray(rows, dtype=np.float32)
    want = card.labels
    if probs.ndim != 2 or probs.shape[0] != count:
        raise ModelError(f"{where} answered {probs.shape[0]} rows of scores for {count} images")
    if probs.shape[1] != len(want):
        raise ModelError(
            f"{where} answered {probs.shape[1]} class scores, but the model has "
            f"{len(want)} labels: give the labels file of this endpoint (--labels FILE)"
        )
    if labels is not None and tuple(labels) != want:
        first = next(
            (i for i, (a, b) in enumerate(zip(labels, want, strict=False)) if a != b),
            min(len(labels), len(want)),
        )
        raise ModelError(
            f"{where} names its classes, and they differ from the model's labels file at "
            f"index {first}: remove the labels file to use the endpoint's own labels, or fix it"
        )
    if not np.isfinite(probs).all():
        raise ModelError(f"{where} answered scores that are not finite numbers (NaN or inf)")
    if card.outputs == "logits":
        return softmax(probs)
    if probs.min() < 0.0 or probs.max() > 1.0 + 1e-3:
        raise ModelError(
            f"{where} answered scores outside 0..1 (from {probs.min():g} to {probs.max():g}): "
            "if they are logits, register the model with --outputs logits"
        )
    return probs
