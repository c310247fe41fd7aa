"""Object storage as a destination, for every output that goes there (results files, capture
files): check that a destination can be written, upload a finished file with retries.

Reading is the sources' job (`remote.FsspecSource`); writing goes through the same
registered source, so the same storage options and credentials apply, and the same rule
(`is_transient`) says which errors are worth another try.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError
from . import source_for
from .remote import FsspecSource, is_transient, message, split_url, storage_error

__all__ = [
    "UPLOAD_BACKOFF",
    "check_writable",
    "is_transient",
    "probe",
    "put_bytes",
    "storage_for",
    "upload",
]

log = logging.getLogger(__name__)

#: Seconds waited before each retry of an upload that failed with a transient error.
UPLOAD_BACKOFF = (1.0, 2.0, 4.0)


def storage_for(url: str, what: str) -> FsspecSource:
    """The registered source of url's object storage; `what` names the output in the
    UsageError for a URL that is not object storage ("results")."""
    source = source_for(url)
    if not isinstance(source, FsspecSource):
        raise UsageError(
            f"{what} cannot be written to {url}: only local files and object storage "
            "(s3://BUCKET/KEY) can hold them"
        )
    return source


def probe(url: str, what: str) -> None:
    """Write an empty object named url plus a random suffix, then delete it: the storage's
    own error when it cannot be written (the caller says what it means). A probe that
    cannot be deleted stays behind with a warning: being writable is what was asked."""
    source = storage_for(url, what)
    _, bucket, key = split_url(url)
    name = f"{bucket}/{key}{secrets.token_hex(4)}"
    source.fs.pipe_file(name, b"")
    try:
        source.fs.rm_file(name)
    except Exception as e:
        log.warning("could not delete the write check %s: %s", name, message(e))


def check_writable(url: str, what: str, failed: str) -> None:
    """Refuse, before any work, a destination that cannot be written: `probe(url, what)`,
    its failure as the command's error (`storage_error`: a UsageError naming the bucket and
    the fix, EnvironmentUnavailable when the storage cannot be reached). `failed` opens the
    message ("cannot write results to s3://b/k")."""
    storage_for(url, what)
    _, bucket, _ = split_url(url)
    try:
        probe(url, what)
    except Exception as e:
        raise storage_error(e, failed, url, bucket, "write there") from None


def upload(
    local: str,
    url: str,
    what: str,
    *,
    stop: threading.Event | None = None,
    backoff: Sequence[float] = UPLOAD_BACKOFF,
) -> None:
    """Put the local file at url, retrying transient errors after each wait of `backoff`;
    the last error is raised as the storage gave it. A set `stop` ends the waiting (and the
    retrying) at once."""
    _retried(url, what, lambda fs, name: fs.put_file(local, name), stop, backoff)


def put_bytes(
    data: bytes,
    url: str,
    what: str,
    *,
    stop: threading.Event | None = None,
    backoff: Sequence[float] = UPLOAD_BACKOFF,
) -> None:
    """Write data as the object url, retrying as `upload` does."""
    _retried(url, what, lambda fs, name: fs.pipe_file(name, data), stop, backoff)


def _retried(
    url: str,
    what: str,
    put: Callable[[Any, str], None],
    stop: threading.Event | None,
    backoff: Sequence[float],
) -> None:
    source = storage_for(url, what)
    _, bucket, key = split_url(url)
    stop = stop or threading.Event()
    for wait in (*backoff, None):
        try:
            put(source.fs, f"{bucket}/{key}")
            return
        except Exception as e:
            if wait is None or not is_transient(e) or stop.is_set():
                raise
            log.warning("upload of %s failed (%s); retrying in %g s", url, message(e), wait)
            if stop.wait(wait):
                raise
