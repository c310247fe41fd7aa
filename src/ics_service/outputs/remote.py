"""Results files on object storage (``--output s3://bucket/results/run.jsonl``), like Step
Functions' ResultWriter: written to a local spool file as results come, uploaded whole when
the run ends.
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from ..errors import OutputError, UsageError
from ..sources import scheme_of, source_for
from ..sources.remote import (
    FsspecSource,
    bucket_problem,
    is_transient,
    message,
    split_url,
    storage_error,
)

log = logging.getLogger(__name__)

#: Seconds waited before each retry of an upload that failed with a transient error.
UPLOAD_BACKOFF = (1.0, 2.0, 4.0)


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


def check_object(path: str) -> None:
    """Refuse a results path that names a bucket or a prefix rather than an object."""
    key = split_url(path)[2]
    if not key or key.endswith("/"):
        raise UsageError(f"results path {path} names no object; give one, e.g. {path}run.jsonl")


def check_writable(path: str) -> None:
    """Refuse, before any work, a results object that cannot be written: a probe object next
    to it is written and deleted (UsageError naming the bucket, EnvironmentUnavailable when
    the storage cannot be reached)."""
    source = _storage(path)
    _, bucket, key = split_url(path)
    check_object(path)
    probe = f"{bucket}/{key}.ics-check-{secrets.token_hex(4)}"
    try:
        source.fs.pipe_file(probe, b"")
    except Exception as e:
        failed = f"cannot write results to {path}"
        raise storage_error(e, failed, path, bucket, "write there") from None
    try:
        source.fs.rm_file(probe)
    except Exception as e:  # writable is what matters; the probe may stay behind
        log.warning("could not delete the write check %s: %s", probe, e)


def upload(local: str, path: str) -> None:
    """Put the finished local results file at path, retrying transient errors. When it
    cannot, an OutputError says where the local file is kept (the caller keeps it)."""
    source = _storage(path)
    protocol, bucket, key = split_url(path)
    for wait in (*UPLOAD_BACKOFF, None):
        try:
            source.fs.put_file(local, f"{bucket}/{key}")
            return
        except Exception as e:
            if wait is not None and is_transient(e):
                log.warning("upload of %s failed (%s); retrying in %g s", path, message(e), wait)
                time.sleep(wait)
                continue
            why = bucket_problem(e, protocol, bucket, "write there") or message(e)
            raise OutputError(
                f"cannot write results to {path}: {why}; the results are kept in {local}: "
                f"copy that file there (e.g. aws s3 cp {local} {path})"
            ) from None


def spool_path(path: str) -> str:
    """A local file to write path's results into until they are uploaded."""
    import tempfile

    suffix = os.path.splitext(path)[1]
    fd, local = tempfile.mkstemp(prefix="ics-results-", suffix=suffix)
    os.close(fd)
    return local
