"""Results files: one record per item as JSON Lines, CSV or Parquet (or JSONL on stdout)."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from ..errors import OutputError, UsageError, install_hint
from ..types import ItemResult

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet")

CSV_COLUMNS = [
    "execution_id",
    "item_id",
    "uri",
    "status",
    "label",
    "label_index",
    "confidence",
    "threshold",
    "top_k",
    "model_name",
    "model_version",
    "error_type",
    "error_message",
    "image_width",
    "image_height",
    "image_format",
    "image_sha256",
    "attempts",
    "started_at",
    "finished_at",
    "timings_ms",
    "metadata",
    # A multi-label model's labels over their thresholds (JSON); empty for a single-label one.
    "labels",
]


def flat_record(r: ItemResult) -> dict[str, Any]:
    """The result as one flat row (CSV, Parquet): nested fields as columns or JSON text."""
    d = r.to_dict()
    image = d["image"] or {}
    error = d["error"] or {}
    return {
        "execution_id": d["execution_id"],
        "item_id": d["item_id"],
        "uri": d["uri"],
        "status": d["status"],
        "label": d["label"],
        "label_index": d["label_index"],
        "confidence": d["confidence"],
        "threshold": d["threshold"],
        "top_k": json.dumps(d["top_k"]),
        "model_name": d["model"]["name"],
        "model_version": d["model"]["version"],
        "error_type": error.get("type"),
        "error_message": error.get("message"),
        "image_width": image.get("width"),
        "image_height": image.get("height"),
        "image_format": image.get("format"),
        "image_sha256": image.get("sha256"),
        "attempts": d["attempts"],
        "started_at": d["started_at"],
        "finished_at": d["finished_at"],
        "timings_ms": json.dumps(d["timings_ms"]),
        "metadata": None if d["metadata"] is None else json.dumps(d["metadata"]),
        "labels": None if d["labels"] is None else json.dumps(d["labels"]),
    }


def format_for(path: str, explicit: str | None = None) -> str:
    if explicit:
        fmt = explicit.lower()
    elif path == "-":
        fmt = "jsonl"
    else:
        suffix = Path(path).suffix.lower().lstrip(".")
        fmt = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise UsageError(
            f"cannot tell the results format of {path!r}; use a .jsonl, .csv or .parquet "
            "file name, or --output-format"
        )
    if fmt == "parquet":
        if path == "-":
            raise UsageError("Parquet results cannot go to stdout; give a .parquet file name")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError(f"writing Parquet needs pyarrow: {install_hint('parquet')}") from None
    return fmt


def check_output(path: str | None, fmt: str | None, default_dir: Path) -> None:
    """Refuse, before any work, a results path that cannot be written (UsageError).

    `None` means the default file in `default_dir`, which is created if needed.
    """
    if path is None:
        try:
            default_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"cannot create the results folder {default_dir}: {e.strerror or e}; "
                "set --home or give --output"
            ) from None
        _check_folder(default_dir)
        return
    if path == "-":
        return
    from .remote import check_object, check_writable, is_remote

    if is_remote(path):
        check_object(path)
        format_for(path, fmt)  # before the probe object is written
        check_writable(path)
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(
            f"results path {path} is a folder; give a file name, e.g. {target / 'results.jsonl'}"
        )
    format_for(path, fmt)
    if not target.parent.is_dir():
        raise UsageError(
            f"cannot write results to {path}: the folder {target.parent} does not exist; "
            "create it first"
        )
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write results to {path}: {e.strerror or e}") from None
    if not existed:
        target.unlink(missing_ok=True)


def _check_folder(folder: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"cannot write results in {folder}: {e.strerror or e}; set --home or give --output"
        ) from None


class ResultsWriter:
    """A result sink writing one file; records are flushed as batches finish."""

    def __init__(
        self, path: str, fmt: str | None = None, *, stop: threading.Event | None = None
    ) -> None:
        from .remote import is_remote, spool_path

        self.format = format_for(path, fmt)
        #: Object storage gets the file whole when it is closed; until then it is spooled.
        self.upload_to = path if is_remote(path) else None
        if self.upload_to is not None:
            path = spool_path(path)
        self.path = path
        #: Set: the upload at close makes one attempt, without waiting to retry.
        self.stop = stop
        #: Records written (to stdout: those written before its reader left).
        self.count = 0
        #: Writing to stdout, whose reader went away (`ics classify -o - | head`): what
        #: follows is dropped. The store has every result; the reader wanted no more.
        self.reader_gone = False
        self._parquet: Any = None
        self._file: IO[str] | None = None
        self._csv: Any = None
        if self.format == "parquet":
            return
        if path == "-":
            self._file = sys.stdout
        else:
            with self._writing():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(  # noqa: SIM115 (closed by close(), the sink contract)
                    path, "w", encoding="utf-8", newline=""
                )
        if self.format == "csv":
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
            with self._writing():
                self._csv.writeheader()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (disk full, I/O error) is an OutputError naming the file; stdout
        closed by its reader (EPIPE) is no error: the writer stops writing there."""
        try:
            yield
        except OSError as e:
            if self.path == "-" and e.errno == errno.EPIPE:
                self._reader_left()
                return
            raise OutputError(f"cannot write results to {self.path}: {e.strerror or e}") from None

    def _reader_left(self) -> None:
        self.reader_gone = True
        log.info("the reader of stdout left after %d results; the rest are not written", self.count)
        # What is still buffered for stdout, and Python's last flush at exit, go nowhere
        # instead of raising BrokenPipeError again (as Python's documentation advises).
        with suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)

    def write(self, results: Sequence[ItemResult]) -> None:
        if not results or self.reader_gone:
            return
        with self._writing():
            self._write(results)

    def _write(self, results: Sequence[ItemResult]) -> None:
        if self.format == "parquet":
            self._write_parquet(results)
            self.count += len(results)
            return
        assert self._file is not None
        if self._csv is not None:
            self._csv.writerows(flat_record(r) for r in results)
        else:
            buf = io.StringIO()
            for r in results:
                buf.write(json.dumps(r.to_dict(), separators=(",", ":")))
                buf.write("\n")
            self._file.write(buf.getvalue())
        self._file.flush()
        self.count += len(results)

    def _write_parquet(self, results: Sequence[ItemResult]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([flat_record(r) for r in results], schema=_parquet_schema())
        if self._parquet is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        with self._writing():
            self._close()
        if self.upload_to is not None:
            from .remote import upload

            # An upload that fails keeps the spool file.
            upload(self.path, self.upload_to, stop=self.stop)
            Path(self.path).unlink(missing_ok=True)

    def _close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        elif self.format == "parquet" and self.count == 0:
            self._write_parquet_empty()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def _write_parquet_empty(self) -> None:
        import pyarrow.parquet as pq

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_parquet_schema().empty_table(), self.path)


def _parquet_schema() -> Any:
    import pyarrow as pa

    types = {
        "label_index": pa.int64(),
        "confidence": pa.float64(),
        "threshold": pa.float64(),
        "image_width": pa.int64(),
        "image_height": pa.int64(),
        "attempts": pa.int64(),
    }
    return pa.schema([(c, types.get(c, pa.string())) for c in CSV_COLUMNS])


def rebuilt_writer(
    path: str,
    fmt: str | None,
    results: Iterable[ItemResult],
    *,
    stop: threading.Event | None = None,
) -> ResultsWriter:
    """A ResultsWriter for `path` that already holds `results` (an execution's, from the
    store, when it is resumed: a crash may have cut its file); closed again if that fails.
    `stop`: the run's stop event (see ResultsWriter.stop)."""
    writer = ResultsWriter(path, fmt, stop=stop)
    try:
        for batch in _batched(results, 1000):
            writer.write(batch)
    except BaseException:
        with suppress(Exception):
            writer.close()
        raise
    return writer


def _batched(results: Iterable[ItemResult], n: int) -> Iterator[list[ItemResult]]:
    batch: list[ItemResult] = []
    for r in results:
        batch.append(r)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
