"""Where items come from: listing SOURCE arguments into item URIs, and reading an item's bytes.

Each storage kind implements the small `Source` contract; `source_for` picks one by URI
scheme and raises a clear error for a scheme no source handles.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from ..errors import UsageError
from .local import LocalSource, path_to_uri, uri_to_path
from .remote import FsspecSource, list_objects, sources_for
from .select import Selection, base_of, relative


class Source(Protocol):
    def list(self, spec: str) -> Iterator[str]:
        """Item URIs named by one SOURCE argument (a file, folder, glob...)."""
        ...

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The item's bytes; raises an ItemError when it cannot (or should not) be read."""
        ...


_SOURCES: dict[str, Source] = {"file": LocalSource(), **sources_for({})}


def register(scheme: str, source: Source) -> None:
    """Make `source` read and list SCHEME:// URIs (storage back ends, tests' fault injection)."""
    _SOURCES[scheme.lower()] = source


def unregister(scheme: str) -> None:
    _SOURCES.pop(scheme.lower(), None)


def configure(storage: Mapping[str, Mapping[str, Any]]) -> None:
    """Use these fsspec storage options (the `storage` setting) for object storage."""
    for scheme, source in sources_for(storage).items():
        register(scheme, source)


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


def expand(specs: Iterable[str], select: Selection | None = None) -> Iterator[str]:
    """Item URIs for SOURCE arguments: files, folders (recursive), globs and @list files.

    Streams: items come out as they are found. A list file that includes itself, directly
    or through other lists, is a UsageError; paths inside a list are relative to the
    current folder, like SOURCE arguments. `select` (--include/--exclude) filters what
    each SOURCE lists.
    """
    return _expand(specs, (), select or Selection())


#: The list files being read, outermost first: (real path, path as written).
_Chain = tuple[tuple[str, str], ...]


def _expand(specs: Iterable[str], chain: _Chain, select: Selection) -> Iterator[str]:
    for spec in specs:
        if spec.startswith("@"):
            yield from _expand_list(spec[1:], chain, select)
        elif select:
            base = base_of(spec)
            for uri in source_for(spec).list(spec):
                if select.keeps(relative(base, uri)):
                    yield uri
        else:
            yield from source_for(spec).list(spec)


def _expand_list(path: str, chain: _Chain, select: Selection) -> Iterator[str]:
    real = os.path.realpath(path)
    chain = (*chain, (real, path))
    if any(real == seen for seen, _ in chain[:-1]):
        names = " -> ".join(f"@{_show(written)}" for _, written in chain)
        raise UsageError(f"list file {_show(path)} includes itself: {names}; remove the cycle")
    yield from _expand(_list_lines(path), chain, select)


def _list_lines(path: str) -> Iterator[str]:
    """The entries of a list file, read lazily: one path per line, blank lines and # comments
    skipped. Read as UTF-8 (a BOM is ignored) with surrogateescape: a name written in an old
    encoding comes through as its exact bytes, so it still names its file."""
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"cannot read list file {_show(path)}: {e.strerror or e}") from None
    with f:
        while True:
            try:
                line = f.readline()
            except OSError as e:
                raise UsageError(
                    f"cannot read list file {_show(path)}: {e.strerror or e}"
                ) from None
            if not line:
                return
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _show(path: str) -> str:
    """A path as messages show it: as written, or as its file:// URI when it is not UTF-8."""
    shown = path_to_uri(os.path.abspath(path))
    return path if shown.startswith("/") else shown


def read(uri: str, max_bytes: int) -> bytes:
    return source_for(uri).read(uri, max_bytes)


__all__ = [
    "FsspecSource",
    "LocalSource",
    "Selection",
    "Source",
    "configure",
    "expand",
    "list_objects",
    "path_to_uri",
    "read",
    "register",
    "scheme_of",
    "source_for",
    "unregister",
    "uri_to_path",
]
