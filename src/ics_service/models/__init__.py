"""Model registry and runtimes; the model card is `ics_service.modelcard`.

The runtimes (numpy, onnxruntime) are imported when first asked for, so that finding a
card (every command's settings do, for its default threshold) imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..modelcard import ModelCard
from .registry import MODELS, all_cards, get_card

if TYPE_CHECKING:
    from .factory import load_runtime
    from .runtime import ModelRuntime, OnnxRuntime

__all__ = [
    "MODELS",
    "ModelCard",
    "ModelRuntime",
    "OnnxRuntime",
    "all_cards",
    "get_card",
    "load_runtime",
]


def __getattr__(name: str) -> Any:
    if name == "load_runtime":
        from .factory import load_runtime

        return load_runtime
    if name in ("ModelRuntime", "OnnxRuntime"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
