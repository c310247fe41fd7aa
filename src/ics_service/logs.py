"""Logging setup: readable lines for people, or one JSON object per line for machines.

Records may carry `execution_id` and `item_id` (pass them in `extra=`); both formats show
them. Tracebacks are shown only at DEBUG level: user errors are not bugs. Text lines are
`printable`: a file name cannot move the cursor or recolour the terminal.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from .types import isoformat, utcnow

_CONTEXT_KEYS = ("execution_id", "item_id", "uri")

# C0 and C1 controls, DEL, bidirectional overrides and isolates (which reorder what a
# terminal shows), and the lone surrogates that stand for undecodable bytes in file names.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """Text from outside (file names, error messages) made safe to print on a terminal:
    control characters and undecodable bytes are shown as backslash escapes."""
    return _UNPRINTABLE.sub(_escape, text)


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
        message = record.getMessage()
        if not self.tracebacks and record.exc_info:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = printable(message), None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args, record.exc_info, record.exc_text = saved
        return f"{line} [{printable(context)}]" if context else line


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
