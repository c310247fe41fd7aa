"""Errors users can act on, each with its exit code and the HTTP status it stands for.

Per-item errors (`ItemError`) end one item FAILED with `error.type` set to the class
name; they never stop an execution. `UsageError` and its kind end a command with exit
code 2 and a message that says what to fix; `EnvironmentUnavailable` (store, disk, device)
with exit code 4. Anything else is a bug: exit code 3, or `InternalError` on one item.
"""

from __future__ import annotations

import os
from enum import IntEnum

from .types import ErrorInfo


class ExitCode(IntEnum):
    """Every exit code of the `ics` command (documented in docs/classify.md)."""

    #: The execution SUCCEEDED (or the command did what it was asked).
    OK = 0
    #: The execution FAILED: more failed items than tolerated (see `low_confidence`).
    FAILED = 1
    #: A usage or configuration error: fix the command line or the settings.
    USAGE = 2
    #: A bug in ICS: the traceback is in the log at DEBUG level; please report it.
    INTERNAL = 3
    #: The environment is unavailable: the store cannot be reached, the disk is full...
    ENVIRONMENT = 4
    #: `ics report --baseline`: the source drifted from its baseline (PSI over the limit).
    DRIFT = 5
    #: Interrupted by SIGINT or SIGTERM: the execution is ABORTED, finished items kept.
    INTERRUPTED = 130


#: The error type recorded on an item that failed through a bug, not a bad image.
INTERNAL_ERROR = "InternalError"


def install_hint(extra: str) -> str:
    """How to install one of the package's extras (scripts/install-check.py checks each)."""
    return f"pip install 'ics-service[{extra}]' (in a clone of ICS: pip install '.[{extra}]')"


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop now (exit code 130). A BaseException, so that no `except
    Exception` swallows it, and not a KeyboardInterrupt, which Click would turn into exit 1."""


class IcsError(Exception):
    """Base class of every error ICS raises on purpose."""

    exit_code = ExitCode.FAILED
    http_status = 500

    @property
    def type(self) -> str:
        return type(self).__name__

    def info(self) -> ErrorInfo:
        return ErrorInfo(type=self.type, message=str(self))


class UsageError(IcsError):
    """A bad command line, setting or request: the user can fix it."""

    exit_code = ExitCode.USAGE
    http_status = 400


class ConfigError(UsageError):
    """A bad settings file, environment variable or flag."""


class ModelNotFound(UsageError):
    http_status = 404


class ModelNotPrepared(UsageError):
    http_status = 503


class ModelBusy(UsageError):
    """The server cannot unload this model now (it is the default one)."""

    http_status = 409


class ExecutionNotFound(UsageError):
    http_status = 404


class ExecutionBusy(UsageError):
    """The execution is running in a live process: it cannot be resumed now."""

    http_status = 409


class ExecutionTaken(ExecutionBusy):
    """Another process took the execution over (this one went unheard past the lease): this
    one must stop running it and record nothing of its end."""


class EnvironmentUnavailable(IcsError):
    """Something ICS needs from its host is missing or broken: the store, the disk."""

    exit_code = ExitCode.ENVIRONMENT
    http_status = 503


class StoreError(EnvironmentUnavailable):
    """The execution store cannot be reached, written, or is not an ICS store."""


class StoreLost(StoreError):
    """The store's SQLite file was deleted or replaced while this process used it: what it
    recorded since went to a file nobody can open any more."""


class PermissionDenied(EnvironmentUnavailable):
    """A file or folder ICS must read or write is not open to this user (another user's
    model cache, a folder without write permission)."""


def permission_denied(e: PermissionError, what: str = "file", fix: str = "") -> PermissionDenied:
    """The PermissionDenied of an OSError: names the file, the user and how to fix it."""
    name = e.filename if e.filename is not None else "a file"
    user = _user()
    return PermissionDenied(
        f"cannot use the {what} {name}: permission denied for {user}; "
        + (
            fix
            or "make it readable (and its folder writable) for this user, e.g. chmod a+r, "
            "or point ICS at files of this user (--home / ICS_HOME)"
        )
    )


def _user() -> str:
    """This process's user as messages name it: "user NAME (uid N)"."""
    try:
        uid = os.getuid()
    except AttributeError:  # no uid on this platform
        return "this user"
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


class DeviceUnavailable(EnvironmentUnavailable):
    """The device the settings ask the model to run on is not here: no CUDA provider in the
    installed onnxruntime, or one that cannot start (missing libraries, no such GPU)."""


class OutputError(EnvironmentUnavailable):
    """A results file cannot be written (disk full, permissions, I/O error)."""


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


class SourceForbidden(ItemError):
    """The item, or a redirect it answers with, is outside the server's allowed_sources."""

    http_status = 403


class SourceUnavailable(ItemError):
    """A transient failure reaching the item (timeouts, throttling, connection errors)."""

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


class DecodeCancelled(ItemError):
    """The run stopped while this image was being read or waited for decode memory: it was
    not decoded, and the engine leaves its item pending instead of recording it."""

    http_status = 503


class ModelUnavailable(ItemError):
    """A transient failure of the model runtime (retried by the ClassifyImage policy)."""

    http_status = 503
    retryable = True


class WorkerLost(ModelUnavailable):
    """The Ray worker (or the whole node) classifying this item's chunk died: the chunk is
    retried under the ClassifyImage policy, and this is the item's error once it stays lost."""


class InferenceError(ItemError):
    """The model runtime failed on this item's batch."""

    http_status = 500


class EndpointUnavailable(ModelUnavailable):
    """A remote model (a SageMaker endpoint, a v2 server) cannot be reached, is throttling
    or answers 5xx: retried by the ClassifyImage policy, and the item's error once it stays
    down."""

    http_status = 503


class ModelError(InferenceError):
    """A remote model answered this item with an error of its own (SageMaker's ModelError, a
    4xx of a v2 server) or with an answer ICS cannot read; the message names the endpoint."""

    http_status = 502
