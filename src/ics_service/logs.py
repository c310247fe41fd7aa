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
import threading
import time
from collections.abc import Callable
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


class Throttle(logging.Filter):
    """A filter that lets through the first `burst` records of each message (its template,
    before arguments) per `window_s`, and of the rest logs one summary line per window:
    strangers cannot grow a log without bound by repeating what makes a line.

    The summary is logged when the window ends (by a timer), or at `flush()`. At most
    `max_messages` messages are followed; a message beyond them is let through.
    """

    def __init__(
        self,
        burst: int = 10,
        window_s: float = 60.0,
        *,
        max_messages: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.max_messages = max_messages
        self.clock = clock
        self._lock = threading.Lock()
        # template -> [window start, let through, held back, a record to log the summary as]
        self._windows: dict[tuple[str, str], list[Any]] = {}
        self._timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "ics_throttle_summary", False):
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window[0] >= self.window_s:
                due = self._take_summary(key, window, now)
                window = None
            else:
                due = None
            if window is None:
                if len(self._windows) >= self.max_messages and key not in self._windows:
                    letting = True
                else:
                    self._windows[key] = [now, 1, 0, record]
                    letting = True
            elif window[1] < self.burst:
                window[1] += 1
                letting = True
            else:
                window[2] += 1
                window[3] = record
                letting = False
                self._arm(window[0] + self.window_s - now)
        if due is not None:
            _log_summary(*due)
        return letting

    def flush(self) -> None:
        """Log the summary of every window that has held lines back, and start them anew."""
        now = self.clock()
        with self._lock:
            due = [
                self._take_summary(key, window, now)
                for key, window in list(self._windows.items())
                if window[2] and now - window[0] >= self.window_s
            ]
            self._timer = None
            if any(w[2] for w in self._windows.values()):
                self._arm(min(w[0] for w in self._windows.values() if w[2]) + self.window_s - now)
        for summary in due:
            if summary is not None:
                _log_summary(*summary)

    def close(self) -> None:
        """Log every summary now, whether its window has ended or not, and stop the timer."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            now = self.clock()
            due = [
                self._take_summary(key, w, now) for key, w in list(self._windows.items()) if w[2]
            ]
        for summary in due:
            if summary is not None:
                _log_summary(*summary)

    def _take_summary(
        self, key: tuple[str, str], window: list[Any], now: float
    ) -> tuple[logging.LogRecord, int, float] | None:
        del self._windows[key]
        return (window[3], window[2], now - window[0]) if window[2] else None

    def _arm(self, delay: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(max(delay, 0.0), self.flush)
            self._timer.daemon = True
            self._timer.start()


def _log_summary(last: logging.LogRecord, held: int, seconds: float) -> None:
    logging.getLogger(last.name).log(
        last.levelno,
        "%d more like this in the last %.0f s, not logged one by one: %s",
        held,
        seconds,
        last.getMessage(),
        extra={"ics_throttle_summary": True},
    )
