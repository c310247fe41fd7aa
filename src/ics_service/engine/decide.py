"""FilterLowConfidence: from class probabilities to a status, a label and the top k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..types import ItemStatus, Prediction


@dataclass(frozen=True, slots=True)
class Decision:
    status: ItemStatus
    label: str
    index: int
    confidence: float
    top_k: list[Prediction]


def decide(
    probs: np.ndarray, *, threshold: float, top_k: int, labels: tuple[str, ...]
) -> list[Decision]:
    """One decision per row of probs (N, C): SUCCEEDED when the top confidence >= threshold."""
    n, c = probs.shape
    k = min(top_k, c)
    if k < c:
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(c), (n, c))
    out = []
    for row, idx in zip(probs, part, strict=True):
        order = idx[np.argsort(-row[idx], kind="stable")]
        preds = [Prediction(label=labels[i], index=int(i), confidence=float(row[i])) for i in order]
        best = preds[0]
        # Compared in float64 on the float32 value reported, so a threshold equal to a
        # reported confidence counts as reached.
        status = ItemStatus.SUCCEEDED if best.confidence >= threshold else ItemStatus.LOW_CONFIDENCE
        out.append(Decision(status, best.label, best.index, best.confidence, preds))
    return out
