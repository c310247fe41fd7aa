"""Model registry and runtimes; the model card is `ics_service.modelcard`."""

from ..modelcard import ModelCard
from .prepare import load_runtime
from .registry import MODELS, get_card
from .runtime import ModelRuntime, OnnxRuntime

__all__ = ["MODELS", "ModelCard", "ModelRuntime", "OnnxRuntime", "get_card", "load_runtime"]
