"""Content hashes of model files: what `ics models add` and `prepare` record, and the check
that a file opened is the one recorded (a leaf of the models package: the factory, the
Python models and the preparation all use it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ModelNotPrepared
from ..modelcard import ModelCard


def sha256_of(path: Path) -> str:
    """The file's sha256, hex (a model's content hash)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(card: ModelCard, path: Path) -> None:
    """ModelNotPrepared naming the file when an added model's file (its ONNX file, or its
    Python module) is not the one it was added with (its card records the sha256; about
    20 ms for a 20 MB file)."""
    recorded = card.source.get("sha256")
    if not isinstance(recorded, str) or not recorded:
        return
    actual = sha256_of(path)
    if actual != recorded:
        raise ModelNotPrepared(
            f"model {card.name}'s file {path} has sha256 {actual[:12]}…, not {recorded[:12]}… "
            "as when it was added: it was changed or replaced since; add the model again "
            f"(`ics models add {card.name} --replace ...`)"
        )
