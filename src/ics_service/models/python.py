"""The Python model contract: a model written in Python, run by ICS's engine like an ONNX one.

A model is a class (as LitServe's `LitAPI` is for its users: the server batches, the model
predicts)::

    class MyModel:
        card = {"input_size": 224, "classes": ["cat", "dog"]}   # optional: card fields

        def load(self, card: ModelCard) -> None:                # once, before any batch
            ...
        def predict(self, batch: np.ndarray) -> np.ndarray:     # (N, *card.input_shape)
            ...                                                 # float32 → (N, classes)
        def preprocess(self, image: np.ndarray) -> np.ndarray:  # optional
            ...   # (H, W, 3) uint8 RGB, resized and cropped as the card says → one input

`predict` returns probabilities (the card's `outputs` may say "logits": softmax is applied
then). The engine reads, checks and decodes every image, batches, retries a failed batch
under the ClassifyImage policy (an exception that is not an ICS ItemError ends its items
FAILED as an InferenceError), records, captures and alerts around it as for ONNX.

Registered with `ics models add NAME --python module:Class` (a card.toml in the model home),
or by a Python package's entry point in the group `ics.models` (NAME = "module:Class"),
whose class then carries its card (at least `classes`) in its `card` attribute.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, InferenceError, ModelNotPrepared
from ..modelcard import ModelCard
from .answers import check_scores
from .digests import check_sha256

log = logging.getLogger(__name__)

#: The entry point group of Python models.
ENTRY_POINT_GROUP = "ics.models"


@runtime_checkable
class PythonModel(Protocol):
    """What ICS calls on a Python model (`preprocess(image)` is optional)."""

    def load(self, card: ModelCard) -> None: ...

    def predict(self, batch: np.ndarray) -> Any: ...


def load_class(spec: str) -> type:
    """The class named by "module:Class" (ConfigError saying what is wrong)."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ConfigError(f"bad Python model {spec!r}: write it as module:Class")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"cannot import {module_name!r} for the Python model {spec}: {e}; install its "
            "package in ICS's environment, or put its folder on PYTHONPATH"
        ) from None
    except Exception as e:
        raise ConfigError(
            f"importing {module_name!r} for the Python model {spec} failed: {type(e).__name__}: {e}"
        ) from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no {qualname!r} (from {spec})") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a class")
    missing = [m for m in ("load", "predict") if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(
            f"{spec} has no {' or '.join(missing)} method: a Python model has load(card) and "
            "predict(batch) (and optionally preprocess(image))"
        )
    return obj


#: The fields of a ModelCard given as a class's `card` that are not taken from it.
NOT_DECLARED = frozenset({"labels_path", "model_path", "build", "kind", "source"})


def class_card_fields(cls: type, spec: str) -> dict[str, Any]:
    """The card fields a model class declares in its `card` attribute (a mapping, or a
    ModelCard), if any."""
    declared = getattr(cls, "card", None)
    if declared is None:
        return {}
    if isinstance(declared, ModelCard):
        # What the model says about its inputs and outputs; where its files are, how it is
        # built and where it came from are ICS's to record.
        return {
            f.name: getattr(declared, f.name)
            for f in fields(ModelCard)
            if f.name not in NOT_DECLARED
        }
    if isinstance(declared, Mapping):
        return dict(declared)
    raise ConfigError(f"{spec}.card must be a dict of card fields or a ModelCard")


class PythonRuntime:
    """A Python model behind the runtime contract."""

    def __init__(self, card: ModelCard, model: Any) -> None:
        self.card = card
        self.model = model
        self._width = len(card.labels)
        custom = getattr(model, "preprocess", None)
        if callable(custom):
            # Read by Preprocessor.for_runtime: the model's own preprocessing.
            self.preprocess = custom

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = np.asarray(self.model.predict(batch), dtype=np.float32)
        if out.shape != (len(batch), self._width):
            raise InferenceError(
                f"model {self.card.name} answered {len(batch)} images with shape "
                f"{list(out.shape)}, not [{len(batch)}, {self._width}] (one score per label)"
            )
        return check_scores(self.card, out, where=f"model {self.card.name}", error=InferenceError)

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if callable(close):
            close()


def python_source(spec: str) -> dict[str, Any]:
    """What the card of an added Python model records of its class: the spec, the sha256 of
    its module's file, and the folder it was imported from when that is not an installed
    package's (so that later runs import it from there too)."""
    load_class(spec)
    module = sys.modules[spec.partition(":")[0]]
    source: dict[str, Any] = {"python": spec}
    file = getattr(module, "__file__", None)
    if file:
        path = Path(file).resolve()
        source["file"] = str(path)
        source["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        root = path.parent
        for _ in range(module.__name__.count(".") + (path.name == "__init__.py")):
            root = root.parent
        if not any(part in ("site-packages", "dist-packages") for part in root.parts):
            source["path"] = str(root)
    return source


def python_spec(card: ModelCard) -> str:
    spec = card.source.get("python")
    if not isinstance(spec, str):
        raise ModelNotPrepared(
            f"model {card.name} is a Python model whose card names no class (source.python "
            "= 'module:Class'): add it again with `ics models add --python`"
        )
    return spec


def open_python_model(card: ModelCard) -> PythonRuntime:
    """Import the card's class, make one and load it. The folder the card records
    (source.path) is appended to sys.path: it is searched after the standard library and
    the installed packages, so a module there cannot shadow one of theirs. The module's
    file is checked against the sha256 recorded when the model was added before it is
    imported: results name the model's version, which is that hash's start."""
    folder = card.source.get("path")
    if isinstance(folder, str) and folder not in sys.path:
        sys.path.append(folder)
    spec = python_spec(card)
    _check_module(card, spec.partition(":")[0])
    cls = load_class(spec)
    model = cls()
    model.load(card)
    return PythonRuntime(card, model)


def _check_module(card: ModelCard, module_name: str) -> None:
    """ModelNotPrepared when the module's file is not the one the model was added with (a
    model of an entry point records no hash: its package's version stands for it)."""
    if not card.source.get("sha256"):
        return
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return  # load_class says what is wrong
    if found is not None and found.origin and Path(found.origin).is_file():
        check_sha256(card, Path(found.origin))


def entry_point_cards() -> list[ModelCard]:
    """Cards of the models that installed packages register in the `ics.models` group; one
    that cannot be loaded is left out with a warning (a broken plugin must not stop ICS)."""
    cards = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cards.append(entry_point_card(ep))
        except ConfigError as e:
            log.warning(
                "ignoring the Python model %s of entry point group %s: %s",
                ep.name,
                ENTRY_POINT_GROUP,
                e,
            )
    return cards


def entry_point_card(ep: importlib.metadata.EntryPoint) -> ModelCard:
    cls = load_class(ep.value)
    values = {"input_size": 224, "version": "1", "outputs": "probabilities"}
    values.update(class_card_fields(cls, ep.value))
    dist = ep.dist.name if ep.dist is not None else None
    values.update(
        name=ep.name,
        kind="python",
        source={
            "python": ep.value,
            "entry_point": ENTRY_POINT_GROUP,
            **({"distribution": dist} if dist else {}),
        },
    )
    values.setdefault("description", f"{ep.value} (entry point of {dist or 'a package'})")
    if not values.get("classes"):
        raise ConfigError(f"{ep.value}.card names no classes: give it a list of class names")
    return ModelCard.from_mapping(values, None, where=f"entry point {ep.name} = {ep.value}")


def find_entry_point(name: str) -> ModelCard | None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        return entry_point_card(ep)
    return None
