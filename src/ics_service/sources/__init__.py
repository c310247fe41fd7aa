"""Where items come from: listing SOURCE arguments into item URIs, and reading an item's bytes.

Each storage kind implements the small `Source` contract; `source_for` picks one by URI
scheme and raises a clear error for a scheme no source handles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError
from . import manifests
from .local import LocalSource, path_to_uri, uri_to_path
from .remote import FsspecSource, list_objects, sources_for, split_url
from .select import Selection, base_of, relative
from .web import Confine, HttpSource

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


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
#: The sources `configure` made (or the defaults): the only ones it replaces; a source
#: given to `register` stays until it is unregistered.
_MADE: dict[str, Source] = {k: v for k, v in _SOURCES.items() if k != "file"}


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
    web = HttpSource(settings.http_timeout_s, settings.http_allow_link_local)
    made: dict[str, Source] = {**sources_for(settings.storage), "http": web, "https": web}
    replaced: list[Source] = []
    for scheme, source in made.items():
        current = _SOURCES.get(scheme)
        if current is None or current is _MADE.get(scheme):
            _SOURCES[scheme] = source
            _MADE[scheme] = source
            if current is not None:
                replaced.append(current)
    for old in {id(s): s for s in replaced}.values():
        _close(old)
    _configured = key


def _close(source: Source) -> None:
    """Close a replaced source's connections (HTTP clients, storage sessions)."""
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception as e:  # closing is tidying up: it never fails a command
            log.debug("closing a replaced source failed: %s", e)


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
    specs: Iterable[str],
    select: Selection | None = None,
    *,
    stopped: Callable[[], bool] | None = None,
    duplicates: Duplicates | None = None,
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """As `expand`, each URI with its metadata: the other fields of its CSV or JSON Lines
    manifest row, or None. The listing ends early once `stopped()` is true, which is asked
    for every key listed, also those the selection leaves out.

    Each item comes once, as first listed, however many SOURCEs name it (`a/ a/*.jpg`):
    items are told apart by `canonical_uri`; `duplicates` counts those left out."""
    listed = _expand(specs, (), select or Selection(), stopped or _never)
    return _unique(listed, duplicates if duplicates is not None else Duplicates())


class Duplicates:
    """How many items a listing left out because an earlier SOURCE named them already."""

    def __init__(self) -> None:
        self.count = 0


def canonical_uri(uri: str) -> str:
    """What makes two URIs the same item: a local path made absolute with its folders'
    symlinks resolved; a URL with its scheme (and an HTTP host, not its user information)
    in lower case, without an HTTP default port or fragment."""
    if scheme_of(uri) == "file":
        folder, name = os.path.split(os.path.abspath(uri_to_path(uri)))
        return os.path.join(os.path.realpath(folder), name)
    parts = urllib.parse.urlsplit(uri)
    scheme, netloc, path, fragment = parts.scheme.lower(), parts.netloc, parts.path, parts.fragment
    if scheme in ("http", "https"):
        # The host only: a user name or password is case-sensitive.
        user, at, host = netloc.rpartition("@")
        netloc = user + at + host.lower().removesuffix(":80" if scheme == "http" else ":443")
        path, fragment = path or "/", ""
    return urllib.parse.urlunsplit((scheme, netloc, path, parts.query, fragment))


#: Folders whose real path a listing remembers at once (a listing walks one at a time).
_FOLDERS_KEPT = 4096


def _unique(items: _Listed, duplicates: Duplicates) -> _Listed:
    """The items whose canonical URI was not listed before. What is kept of each is a
    16-byte digest (some 100 bytes an item in all), so memory stays modest over millions."""
    seen: set[bytes] = set()
    folders: dict[str, str] = {}
    for uri, meta in items:
        if scheme_of(uri) == "file":
            folder, name = os.path.split(os.path.abspath(uri_to_path(uri)))
            real = folders.get(folder)
            if real is None:
                if len(folders) >= _FOLDERS_KEPT:
                    folders.clear()
                real = folders[folder] = os.path.realpath(folder)
            key = os.path.join(real, name)
        else:
            key = canonical_uri(uri)
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if digest in seen:
            duplicates.count += 1
            log.debug("%s is listed already: classified once", uri)
            continue
        seen.add(digest)
        yield uri, meta


def _never() -> bool:
    return False


#: The list files being read, outermost first: (real path or URI, name as written).
_Chain = tuple[tuple[str, str], ...]
_Listed = Iterator[tuple[str, dict[str, Any] | None]]


def _expand(
    specs: Iterable[str], chain: _Chain, select: Selection, stopped: Callable[[], bool]
) -> _Listed:
    for spec in specs:
        if stopped():
            return
        if spec.startswith("@"):
            yield from _expand_list(spec[1:], chain, select, stopped)
            continue
        base = base_of(spec) if select else ""
        for uri in source_for(spec).list(spec):
            if stopped():
                return
            if not select or select.keeps(relative(base, uri)):
                yield uri, None


def _expand_list(
    name: str, chain: _Chain, select: Selection, stopped: Callable[[], bool]
) -> _Listed:
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
            if stopped():
                return
            if isinstance(entry, tuple):  # a CSV or JSON Lines row: one item
                uri, meta = entry
                if select.keeps(_in_manifest(uri)):
                    yield uri, meta
            elif scheme_of(entry) != "file" and not entry.endswith("/"):
                # A remote URI in a list is an item: no listing request per line.
                uri = manifests.remote_uri(entry)
                if select.keeps(_in_manifest(uri)):
                    yield uri, None
            else:
                yield from _expand([manifests.remote_uri(entry)], chain, select, stopped)


def _in_manifest(uri: str) -> str:
    """What --include/--exclude patterns match of a manifest's item: a remote item's key
    (its path in the bucket), a local item's path under the current folder (its name when
    it is elsewhere)."""
    if scheme_of(uri) != "file":
        return split_url(uri)[2] if "://" in uri else uri
    return relative(base_of("."), uri)


def read(
    uri: str,
    max_bytes: int,
    *,
    stop: threading.Event | None = None,
    confine: Confine | None = None,
) -> bytes:
    """The item's bytes. An HTTP read ends when `stop` is set (DecodeCancelled) and follows
    only the redirects that `confine` accepts; other sources have no redirects, and their
    reads are bounded by their own timeouts."""
    source = source_for(uri)
    if isinstance(source, HttpSource):
        return source.read(uri, max_bytes, stop=stop, confine=confine)
    return source.read(uri, max_bytes)


__all__ = [
    "Confine",
    "Duplicates",
    "FsspecSource",
    "HttpSource",
    "LocalSource",
    "Selection",
    "Source",
    "canonical_uri",
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
