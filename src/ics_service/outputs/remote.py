"""Results files on object storage (``--output s3://bucket/results/run.jsonl``), like Step
Functions' ResultWriter: written to a local spool file as results come, uploaded whole when
the run ends.
"""

from __future__ import annotations

import os
import threading

from ..errors import OutputError, UsageError
from ..sources import scheme_of, storage
from ..sources.remote import bucket_problem, message, split_url


def is_remote(path: str) -> bool:
    """Whether a results path names object storage (s3://...) rather than a local file."""
    return path != "-" and scheme_of(path) != "file"


def check_object(path: str) -> None:
    """Refuse a results path that names a bucket or a prefix rather than an object."""
    key = split_url(path)[2]
    if not key or key.endswith("/"):
        raise UsageError(f"results path {path} names no object; give one, e.g. {path}run.jsonl")


def check_writable(path: str) -> None:
    """Refuse, before any work, a results object that cannot be written: a probe object next
    to it is written and deleted (UsageError naming the bucket, EnvironmentUnavailable when
    the storage cannot be reached)."""
    storage.storage_for(path, "results")
    check_object(path)
    storage.check_writable(f"{path}.ics-check-", "results", f"cannot write results to {path}")


def upload(local: str, path: str, *, stop: threading.Event | None = None) -> None:
    """Put the finished local results file at path, retrying transient errors (no more
    once `stop` is set). When it cannot, an OutputError says where the local file is kept
    (the caller keeps it)."""
    storage.storage_for(path, "results")
    protocol, bucket, _ = split_url(path)
    try:
        storage.upload(local, path, "results", stop=stop)
    except Exception as e:
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
