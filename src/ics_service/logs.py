"""Logging setup: readable lines for people, or one JSON object per line for machines.

Records may carry `execution_id` and `item_id` (pass them in `extra=`); both formats show
them. Tracebacks are shown only at DEBUG level: user errors are not bugs.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .types import isoformat, utcnow

_CONTEXT_KEYS = ("execution_id", "item_id", "uri")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": isoformat(utcnow()),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if getattr(record, k, None)
        )
        saved = record.msg, record.args, record.exc_info, record.exc_text
        if not self.tracebacks and record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args, record.exc_info, record.exc_text = None, None, None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args, record.exc_info, record.exc_text = saved
        return f"{line} [{context}]" if context else line


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    _ics = True

    @property  # type: ignore[override,unused-ignore]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str, fmt: str) -> None:
    """Send the `ics_service` loggers to stderr in the chosen format (idempotent)."""
    root = logging.getLogger("ics_service")
    for handler in list(root.handlers):
        if getattr(handler, "_ics", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(level == "DEBUG"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
