"""Reading a remote model's answers (`sagemaker`, `v2remote`): its probabilities (and its
labels, where it names them), checked against the card, and its error answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ModelError
from ..modelcard import ModelCard

#: Keys of a JSON answer that hold the probabilities, as SageMaker containers write them
#: (TensorFlow Serving's "predictions", scikit-learn's "prediction", JumpStart's
#: "probabilities").
PROBABILITY_KEYS = ("predictions", "prediction", "probabilities", "scores")
#: Keys of a JSON answer that name the classes.
LABEL_KEYS = ("labels", "classes")


def error_of(body: bytes) -> tuple[str | None, str]:
    """The (type, message) of an error answer's body: `{"error": {"type", "message"}}`
    (ICS's own), `{"error": "message"}` (KServe's, Triton's) or plain text (a proxy's);
    (None, "") when it holds neither."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, body[:500].decode("utf-8", "replace").strip()
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        kind = error.get("type")
        return (str(kind) if kind else None), str(error.get("message") or error)
    return None, "" if error is None else str(error)


def softmax(logits: np.ndarray) -> np.ndarray:
    z: np.ndarray = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


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
    return check_scores(card, probs, where=where)


#: How far outside 0..1 a probability may be (float32 softmax and sigmoid, rounding).
PROBABILITY_RANGE_TOLERANCE = 1e-3
#: How far from 1 a row of probabilities may sum (float32 softmax over many classes, and
#: answers rounded to a few decimals by a remote model): a sigmoid's rows are far off.
PROBABILITY_SUM_TOLERANCE = 1e-2


def check_scores(
    card: ModelCard,
    out: np.ndarray,
    *,
    where: str,
    error: type[Exception] = ModelError,
) -> np.ndarray:
    """A model's (N, C) answer as the scores the engine decides on (softmax applied for a
    "logits" card), after the one check every runtime and `ics models add` make: `error`,
    naming `where`, unless the scores are finite, and for a "probabilities" or "sigmoid"
    card in 0..1, and for "probabilities" rows that sum to 1."""
    scores = np.asarray(out, dtype=np.float32)
    if not np.isfinite(scores).all():
        raise error(
            f"{where} answered NaN or infinite scores: the model is broken, or the card's "
            "preprocessing (mean, std, scale) does not fit it"
        )
    if card.outputs == "logits":
        return softmax(scores)
    if scores.size == 0:
        return scores
    low, high = float(scores.min()), float(scores.max())
    if low < -PROBABILITY_RANGE_TOLERANCE or high > 1 + PROBABILITY_RANGE_TOLERANCE:
        hint = (
            "its graph must end in a sigmoid (export it with one)"
            if card.multi_label
            else "if they are logits, give --outputs logits (`ics models add --replace`)"
        )
        raise error(
            f"{where} answered scores from {low:g} to {high:g}, which are not probabilities "
            f"in 0..1 (the card's outputs = {card.outputs!r}): {hint}"
        )
    if card.outputs == "probabilities":
        sums = scores.sum(axis=1)
        worst = float(sums[np.abs(sums - 1).argmax()])
        if abs(worst - 1) > PROBABILITY_SUM_TOLERANCE:
            raise error(
                f"{where}'s probabilities for an image sum to {worst:g}, not 1: give "
                "--outputs logits if they are logits, or --outputs sigmoid if they are "
                "independent probabilities (`ics models add --replace`)"
            )
    return scores
