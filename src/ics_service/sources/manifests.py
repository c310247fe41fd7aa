"""Manifests (`@FILE`), like Step Functions' ItemReader: a list of items in a file, local or
on object storage.

- ``.csv``: a header row with a ``uri`` column; each row is one item, its other columns
  (as text) the item's metadata.
- ``.jsonl`` / ``.ndjson``: one JSON object a line with a ``uri`` string; its other fields
  are the item's metadata.
- anything else: one SOURCE a line (blank lines and # comments skipped). A local line is
  listed like a SOURCE argument (a folder, a glob, another @list); a remote URI is an item
  as it is (no request per line), unless it ends with "/", which lists the prefix.

Every format is read lazily, a line at a time.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from .. import jsonlines
from ..errors import UsageError
from .local import path_to_uri, uri_to_path
from .remote import FsspecSource, bucket_problem, message, split_url

#: One listed entry of a manifest: a SOURCE to list (str) or an item with its metadata.
Entry = str | tuple[str, dict[str, Any] | None]


def kind_of(name: str) -> str:
    """ "csv", "jsonl" or "txt", from the manifest's extension."""
    ext = os.path.splitext(name.rstrip("/"))[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(ext, "txt")


def shown(name: str) -> str:
    """A manifest's name as messages show it: as written, or its file:// URI if not UTF-8."""
    if "://" in name:
        return name
    uri = path_to_uri(os.path.abspath(name))
    return name if uri.startswith("/") else uri


@contextmanager
def opened(name: str, source: Any) -> Iterator[IO[str]]:
    """The manifest as text (UTF-8, a BOM ignored; undecodable bytes kept as surrogates)."""
    if "://" in name and not isinstance(source, FsspecSource):
        raise UsageError(
            f"cannot read list file {shown(name)}: list files are read from local disk or "
            "object storage (s3://BUCKET/KEY); download it first"
        )
    try:
        if isinstance(source, FsspecSource):
            _, bucket, key = split_url(name)
            raw = source.fs.open(f"{bucket}/{key}", "rb")
            f: IO[str] = io.TextIOWrapper(
                raw, encoding="utf-8-sig", errors="surrogateescape", newline=""
            )
        else:
            f = open(name, encoding="utf-8-sig", errors="surrogateescape", newline="")  # noqa: SIM115
    except UsageError:
        raise
    except Exception as e:
        raise _unreadable(name, e) from None
    with f:
        yield f


def _unreadable(name: str, e: BaseException) -> UsageError:
    if "://" in name:
        _, bucket, _ = split_url(name)
        protocol = name.partition("://")[0].lower()
        problem = bucket_problem(e, protocol, bucket, "read its objects")
        if problem is not None:
            why = problem
        elif isinstance(e, FileNotFoundError):
            why = "no such object"
        else:
            why = message(e)
    else:
        why = getattr(e, "strerror", None) or str(e)
    return UsageError(f"cannot read list file {shown(name)}: {why}")


def entries(name: str, f: IO[str]) -> Iterator[Entry]:
    """The manifest's entries, read lazily."""
    kind = kind_of(name)
    try:
        if kind == "csv":
            yield from _csv_rows(name, f)
        elif kind == "jsonl":
            yield from _jsonl_rows(name, f)
        else:
            yield from _txt_lines(name, f)
    except UsageError:
        raise
    except (OSError, csv.Error) as e:
        raise _unreadable(name, e) from None


def _txt_lines(name: str, f: IO[str]) -> Iterator[str]:
    for line in f:
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def _csv_rows(name: str, f: IO[str]) -> Iterator[Entry]:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    if "uri" not in columns:
        raise UsageError(
            f"manifest {shown(name)} has no 'uri' column (its header: "
            f"{', '.join(columns) or 'empty'}); name the column of item URIs 'uri'"
        )
    for row in reader:
        uri = (row.pop("uri") or "").strip()
        if not uri:
            raise UsageError(
                f"manifest {shown(name)} line {reader.line_num}: the uri column is empty"
            )
        extra = row.pop(None, None)
        if extra:
            raise UsageError(
                f"manifest {shown(name)} line {reader.line_num}: more fields than the header "
                f"has columns; quote values that hold commas"
            )
        yield _item(uri), {k: v for k, v in row.items() if v is not None}


def _jsonl_rows(name: str, f: IO[str]) -> Iterator[Entry]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            doc = jsonlines.loads(line)
        except jsonlines.BadLine as e:
            raise UsageError(f"manifest {shown(name)} line {n} is {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("uri"), str) or not doc["uri"]:
            raise UsageError(
                f'manifest {shown(name)} line {n}: each line must be an object with a "uri" string'
            )
        uri = doc.pop("uri")
        yield _item(uri), doc


_SURROGATE = re.compile("[\udc80-\udcff]")


def remote_uri(line: str) -> str:
    """A remote URI from a manifest as it may be stored and shown: bytes that are not
    UTF-8 (kept as surrogates when the manifest was read) percent-encoded, as local paths'
    are; reading it then fails for that item only."""
    if "://" not in line or line.startswith("file://"):
        return line
    return _SURROGATE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", line)


def _item(uri: str) -> str:
    """An item URI from a manifest row: a local path made absolute, like SOURCE arguments."""
    if "://" in uri and not uri.startswith("file://"):
        return remote_uri(uri)
    return path_to_uri(os.path.abspath(os.path.expanduser(uri_to_path(uri))))
