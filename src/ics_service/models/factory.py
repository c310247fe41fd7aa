"""The runtime factory: a card's `kind` says which runtime runs it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ModelNotPrepared
from ..modelcard import ModelCard
from .device import CPU, Device
from .digests import check_sha256
from .remote import PREFIXES, RemoteOptions
from .runtime import ModelRuntime, OnnxRuntime, check_readable

#: The kinds run by a remote endpoint (models/remote.py).
REMOTE_KINDS = tuple(PREFIXES)


def onnx_file(card: ModelCard, models_dir: Path) -> Path:
    """Where the card's ONNX file is (or would be, for a bundled model not yet prepared)."""
    if card.model_path is not None:
        return Path(card.model_path)
    from .prepare import onnx_path

    return onnx_path(card, models_dir)


def _load_onnx(
    card: ModelCard, models_dir: Path, threads: int, auto_prepare: bool, device: Device = CPU
) -> ModelRuntime:
    if card.model_path is None:  # bundled: prepared from its weights when missing
        from .prepare import load_bundled

        return load_bundled(
            card, models_dir, threads=threads, device=device, auto_prepare=auto_prepare
        )
    path = Path(card.model_path)
    if not path.is_file():
        raise ModelNotPrepared(
            f"model {card.name} has no model file at {path}: add it again "
            f"(`ics models add {card.name} --replace ...`) or `ics models remove {card.name}`"
        )
    check_readable(path)
    check_sha256(card, path)
    return OnnxRuntime(card, path, threads=threads, device=device)


#: Opens a card's runtime: (card, models_dir, threads, auto_prepare) → runtime.
Loader = Callable[[ModelCard, Path, int, bool], ModelRuntime]


def _load_python(
    card: ModelCard, models_dir: Path, threads: int, auto_prepare: bool
) -> ModelRuntime:
    from .python import open_python_model

    return open_python_model(card)


LOADERS: dict[str, Loader] = {
    "onnx": _load_onnx,
    "python": _load_python,
}


def load_runtime(
    card: ModelCard,
    models_dir: Path,
    *,
    threads: int = 0,
    device: Device = CPU,
    auto_prepare: bool = True,
    remote: RemoteOptions | None = None,
) -> ModelRuntime:
    """The runtime of the card's kind. A bundled ONNX model that is not prepared yet is
    prepared first when torch is here (`auto_prepare`). An ONNX model runs on `device`;
    a remote model (sagemaker, v2) runs with the `remote` options (timeout, concurrency)."""
    if card.kind in REMOTE_KINDS:
        from .remote import open_remote

        return open_remote(card, models_dir, remote or RemoteOptions())
    loader = LOADERS.get(card.kind)
    if loader is None:
        raise ModelNotPrepared(
            f"model {card.name} is a {card.kind!r} model, which this ICS cannot run; it runs "
            f"{', '.join([*LOADERS, *REMOTE_KINDS])} models"
        )
    if card.kind == "onnx":
        return _load_onnx(card, models_dir, threads, auto_prepare, device)
    return loader(card, models_dir, threads, auto_prepare)
