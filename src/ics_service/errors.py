"""Errors users can act on, and how each one maps to an exit code and an HTTP status.

Per-item errors (`ItemError`) end one item FAILED with `error.type` set to the class
name; they never stop an execution. `UsageError` and its kind end a command with exit
code 2 and a message that says what to fix. Anything else is a bug.
"""

from __future__ import annotations

from .types import ErrorInfo


class IcsError(Exception):
    """Base class of every error ICS raises on purpose."""

    exit_code = 1
    http_status = 500

    @property
    def type(self) -> str:
        return type(self).__name__

    def info(self) -> ErrorInfo:
        return ErrorInfo(type=self.type, message=str(self))


class UsageError(IcsError):
    """A bad command line, setting or request: the user can fix it."""

    exit_code = 2
    http_status = 400


class ConfigError(UsageError):
    """A bad settings file, environment variable or flag."""


class ModelNotFound(UsageError):
    http_status = 404


class ModelNotPrepared(UsageError):
    http_status = 503


class ExecutionNotFound(UsageError):
    http_status = 404


class StoreError(IcsError):
    """The execution store cannot be reached or is not an ICS store."""

    exit_code = 2
    http_status = 503


# --- per-item errors --------------------------------------------------------------


class ItemError(IcsError):
    """Ends one item FAILED; the execution carries on."""

    http_status = 422
    #: Whether the default retry policy retries it (transient errors only).
    retryable = False


class SourceNotFound(ItemError):
    http_status = 404


class SourceUnreadable(ItemError):
    """The item exists but cannot be read (permissions, a folder, a special file)."""


class SourceUnavailable(ItemError):
    """A transient failure reaching the item (timeouts, throttling, connection errors, 5xx)."""

    http_status = 503
    retryable = True


class InvalidImage(ItemError):
    """Empty, truncated, corrupt or not an image at all."""


class UnsupportedFormat(ItemError):
    """An image format ICS does not decode (HEIC, SVG, PDF...)."""

    http_status = 415


class ImageTooLarge(ItemError):
    """Over `max_bytes` or `max_pixels`, or a decompression bomb."""

    http_status = 413


class ModelUnavailable(ItemError):
    """A transient failure of a model endpoint (timeout, throttling, 5xx)."""

    http_status = 503
    retryable = True


class InferenceError(ItemError):
    """The model runtime failed on this item's batch."""

    http_status = 500
