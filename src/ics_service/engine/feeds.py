"""Where a watcher finds new objects: a `Feed` per source (a local folder, through
filesystem events or polling; an S3 prefix, by polling), each telling which objects are
complete (their size and time unchanged for settle_s) and new to the watch state.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .. import sources
from ..errors import EnvironmentUnavailable, UsageError
from ..imaging import IMAGE_EXTENSIONS, SNIFF_BYTES, looks_like_image
from ..sources.local import LocalSource, path_to_uri
from ..sources.remote import S3_PROTOCOLS, FsspecSource, list_objects, listed, split_url
from ..store.watched import Seen

log = logging.getLogger(__name__)

#: With filesystem events, the folder is still listed this often: a full event queue
#: (inotify overflow) or a missed event must not hide a file for ever.
RESCAN_S = 60.0
#: How often objects that are not complete yet are looked at again.
SETTLE_CHECK_S = 0.25


class Feed(Protocol):
    """Where a watcher finds new objects: one watched source."""

    spec: str

    def start(self, wake: Callable[[], None]) -> None:
        """Begin watching; `wake` may be called (from any thread) when something changed."""
        ...

    def poll(self, stop: threading.Event) -> list[Seen]:
        """Objects complete now that this feed has not returned before (what was found
        until `stop` was set, when it is)."""
        ...

    def unsettled(self) -> int:
        """How many objects were seen but are not complete yet."""
        ...

    def close(self) -> None: ...


class FolderFeed:
    """A local folder, recursively: filesystem events (watchdog), or listing it every
    `poll_s` seconds. A file is complete once two looks found the same size and mtime, and
    the mtime is `settle_s` seconds old."""

    def __init__(self, folder: str, *, settle_s: float, poll_s: float, polling: bool) -> None:
        self.spec = folder
        self.polling = polling
        self._settle_s = settle_s
        self._poll_s = poll_s
        self._observer: object | None = None
        self._lock = threading.Lock()
        self._changed: set[str] = set()
        self._scan_due = 0.0
        #: Files seen but not complete: path → the version last seen.
        self._pending: dict[str, str] = {}
        #: URI → version of every object returned (the watch state holds the same).
        self._returned: dict[str, str] = {}

    def start(self, wake: Callable[[], None]) -> None:
        if self.polling:
            return
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer

            feed = self

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event: FileSystemEvent) -> None:
                    if event.is_directory:
                        # A folder moved in brings files that sent no event of their own.
                        feed._scan_due = 0.0
                    paths = [event.src_path, getattr(event, "dest_path", "")]
                    with feed._lock:
                        feed._changed.update(os.fsdecode(p) for p in paths if p)
                    wake()

            observer = Observer()
            observer.schedule(Handler(), self.spec, recursive=True)
            observer.start()
        except Exception as e:  # inotify limits, an unsupported file system...
            log.warning(
                "cannot watch %s for filesystem events (%s): listing it every %g s instead",
                self.spec,
                e,
                self._poll_s,
            )
            self.polling = True
            return
        self._observer = observer

    def poll(self, stop: threading.Event) -> list[Seen]:
        paths = set(self._pending)
        now = time.monotonic()
        scanned: set[str] | None = None
        if now >= self._scan_due:
            scanned = set()
            for uri in LocalSource().list(self.spec):
                if stop.is_set():
                    return []
                scanned.add(sources.uri_to_path(uri))
            paths |= scanned
            self._scan_due = now + (self._poll_s if self.polling else RESCAN_S)
        with self._lock:
            changed, self._changed = self._changed, set()
        paths.update(p for p in changed if self._wanted(p))
        if scanned is not None:
            # Only what the folder holds now: a deleted file's entry would be kept for ever.
            self._returned = {
                u: v for u, v in self._returned.items() if sources.uri_to_path(u) in paths
            }
        ready = []
        for path in sorted(paths):
            seen = self._check(path)
            if seen is not None:
                ready.append(seen)
        return ready

    def unsettled(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        observer = self._observer
        if observer is not None:
            observer.stop()  # type: ignore[attr-defined]
            observer.join(5.0)  # type: ignore[attr-defined]
            self._observer = None

    def _wanted(self, path: str) -> bool:
        """What a listing of the folder would return: image files, hidden ones skipped."""
        rel = os.path.relpath(path, self.spec)
        if rel.startswith("..") or any(part.startswith(".") for part in rel.split(os.sep)):
            return False
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            return True
        try:
            with open(path, "rb") as f:
                return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and looks_like_image(
                    f.read(SNIFF_BYTES)
                )
        except OSError:
            return False

    def _check(self, path: str) -> Seen | None:
        """The file as a complete object, or None: gone, not a file, still changing, or
        returned already in this state."""
        try:
            st = os.stat(path)
        except OSError:
            self._pending.pop(path, None)
            return None
        if not stat.S_ISREG(st.st_mode):
            self._pending.pop(path, None)
            return None
        uri = path_to_uri(path)
        version = f"{st.st_size}:{st.st_mtime_ns}"
        if self._returned.get(uri) == version:
            self._pending.pop(path, None)
            return None
        # Seen twice alike, and not modified for settle_s: an old mtime alone is not
        # enough, as some writers (mmap, a copy setting the source's times first) leave
        # an old one on a file still growing.
        before = self._pending.get(path)
        quiet = time.time() - st.st_mtime >= self._settle_s
        if quiet and before == version:
            self._pending.pop(path, None)
            self._returned[uri] = version
            return Seen(uri, version)
        self._pending[path] = version
        return None


class S3Feed:
    """An S3 prefix, polled: each poll lists the whole prefix (ListObjectsV2, a page at a
    time) and returns the objects not returned before (by key and ETag) whose LastModified
    is `settle_s` old.

    The whole prefix, not the keys after a cursor: keys written later do not sort after
    earlier ones (`b.jpg` may land after `c.jpg`), so a key cursor would miss objects. The
    cursor is the watch state, which knows every key and ETag registered. A poll costs one
    request per 1,000 keys; the objects this process has not seen yet (at start: all) are
    looked up in the store, 500 a query. The key and ETag of every object of the prefix
    are held in memory (about 140 bytes each): only objects still listed are kept.

    A poll counts only when the whole listing succeeded: objects found before a failed
    page are not taken as returned, so the next poll finds them again."""

    polling = True

    def __init__(self, spec: str, *, settle_s: float, poll_s: float) -> None:
        self.spec = spec
        self._protocol, self._bucket, key = split_url(spec)
        # A prefix is watched as a folder: s3://b/photos watches photos/..., not photos2/.
        self._prefix = key if not key or key.endswith("/") else key + "/"
        self._settle_s = settle_s
        self._poll_s = poll_s
        self._due = 0.0
        self._young = 0
        self._listed_once = False
        #: URI → ETag of every object returned.
        self._returned: dict[str, str] = {}

    def start(self, wake: Callable[[], None]) -> None:
        pass

    @property
    def uri(self) -> str:
        """The prefix watched, written one way whatever way the spec wrote it."""
        return f"{self._protocol}://{self._bucket}/{self._prefix}"

    def poll(self, stop: threading.Event) -> list[Seen]:
        now = time.monotonic()
        if now < self._due:
            return []
        self._due = now + self._poll_s
        source = sources.source_for(self.spec)
        if not isinstance(source, FsspecSource) or not source.is_s3:
            raise UsageError(f"cannot watch {self.spec}: it is not on S3")
        ready: list[Seen] = []
        # What this listing finds: it replaces _returned only once it is complete.
        returned: dict[str, str] = {}
        young = 0
        wall = dt.datetime.now(dt.UTC)
        try:
            for obj in list_objects(source.fs, self._bucket, self._prefix):
                if stop.is_set():  # list_objects reads a page at a time: checked per page
                    return []
                if not listed(obj.key):
                    continue
                uri = f"{self._protocol}://{self._bucket}/{obj.key}"
                if self._returned.get(uri) == obj.etag:
                    returned[uri] = obj.etag
                    continue
                modified = obj.last_modified
                if modified is not None and (wall - modified).total_seconds() < self._settle_s:
                    young += 1
                    continue
                returned[uri] = obj.etag
                ready.append(Seen(uri, obj.etag))
        except EnvironmentUnavailable as e:
            if not self._listed_once:
                raise
            # The store was there before: wait for it to come back.
            log.warning("cannot list %s: %s; trying again in %g s", self.spec, e, self._poll_s)
            return []
        self._returned = returned
        self._listed_once = True
        self._young = young
        return ready

    def unsettled(self) -> int:
        return self._young

    def close(self) -> None:
        pass


def feed_for(spec: str, *, settle_s: float, poll_s: float, polling: bool) -> Feed:
    """The feed watching one SOURCE; a source that cannot be watched is a UsageError."""
    if sources.scheme_of(spec) in S3_PROTOCOLS:
        return S3Feed(spec, settle_s=settle_s, poll_s=poll_s)
    if sources.scheme_of(spec) != "file":
        raise UsageError(
            f"cannot watch {spec}: only local folders and S3 prefixes can be watched "
            f"({sources.scheme_of(spec)}:// sources are not supported by `ics watch`)"
        )
    path = os.path.abspath(os.path.expanduser(sources.uri_to_path(spec)))
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.lexists(path) else "is not a folder"
        raise UsageError(f"cannot watch {spec}: it {what}; name a folder to watch")
    return FolderFeed(path, settle_s=settle_s, poll_s=poll_s, polling=polling)
