"""Results files on object storage (``--output s3://bucket/results/run.jsonl``), like Step
Functions' ResultWriter: written to a local spool file as results come, uploaded whole when
the run ends.
"""

from __future__ import annotations

import logging
import os
import secrets

from ..errors import OutputError, UsageError
from . import scheme_of, source_for
from .remote import FsspecSource, is_transient, split_url

log = logging.getLogger(__name__)


def is_remote(path: str) -> bool:
    """Whether a results path names object storage (s3://...) rather than a local file."""
    return path != "-" and scheme_of(path) != "file"


def _storage(path: str) -> FsspecSource:
    source = source_for(path)
    if not isinstance(source, FsspecSource):
        raise UsageError(
            f"results cannot be written to {path}: only local files and object storage "
            "(s3://BUCKET/KEY) can hold them"
        )
    return source


def check_writable(path: str) -> None:
    """Refuse, before any work, a results object that cannot be written: a probe object next
    to it is written and deleted (UsageError naming the bucket, EnvironmentUnavailable when
    the storage cannot be reached)."""
    source = _storage(path)
    _, bucket, key = split_url(path)
    if not key or key.endswith("/"):
        raise UsageError(f"results path {path} names no object; give one, e.g. {path}run.jsonl")
    probe = f"{bucket}/{key}.ics-check-{secrets.token_hex(4)}"
    try:
        source.fs.pipe_file(probe, b"")
    except Exception as e:
        raise _write_error(e, path, bucket) from None
    try:
        source.fs.rm_file(probe)
    except Exception as e:  # writable is what matters; the probe may stay behind
        log.warning("could not delete the write check %s: %s", probe, e)


def upload(local: str, path: str) -> None:
    """Put the finished local results file at path (OutputError when it cannot)."""
    source = _storage(path)
    _, bucket, key = split_url(path)
    try:
        source.fs.put_file(local, f"{bucket}/{key}")
    except Exception as e:
        raise OutputError(f"cannot write results to {path}: {_why(e)}") from None


def spool_path(path: str) -> str:
    """A local file to write path's results into until they are uploaded."""
    import tempfile

    suffix = os.path.splitext(path)[1]
    fd, local = tempfile.mkstemp(prefix="ics-results-", suffix=suffix)
    os.close(fd)
    return local


def _why(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__


def _write_error(e: BaseException, path: str, bucket: str) -> Exception:
    from ..errors import EnvironmentUnavailable

    if isinstance(e, FileNotFoundError):
        return UsageError(f"cannot write results to {path}: bucket {bucket!r} does not exist")
    if isinstance(e, PermissionError) or type(e).__name__ in (
        "NoCredentialsError",
        "PartialCredentialsError",
    ):
        return UsageError(
            f"cannot write results to {path}: access to bucket {bucket!r} denied ({_why(e)}); "
            "check the credentials and that they may write there"
        )
    if is_transient(e):
        return EnvironmentUnavailable(f"cannot reach the storage of {path}: {_why(e)}")
    return UsageError(f"cannot write results to {path}: {_why(e)}")
