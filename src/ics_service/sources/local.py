"""Local files: paths, folders (walked recursively, images recognised by content) and globs.

Listing streams: one walker descends folders lazily (each folder's entries sorted, files
before subfolders, hidden entries skipped) and globs are matched on top of it, so neither a
huge tree nor all of a glob's matches is ever held in memory. Only regular files are opened,
and never in a way that can block. Folder symlinks are followed, each real folder once.

Item URIs are plain absolute paths, except for a path that is not valid UTF-8 (names copied
from old Samba or FAT disks): its URI is the RFC 8089 ``file://`` URI of its raw bytes,
percent-encoded (`path_to_uri`), which `uri_to_path` turns back into the exact path.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageTooLarge, SourceNotFound, SourceUnreadable, UsageError
from ..imaging import IMAGE_EXTENSIONS, SNIFF_BYTES, looks_like_image

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
_FILE_SCHEME = "file://"
#: O_NONBLOCK: a second guard, should a checked file be swapped for a FIFO before the open.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

#: Real folders already walked, by (st_dev, st_ino), with the path they were first seen at.
_Visited = dict[tuple[int, int], str]


def path_to_uri(path: str) -> str:
    """The item URI of an absolute local path: the path itself when it is valid UTF-8;
    otherwise its RFC 8089 URI with the raw bytes percent-encoded (``file:///data/caf%E9.jpg``).

    Names that are not UTF-8 reach Python as lone surrogates, which no JSON, CSV or SQL
    writer accepts; the URI is plain ASCII and `uri_to_path` turns it back into the path.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _FILE_SCHEME + urllib.parse.quote(os.fsencode(path), safe="/")
    return path


def uri_to_path(uri: str) -> str:
    """The local path of an item URI or of a user's ``file://`` URI (percent-decoded to the
    exact bytes; undecodable bytes come back as surrogates, so ``os.fsencode`` restores them).
    Anything else is already a path and is returned as it is."""
    if not uri.startswith(_FILE_SCHEME):
        return uri
    rest = uri[len(_FILE_SCHEME) :]
    if rest.startswith("localhost/"):  # RFC 8089 names the local host explicitly
        rest = rest[len("localhost") :]
    return os.fsdecode(urllib.parse.unquote_to_bytes(rest))


class LocalSource:
    def list(self, spec: str) -> Iterator[str]:
        path = os.path.expanduser(uri_to_path(spec))
        if os.path.isdir(path):
            yield from _folder_items(os.path.abspath(path), {})
        elif _GLOB_CHARS & set(path) and not os.path.lexists(path):
            yield from _glob_items(path)
        else:
            # A named file is an item even when it is missing or not a regular file: it then
            # fails with a clear error instead of silently disappearing from the batch. It is
            # never opened here (a FIFO would block).
            yield path_to_uri(str(Path(path).absolute()))

    def read(self, uri: str, max_bytes: int) -> bytes:
        path = uri_to_path(uri)
        shown = path_to_uri(path)
        try:
            # stat first: opening a FIFO or a device could block or never end.
            _check_regular(os.stat(path), shown, max_bytes)
            fd = os.open(path, _OPEN_FLAGS)
            with os.fdopen(fd, "rb") as f:
                # Checked again on what was opened: the path may have changed since the stat.
                st = os.fstat(fd)
                _check_regular(st, shown, max_bytes)
                # The size it has, not max_bytes: a read of max_bytes + 1 allocates that
                # much first. One byte more shows a file still growing: then the rest too.
                want = st.st_size + 1
                data = f.read(want)
                if len(data) == want:
                    data += f.read(max_bytes + 1 - want)
        except FileNotFoundError:
            raise SourceNotFound(f"no such file: {shown}") from None
        except PermissionError:
            raise SourceUnreadable(f"permission denied reading {shown}") from None
        except OSError as e:
            raise SourceUnreadable(f"cannot read {shown}: {e.strerror or e}") from None
        if len(data) > max_bytes:
            raise ImageTooLarge(f"file grew over max_bytes={max_bytes:,} while being read")
        return data


def _check_regular(st: os.stat_result, shown: str, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise SourceUnreadable(f"{shown} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise SourceUnreadable(
            f"{shown} is not a regular file ({_special_kind(st.st_mode)}); "
            "copy its data into a file to classify it"
        )
    if st.st_size > max_bytes:
        raise ImageTooLarge(f"file is {st.st_size:,} bytes, over max_bytes={max_bytes:,}")


# --- the walker -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    rel: str  # relative to the walk's root, "/"-separated
    path: str  # absolute
    is_dir: bool


def _walk(
    root: str, visited: _Visited, enter: Callable[[str], bool], *, hidden: bool = False
) -> Iterator[_Entry]:
    """Regular files and folders under root, depth first: each folder's entries sorted,
    files before subfolders, hidden ones skipped unless asked for. A folder is scanned only
    when the walk reaches it and `enter(rel)` agrees, and each real folder once (symlinks
    cannot loop)."""
    if not _first_visit(root, visited):
        return
    # One iterator per open folder level: memory grows with depth, not with the tree.
    stack = [_children(root, "", hidden)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry.is_dir and enter(entry.rel) and _first_visit(entry.path, visited):
            stack.append(_children(entry.path, entry.rel, hidden))


def _children(folder: str, rel: str, hidden: bool) -> Iterator[_Entry]:
    files: list[_Entry] = []
    dirs: list[_Entry] = []
    try:
        with os.scandir(folder) as it:
            for d in it:
                if d.name.startswith(".") and not hidden:
                    continue
                kind = _kind(d)
                if kind is not None:
                    entry = _Entry(f"{rel}/{d.name}" if rel else d.name, d.path, kind == "dir")
                    (dirs if entry.is_dir else files).append(entry)
    except OSError as e:
        log.warning(
            "cannot list %s: %s; check that it can be read", path_to_uri(folder), e.strerror or e
        )
    files.sort(key=lambda entry: entry.rel)
    dirs.sort(key=lambda entry: entry.rel)
    return iter(files + dirs)


def _kind(d: os.DirEntry[str]) -> str | None:
    """What the entry is to a walk (symlinks followed): a "file", a "dir", or None for what
    it skips, with a warning."""
    try:
        # is_dir/is_file answer from the folder listing itself for entries that are not
        # symlinks (no stat per file); for a symlink they follow it.
        if d.is_dir():
            return "dir"
        if d.is_file():
            return "file"
        mode = d.stat().st_mode  # neither: a special file, or a broken symlink (raises)
    except OSError as e:
        if d.is_symlink():
            log.warning(
                "skipping %s: broken symbolic link (%s); fix or remove it",
                path_to_uri(d.path),
                e.strerror or e,
            )
        else:
            log.warning("skipping %s: %s", path_to_uri(d.path), e.strerror or e)
        return None
    log.warning(
        "skipping %s: not a regular file (%s); only regular files are classified, "
        "copy its data into one to include it",
        path_to_uri(d.path),
        _special_kind(mode),
    )
    return None


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def _first_visit(folder: str, visited: _Visited) -> bool:
    try:
        st = os.stat(folder)
    except OSError as e:
        log.warning("cannot list %s: %s", path_to_uri(folder), e.strerror or e)
        return False
    key = (st.st_dev, st.st_ino)
    first = visited.get(key)
    if first is not None:
        log.warning(
            "skipping %s: it is the folder %s, already listed (a symbolic link loop or a "
            "second link to the same folder)",
            path_to_uri(folder),
            path_to_uri(first),
        )
        return False
    visited[key] = folder
    return True


# --- folders and globs ------------------------------------------------------------------


def _folder_items(root: str, visited: _Visited) -> Iterator[str]:
    """URIs of the image files under root (by extension or content), walked lazily."""
    for e in _walk(root, visited, enter=lambda _rel: True):
        if not e.is_dir and _is_image_file(e.path):
            yield path_to_uri(e.path)


def _is_image_file(path: str) -> bool:
    # An image extension is enough (a broken photo.jpg must be reported, not skipped);
    # otherwise the content decides, so extensionless or misnamed images are found too.
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        # The walk saw a regular file; whatever is there now must still be one.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            return looks_like_image(f.read(SNIFF_BYTES))
        except OSError:
            return False


def _glob_items(pattern: str) -> Iterator[str]:
    """URIs of the files a glob matches (a matching folder lists its images), streamed."""
    root, rest = split_glob(pattern)
    matcher = GlobMatcher(rest)
    visited: _Visited = {}
    found = False
    if os.path.isdir(root):
        for e in _walk(root, visited, enter=matcher.may_contain, hidden=matcher.hidden):
            if matcher.matches(e.rel):
                found = True
                if e.is_dir:
                    yield from _folder_items(e.path, visited)
                else:
                    yield path_to_uri(e.path)
    if not found:
        log.warning("no file matches %s", path_to_uri(pattern))


def split_glob(pattern: str) -> tuple[str, list[str]]:
    """The pattern's literal leading folder (absolute) and its remaining segments."""
    segments = pattern.split("/")
    i = 0
    while i < len(segments) and not _GLOB_CHARS & set(segments[i]):
        i += 1
    head = "/".join(segments[:i]) or ("/" if pattern.startswith("/") else ".")
    return os.path.abspath(head), [s for s in segments[i:] if s]


class GlobMatcher:
    """Matches "/"-separated relative paths against glob segments: ``*``, ``?``, ``[...]``
    within a segment, and a ``**`` segment for zero or more folders (as glob.glob does with
    recursive=True). As in glob, a wildcard never matches a name's leading dot: hidden names
    match only a segment that starts with a dot."""

    def __init__(self, segments: list[str]) -> None:
        self.segments = segments
        self.recursive = "**" in segments
        #: Whether the walk must show hidden entries (only a dot segment can match them).
        self.hidden = any(s.startswith(".") for s in segments)
        # Segments before the first ** must each match a folder of the same depth: the
        # walk need not enter a folder that cannot lead to a match.
        fixed = segments[: segments.index("**")] if self.recursive else segments
        try:
            self._regex = re.compile(translate_glob(segments))
            self._fixed = [re.compile(_translate_segment(s)) for s in fixed]
        except re.error as e:
            raise UsageError(f"invalid glob pattern {'/'.join(segments)}: {e}") from None

    def matches(self, rel: str) -> bool:
        return self._regex.fullmatch(rel) is not None

    def may_contain(self, rel: str) -> bool:
        """Whether a folder at rel may hold matches below it (a matched one is listed whole)."""
        parts = rel.split("/")
        if not self.recursive and len(parts) >= len(self.segments):
            return False
        if any(r.fullmatch(p) is None for r, p in zip(self._fixed, parts, strict=False)):
            return False
        return not self.matches(rel)


def translate_glob(segments: list[str]) -> str:
    """A regex for "/"-separated relative paths from glob segments (Python 3.11 has no
    glob.translate)."""
    out = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append(_ANY_VISIBLE_PATH if last else _ANY_VISIBLE_FOLDERS)
        else:
            out.append(_translate_segment(seg) + ("" if last else "/"))
    return "".join(out)


#: What a ``**`` segment matches: zero or more folders (in the middle) or anything below
#: (at the end), none of them hidden.
_ANY_VISIBLE_FOLDERS = r"(?:(?!\.)[^/]+/)*"
_ANY_VISIBLE_PATH = r"(?!\.)[^/]*(?:/(?!\.)[^/]*)*"


def _translate_segment(seg: str) -> str:
    # A leading dot must be written out, as in glob: `*` does not match hidden names.
    out = [] if seg.startswith(".") else [r"(?!\.)"]
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        i += 1
        if c == "*":
            while i < n and seg[i] == "*":  # a** inside a segment is a single *
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := _class_end(seg, i)) is not None:
            out.append(_translate_class(seg[i:end]))
            i = end + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def _class_end(seg: str, start: int) -> int | None:
    """Index of the "]" closing a [...] class opened just before start, or None (a literal [)."""
    j = start
    if j < len(seg) and seg[j] == "!":
        j += 1
    if j < len(seg) and seg[j] == "]":  # a ] first in the class is a literal
        j += 1
    end = seg.find("]", j)
    return None if end < 0 else end


def _translate_class(body: str) -> str:
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    # Everything but the range dash is escaped, so no character changes meaning in re.
    chars = "".join(c if c == "-" else re.escape(c) for c in body)
    return f"[^/{chars}]" if negate else f"[{chars}]"
