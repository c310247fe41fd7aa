"""The file channel: one JSON line per alert appended to a local file (an audit trail)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import UsageError
from .channels import DeliveryError

_LOCK = threading.Lock()


class FileChannel:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise UsageError(
                f"file subscription {url!r} must be file:///ABSOLUTE/PATH (three slashes)"
            )
        self.path = Path(unquote(parts.path))
        if not self.path.parent.is_dir():
            raise UsageError(
                f"file subscription {url!r}: the folder {self.path.parent} does not exist"
            )
        if self.path.is_dir():
            raise UsageError(f"file subscription {url!r} is a folder; name a file in it")

    def shown(self) -> str:
        return f"file://{self.path}"

    def close(self) -> None:
        pass

    def send(
        self, alert: Mapping[str, Any], title: str, body: str, *, timeout_s: float | None = None
    ) -> None:
        line = json.dumps(alert, separators=(",", ":"), default=str) + "\n"
        try:
            # One write of a whole line in append mode: lines from several processes do
            # not interleave.
            with _LOCK, self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise DeliveryError(f"cannot append to {self.path}: {e.strerror or e}") from None
