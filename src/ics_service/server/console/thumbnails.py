"""Pictures of recorded items, made on demand from the item's own source through ICS's safe
decoder (its checks, pixel limit and decode memory budget apply), and kept in a disk cache
of bounded size.

Only an item of the store can be pictured: a request names an execution and an item, and
the URI read is the one the store recorded for it, never one from the request. What
cannot be pictured (a failed read or decode, a URI whose secret was not recorded) is
`Unavailable`, and the page shows the item without its picture.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from pathlib import Path

from ... import sources
from ...config import Settings
from ...errors import IcsError
from ...imaging import Limits, Preprocessor
from ...modelcard import ModelCard

log = logging.getLogger(__name__)

#: The picture sizes (side of the square, centre-cropped as a model's input is): a
#: thumbnail in the lists, the view on an item's page.
SIZES = {"thumb": 160, "view": 448}
#: JPEG quality of the pictures.
QUALITY = 85


def _picture_card(side: int) -> ModelCard:
    """What the decoder needs to make a picture: its size (no crop margin); no model."""
    return ModelCard(
        name=f"picture-{side}", version="1", description="", input_size=side, crop_pct=1.0
    )


class Unavailable(Exception):
    """The item has no picture: its source cannot be read or decoded now."""


class Thumbnails:
    """The pictures of one server, cached under `folder` within `max_bytes` (the least
    recently used go first)."""

    def __init__(self, settings: Settings, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_source_bytes = settings.max_bytes
        limits = Limits.from_settings(settings)
        self._decoders = {
            name: Preprocessor(_picture_card(side), limits) for name, side in SIZES.items()
        }
        self._lock = threading.Lock()

    def picture(self, execution_id: str, item_id: str, uri: str, size: str) -> bytes:
        """The JPEG of an item's picture (Unavailable when it cannot be made); blocking."""
        key = hashlib.sha256(f"{execution_id}/{item_id}/{size}/{uri}".encode()).hexdigest()
        path = self.folder / key[:2] / f"{key}.jpg"
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
            return data
        except FileNotFoundError:
            pass
        data = self._make(uri, size)
        self._keep(path, data)
        return data

    def _make(self, uri: str, size: str) -> bytes:
        try:
            raw = sources.read(uri, self.max_source_bytes)
            img, _ = self._decoders[size].decode(raw)
        except IcsError as e:
            raise Unavailable(str(e)) from None
        out = io.BytesIO()
        img.save(out, "JPEG", quality=QUALITY)
        return out.getvalue()

    def _keep(self, path: Path, data: bytes) -> None:
        """Write atomically, then let go of the least recently used beyond the bound."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("picture cache %s not written: %s", self.folder, e)
            return
        with self._lock:
            self._evict()

    def _evict(self) -> None:
        files = []
        total = 0
        for p in self.folder.glob("*/*.jpg"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
            total += st.st_size
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
