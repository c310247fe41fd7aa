"""Where items come from: listing SOURCE arguments into item URIs, and reading an item's bytes.

Each storage kind implements the small `Source` contract; `source_for` picks one by URI
scheme and raises a clear error for a scheme no source handles.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from ..errors import UsageError
from .local import LocalSource


class Source(Protocol):
    def list(self, spec: str) -> Iterator[str]:
        """Item URIs named by one SOURCE argument (a file, folder, glob...)."""
        ...

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The item's bytes; raises an ItemError when it cannot (or should not) be read."""
        ...


_SOURCES: dict[str, Source] = {"file": LocalSource()}


def register(scheme: str, source: Source) -> None:
    """Make `source` read and list SCHEME:// URIs (storage back ends, tests' fault injection)."""
    _SOURCES[scheme.lower()] = source


def unregister(scheme: str) -> None:
    _SOURCES.pop(scheme.lower(), None)


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isalnum() and len(head) > 1 else "file"


def source_for(uri: str) -> Source:
    scheme = scheme_of(uri)
    try:
        return _SOURCES[scheme]
    except KeyError:
        raise UsageError(
            f"no source can read {scheme}:// URIs ({uri}); "
            f"supported: {', '.join(s + '://' for s in _SOURCES)} and local paths"
        ) from None


def expand(specs: Iterable[str]) -> Iterator[str]:
    """Item URIs for SOURCE arguments: files, folders (recursive), globs and @list files."""
    for spec in specs:
        if spec.startswith("@"):
            yield from expand(_read_list(spec[1:]))
        else:
            yield from source_for(spec).list(spec)


def _read_list(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise UsageError(f"cannot read list file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"list file {path} is not UTF-8 text (one path per line)") from None
    return [line for line in lines if line and not line.startswith("#")]


def read(uri: str, max_bytes: int) -> bytes:
    return source_for(uri).read(uri, max_bytes)


__all__ = [
    "LocalSource",
    "Source",
    "expand",
    "read",
    "register",
    "scheme_of",
    "source_for",
    "unregister",
]
