"""The capture writer: records to hourly JSON Lines files, on a thread of its own.

Layout: `{DEST}/{endpoint}/{variant}/yyyy/mm/dd/hh/MM-SS-mmm-WRITER-UUID.jsonl`, the hour
folder and the name (minute, second, millisecond of the file's first record) in UTC, so that
names sort by time; WRITER is the process's replica id (`replica_id`, else its host name and
process id), so that the replicas of `ics serve` sharing one capture destination each write
files of their own (the random UUID alone already keeps two writers apart). A file is
written as a hidden `.NAME.part` next to its final place and renamed into place once
complete (at the hour's end, at `max_file_bytes`, after `max_file_seconds` or when the
writer closes): a reader of `*.jsonl` never sees a half line. A crash loses the hidden file
being written (at most `max_file_seconds` or `max_file_bytes` of records) and
the records still queued (at most `max_pending_bytes`); the hidden file stays behind, never
renamed, and is not cleaned up (another writer may be writing its own beside it). A failed
write (a full disk) is cut off the file again, which is then published with its complete
records only.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import hashlib
import io
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings, owner_of
from ..errors import UsageError
from ..types import Captured
from .record import Mode, capture_record, encode, is_sampled

log = logging.getLogger(__name__)

#: Defaults of the rotation and of the queue (bytes of images and probabilities waiting).
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_FILE_SECONDS = 60.0
MAX_PENDING_BYTES = 64 * 1024 * 1024


@dataclass
class _Entry:
    inference_id: str
    when: dt.datetime
    captured: Captured
    size: int


def _size(captured: Captured) -> int:
    """The bytes an item holds while it waits: its image and its probabilities."""
    return len(captured.data) + 8 * len(captured.probs)


@dataclass
class _OpenFile:
    hour: str
    part: Path
    final: Path
    #: Unbuffered: what the file holds is exactly what the writes returned.
    f: io.FileIO
    opened: float
    #: Bytes of complete lines.
    size: int = 0
    #: A failed write left a cut line that could not be cut off: never published.
    broken: bool = False


def hour_folder(when: dt.datetime) -> str:
    """The `yyyy/mm/dd/hh` folder (UTC) of a file whose first record is at `when`."""
    return when.astimezone(dt.UTC).strftime("%Y/%m/%d/%H")


def file_name(when: dt.datetime, writer: str | None = None) -> str:
    """A new file's name: its first record's minute, second and millisecond (UTC), so that
    names sort by time, the writer's name if given, and a random part, so that writers
    never share one."""
    when = when.astimezone(dt.UTC)
    named = "" if writer is None else f"{writer}-"
    return f"{when:%M-%S}-{when.microsecond // 1000:03d}-{named}{uuid.uuid4().hex}.jsonl"


def writer_name(settings: Settings) -> str:
    """The name of this process in its capture files' names: its replica id, else its host
    name and process id, with anything but letters, digits, `.`, `_` and `-` as `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", owner_of(settings))[:64]


def part_of(final: Path) -> Path:
    """The hidden file that `final` is written as, until it is renamed into place complete."""
    return final.with_name(f".{final.name}.part")


def is_remote_capture(settings: Settings) -> bool:
    return settings.capture is not None and "://" in settings.capture


def capture_url(settings: Settings) -> str | None:
    """The s3:// endpoint and variant prefix that files are uploaded to; None when local."""
    if not is_remote_capture(settings):
        return None
    assert settings.capture is not None
    base = settings.capture.rstrip("/")
    return f"{base}/{settings.capture_endpoint}/{settings.capture_variant}"


def capture_root(settings: Settings) -> Path:
    """The local endpoint and variant folder that the settings capture to: for a capture to
    S3, a spool folder under the home that holds each file until it is uploaded."""
    assert settings.capture is not None
    if is_remote_capture(settings):
        digest = hashlib.sha256(settings.capture.encode("utf-8")).hexdigest()[:16]
        base = settings.home / "capture-spool" / digest
    else:
        base = Path(settings.capture).expanduser()
    return base / settings.capture_endpoint / settings.capture_variant


def check_capture_folder(settings: Settings) -> None:
    """Refuse (a usage error, before any work) a capture folder that cannot be written."""
    if settings.capture is None:
        return
    url = capture_url(settings)
    if url is not None:
        _check_bucket(settings, url)
    root = capture_root(settings)
    probe = root / f".ics-probe-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"capture folder {settings.capture} cannot be written ({e.strerror or e}"
            f"{': ' + str(e.filename) if e.filename else ''}); choose another --capture"
        ) from None


def _check_bucket(settings: Settings, url: str) -> None:
    """Refuse a capture bucket that cannot be written: a probe object is put and deleted."""
    from .. import sources
    from ..sources import storage

    sources.configure(settings)
    failed = f"cannot capture to {settings.capture}"
    storage.check_writable(f"{url}/.ics-probe-", "capture files", failed)


def open_capture(settings: Settings, stop: threading.Event | None = None) -> CaptureWriter | None:
    """The settings' capture writer, or None when capture is off; `stop`: the run's stop
    event (see CaptureWriter.stop)."""
    if settings.capture is None:
        return None
    return CaptureWriter(
        capture_root(settings),
        mode=settings.capture_mode,
        sampling=settings.capture_sampling,
        max_pending_bytes=int(settings.capture_queue_mb * 1024 * 1024),
        upload_to=capture_url(settings),
        stop=stop,
        writer=writer_name(settings),
    )


class CaptureWriter:
    """Turns captured items into records and writes them, off the caller's thread.

    `submit` (or `reserve`) blocks while more than `max_pending_bytes` of images wait
    (backpressure on the caller) rather than letting the queue grow. A write error (a full
    disk) is kept in `error`; later items are dropped, and the caller decides what it means.
    """

    def __init__(
        self,
        root: Path,
        *,
        mode: Mode = "input_and_output",
        sampling: float = 100.0,
        max_file_bytes: int = MAX_FILE_BYTES,
        max_file_seconds: float = MAX_FILE_SECONDS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        upload_to: str | None = None,
        stop: threading.Event | None = None,
        writer: str | None = None,
    ) -> None:
        self.root = root
        #: Part of each file's name: the process writing it (see `writer_name`).
        self.writer = writer
        #: Set (the run is stopping): each upload makes one attempt, without waiting to
        #: retry; a file that fails stays in root.
        self.stop = stop
        #: s3://... that each complete file is uploaded to (the same relative key), then
        #: deleted here; None: the files stay in root.
        self.upload_to = upload_to
        self.mode: Mode = mode
        self.sampling = sampling
        self.max_file_bytes = max_file_bytes
        self.max_file_seconds = max_file_seconds
        self.max_pending_bytes = max_pending_bytes
        self.error: Exception | None = None
        self.written = 0
        #: The most bytes that ever waited in the queue (the backpressure's bound, observed).
        self.high_water = 0
        self._q: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0
        self._closed = False
        self._file: _OpenFile | None = None
        # Started by the first item, so that a writer opened by a run that fails before it
        # classifies anything (and may never be closed) leaves no thread behind.
        self._thread = threading.Thread(target=self._loop, name="ics-capture", daemon=True)

    def wants(self, inference_id: str) -> bool:
        """Whether this item is in the sample."""
        return is_sampled(inference_id, self.sampling)

    def reserve(self, captured: Captured, stop: threading.Event | None = None) -> bool:
        """Wait until the item fits in the queue's budget and take its room; False, and
        nothing taken, when `stop` is set or the writer failed or closed first."""
        return self.reserve_all([captured], stop)

    def reserve_all(
        self, captured: Sequence[Captured], stop: threading.Event | None = None
    ) -> bool:
        """`reserve` for several items at once: all their room, or none.

        A batch run reserves on its inference thread, once a batch is classified, so that
        the images on their way to the writer (through the recorder) count too. Each item
        is then submitted with `reserved=True`, which frees its own share once written.
        """
        size = sum(_size(c) for c in captured)
        with self._cond:
            # Room always fits when none is taken, however big, so nothing waits for ever.
            while self._pending and self._pending + size > self.max_pending_bytes:
                if self._closed or self.error is not None or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(0.1)
            if self._closed or self.error is not None:
                return False
            self._pending += size
            self.high_water = max(self.high_water, self._pending)
            if self._thread.ident is None:
                self._thread.start()
        return True

    def submit(
        self, inference_id: str, when: dt.datetime, captured: Captured, *, reserved: bool = False
    ) -> None:
        """Queue one item's record: waits while the queue is full, unless `reserve` already
        took its room. Dropped once the writer has failed (see `error`)."""
        if not reserved and not self.reserve(captured):
            return
        self._q.put(_Entry(inference_id, when, captured, _size(captured)))

    def close(self) -> None:
        """Write what is queued, publish the open file and stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            started = self._thread.ident is not None
        if started:
            self._q.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                entry = self._q.get(timeout=self._until_rotation())
            except queue.Empty:
                self._guard(self._rotate_if_old)
                continue
            if entry is None:
                break
            try:
                if self.error is None:
                    self._guard(functools.partial(self._write, entry))
            finally:
                with self._cond:
                    self._pending -= entry.size
                    self._cond.notify_all()
        self._guard(self._publish)

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as e:  # the thread must live on: callers wait for its progress
            if self.error is None:
                if isinstance(e, OSError):
                    log.error("data capture to %s stopped: %s", self.root, e)
                else:
                    log.exception("data capture to %s stopped", self.root)
            self.error = e
            with self._cond:
                self._cond.notify_all()

    def _until_rotation(self) -> float | None:
        if self._file is None:
            return None
        return max(0.01, self._file.opened + self.max_file_seconds - time.monotonic())

    def _write(self, entry: _Entry) -> None:
        c = entry.captured
        record = capture_record(
            inference_id=entry.inference_id,
            inference_time=entry.when,
            mode=self.mode,
            data=c.data,
            content_type=c.content_type,
            probs=c.probs.tolist() if hasattr(c.probs, "tolist") else list(c.probs),
        )
        line = encode(record)
        when = entry.when.astimezone(dt.UTC)
        hour = hour_folder(when)
        f = self._file
        if f is not None and (
            f.hour != hour or (f.size and f.size + len(line) > self.max_file_bytes)
        ):
            self._publish()
            f = None
        if f is None:
            f = self._file = self._open(hour, when)
        try:
            _write_all(f.f, line)
        except BaseException:
            self._cut(f)
            raise
        f.size += len(line)
        self.written += 1
        self._rotate_if_old()

    def _open(self, hour: str, when: dt.datetime) -> _OpenFile:
        folder = self.root / hour
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / file_name(when, self.writer)
        part = part_of(final)
        return _OpenFile(hour, part, final, part.open("xb", buffering=0), time.monotonic())

    def _cut(self, f: _OpenFile) -> None:
        """After a failed write (a full disk), take the cut line off the file again, so
        that what is published holds complete records only."""
        try:
            os.ftruncate(f.f.fileno(), f.size)
        except OSError as e:
            f.broken = True
            log.error("data capture: %s ends with a cut line (%s); it is left hidden", f.part, e)

    def _rotate_if_old(self) -> None:
        f = self._file
        if f is not None and time.monotonic() - f.opened >= self.max_file_seconds:
            self._publish()

    def _publish(self) -> None:
        """Close the open file and rename it into place, complete."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if not f.broken:
                os.fsync(f.f.fileno())
        finally:
            f.f.close()
        if f.broken:
            return
        if f.size == 0:  # its first line failed: nothing to publish
            f.part.unlink(missing_ok=True)
            return
        os.replace(f.part, f.final)
        if self.upload_to is not None:
            self._upload(f.final)

    def _upload(self, local: Path) -> None:
        """Put a complete file at the same key under upload_to, retrying transient errors;
        keep it here if that fails."""
        from ..sources import storage

        assert self.upload_to is not None
        url = f"{self.upload_to}/{local.relative_to(self.root).as_posix()}"
        try:
            storage.upload(str(local), url, "capture files", stop=self.stop)
        except Exception as e:
            log.error(
                "data capture: %s could not be uploaded to %s (%s); it stays there",
                local,
                url,
                str(e).strip() or type(e).__name__,
            )
            return
        local.unlink(missing_ok=True)


def _write_all(f: io.FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, f"wrote nothing to {f.name}")
        view = view[n:]
