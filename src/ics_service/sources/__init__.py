"""Where items come from: listing SOURCE arguments into item URIs, and reading an item's bytes.

Each storage kind implements the small `Source` contract; `source_for` picks one by URI
scheme and raises a clear error for a scheme no source handles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError
from . import manifests
from .local import LocalSource, path_to_uri, uri_to_path
from .remote import FsspecSource, list_objects, sources_for
from .select import Selection, base_of, relative
from .web import HttpSource

if TYPE_CHECKING:
    from ..config import Settings


class Source(Protocol):
    def list(self, spec: str) -> Iterator[str]:
        """Item URIs named by one SOURCE argument (a file, folder, glob...)."""
        ...

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The item's bytes; raises an ItemError when it cannot (or should not) be read."""
        ...


_SOURCES: dict[str, Source] = {
    "file": LocalSource(),
    **sources_for({}),
    "http": HttpSource(),
    "https": HttpSource(),
}


def register(scheme: str, source: Source) -> None:
    """Make `source` read and list SCHEME:// URIs (storage back ends, tests' fault injection)."""
    global _configured
    _SOURCES[scheme.lower()] = source
    _configured = None  # the next `configure` sets the remote sources up again


def unregister(scheme: str) -> None:
    global _configured
    _SOURCES.pop(scheme.lower(), None)
    _configured = None


#: The settings the remote sources were last set up from (see `configure`).
_configured: str | None = None


def configure(settings: Settings) -> None:
    """Set the remote sources up from the settings: fsspec storage options (`storage`),
    HTTP timeouts and whether link-local addresses may be read. The same settings again
    (and the same AWS environment, which botocore reads when a client starts) keep the
    sources and their connections as they are."""
    global _configured
    aws_env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = json.dumps(
        [settings.storage, settings.http_timeout_s, settings.http_allow_link_local, aws_env],
        sort_keys=True,
        default=str,
    )
    if key == _configured:
        return
    for scheme, source in sources_for(settings.storage).items():
        register(scheme, source)
    web = HttpSource(settings.http_timeout_s, settings.http_allow_link_local)
    register("http", web)
    register("https", web)
    _configured = key


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
    return (uri for uri, _ in expand_items(specs, select))


def expand_items(
    specs: Iterable[str], select: Selection | None = None
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """As `expand`, each URI with its metadata: the other fields of its CSV or JSON Lines
    manifest row, or None."""
    return _expand(specs, (), select or Selection())


#: The list files being read, outermost first: (real path or URI, name as written).
_Chain = tuple[tuple[str, str], ...]
_Listed = Iterator[tuple[str, dict[str, Any] | None]]


def _expand(specs: Iterable[str], chain: _Chain, select: Selection) -> _Listed:
    for spec in specs:
        if spec.startswith("@"):
            yield from _expand_list(spec[1:], chain, select)
        elif select:
            base = base_of(spec)
            for uri in source_for(spec).list(spec):
                if select.keeps(relative(base, uri)):
                    yield uri, None
        else:
            for uri in source_for(spec).list(spec):
                yield uri, None


def _expand_list(name: str, chain: _Chain, select: Selection) -> _Listed:
    remote = scheme_of(name) != "file"
    real = name if remote else os.path.realpath(name)
    chain = (*chain, (real, name))
    if any(real == seen for seen, _ in chain[:-1]):
        names = " -> ".join(f"@{manifests.shown(written)}" for _, written in chain)
        raise UsageError(
            f"list file {manifests.shown(name)} includes itself: {names}; remove the cycle"
        )
    source = source_for(name) if remote else None
    with manifests.opened(name, source) as f:
        for entry in manifests.entries(name, f):
            if isinstance(entry, tuple):  # a CSV or JSON Lines row: one item
                uri, meta = entry
                if select.keeps(uri.rsplit("/", 1)[-1]):
                    yield uri, meta
            elif scheme_of(entry) != "file" and not entry.endswith("/"):
                # A remote URI in a list is an item: no listing request per line.
                if select.keeps(entry.rsplit("/", 1)[-1]):
                    yield entry, None
            else:
                yield from _expand([entry], chain, select)


def read(uri: str, max_bytes: int) -> bytes:
    return source_for(uri).read(uri, max_bytes)


__all__ = [
    "FsspecSource",
    "HttpSource",
    "LocalSource",
    "Selection",
    "Source",
    "configure",
    "expand",
    "expand_items",
    "list_objects",
    "path_to_uri",
    "read",
    "register",
    "scheme_of",
    "source_for",
    "unregister",
    "uri_to_path",
]
