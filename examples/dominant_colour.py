"""An example Python model for ICS: which of red, green and blue dominates an image.

A Python model is a class with `load(card)` and `predict(batch)` (and optionally its own
`preprocess(image)`); ICS reads, decodes, batches, retries, records and alerts around it
as for an ONNX model. Add this one and use it::

    PYTHONPATH=examples ics models add colours --python dominant_colour:DominantColour
    ics classify photos/ --model colours

(The folder it was imported from is recorded in its card: later runs need no PYTHONPATH.)
See docs/models.md, "Python models".
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class DominantColour:
    #: The card's fields (`ics models add` options still win over them).
    card: ClassVar[dict[str, Any]] = {
        "input_size": 64,
        "resize_mode": "squash",  # the whole image, not a centre crop
        "classes": ["red", "green", "blue"],
        "outputs": "probabilities",
        "threshold": 0.5,
        "description": "Which of red, green and blue dominates the image (an ICS example).",
    }

    def load(self, card: Any) -> None:
        """Called once with the model's card, before any batch (load weights here)."""
        self.labels = card.labels
        #: How sharply the answer follows the largest channel mean.
        self.sharpness = 20.0

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB, resized as the card says → one input, (3, H, W) in 0..1."""
        return image.transpose(2, 0, 1).astype(np.float32) / 255.0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 → (N, 3) probabilities of red, green and blue."""
        means = batch.mean(axis=(2, 3))
        z = np.exp(self.sharpness * (means - means.max(axis=1, keepdims=True)))
        probs: np.ndarray = z / z.sum(axis=1, keepdims=True)
        return probs
