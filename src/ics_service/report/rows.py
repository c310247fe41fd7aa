"""What reports read: every SOURCE kind as one stream of small report rows.

A SOURCE is a results file (JSON Lines, CSV, Parquet), a capture folder or file
(SageMaker Model Monitor records, see capture.py) or an execution id in the store. Each
kind is one reader turning its records into `ReportRow`s; `open_rows` picks the reader.
A record that cannot be read is counted and skipped, never the end of the report.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..config import Settings
from ..errors import UsageError
from ..types import ItemResult

log = logging.getLogger(__name__)

#: Fetches a row's image bytes when (and only if) a chart needs them.
Fetch = Callable[[], bytes]


@dataclass(frozen=True, slots=True)
class ReportRow:
    status: str
    time: dt.datetime | None = None
    label: str | None = None
    confidence: float | None = None
    #: (label, confidence), best first.
    top_k: tuple[tuple[str, float], ...] = ()
    error_type: str | None = None
    uri: str | None = None
    fetch: Fetch | None = None
    #: The threshold the row was decided with, when the source records it.
    threshold: float | None = None


@dataclass
class RowStream:
    """The rows of one SOURCE, read lazily; `skipped` counts records that could not be read."""

    description: str
    rows: Iterator[ReportRow]
    #: Rows expected, when the source knows (for the progress bar).
    total: int | None = None
    skipped: list[int] = field(default_factory=lambda: [0])


RESULTS_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
PARQUET_SUFFIXES = (".parquet", ".pq")


def open_rows(source: str, settings: Settings) -> RowStream:
    """The reader for SOURCE: a file or folder by its content, otherwise an execution id."""
    path = Path(source)
    if path.is_dir():
        from .capture import capture_rows

        return capture_rows(path, settings)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            return _stream(f"results file {source}", _parquet_rows(path, settings))
        if suffix == ".csv":
            return _stream(f"results file {source}", _csv_rows(path, settings))
        if suffix in RESULTS_SUFFIXES:
            if _is_capture(path):
                from .capture import capture_rows

                return capture_rows(path, settings)
            return _stream(f"results file {source}", _jsonl_rows(path, settings))
        raise UsageError(
            f"cannot tell what {source} holds; give a results file (.jsonl, .csv, .parquet), "
            "a capture folder or .jsonl file, or an execution id"
        )
    if "/" in source or path.suffix:
        raise UsageError(
            f"SOURCE {source} does not exist; give a results file (.jsonl, .csv, .parquet), "
            "a capture folder or .jsonl file, or an execution id (`ics executions list`)"
        )
    return _execution_rows(source, settings)


def _stream(description: str, rows: Callable[[list[int]], Iterator[ReportRow]]) -> RowStream:
    skipped = [0]
    return RowStream(description, rows(skipped), skipped=skipped)


def fetcher(uri: str, max_bytes: int) -> Fetch:
    """Reads the image of a result through the sources (local files, registered schemes)."""

    def fetch() -> bytes:
        from .. import sources

        return sources.read(uri, max_bytes)

    return fetch


def result_row(r: ItemResult, max_bytes: int) -> ReportRow:
    return ReportRow(
        status=r.status.value,
        time=r.finished_at,
        label=r.label,
        confidence=r.confidence,
        top_k=tuple((p.label, p.confidence) for p in r.top_k),
        error_type=r.error.type if r.error else None,
        uri=r.uri,
        fetch=fetcher(r.uri, max_bytes),
        threshold=r.threshold,
    )


def _dict_row(d: dict[str, Any], max_bytes: int) -> ReportRow:
    """A row from a result record, nested (JSON) or flat (CSV, Parquet)."""
    status = str(d["status"])
    if status not in ("SUCCEEDED", "LOW_CONFIDENCE", "FAILED"):
        raise ValueError(f"unknown status {status!r}")
    top_k = d.get("top_k") or []
    if isinstance(top_k, str):
        top_k = json.loads(top_k)
    error = d.get("error") or {}
    confidence = d.get("confidence")
    threshold = d.get("threshold")
    finished = d.get("finished_at")
    uri = d.get("uri")
    return ReportRow(
        status=status,
        time=_time(finished) if finished else None,
        label=d.get("label") or None,
        confidence=None if confidence in (None, "") else float(confidence),
        top_k=tuple((str(p["label"]), float(p["confidence"])) for p in top_k),
        error_type=d.get("error_type") or error.get("type") or None,
        uri=str(uri) if uri else None,
        fetch=fetcher(str(uri), max_bytes) if uri else None,
        threshold=None if threshold in (None, "") else float(threshold),
    )


def _time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _rows_of(
    records: Iterator[tuple[int, Any]], source: Path, settings: Settings, skipped: list[int]
) -> Iterator[ReportRow]:
    for where, record in records:
        try:
            yield _dict_row(record, settings.max_bytes)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            skipped[0] += 1
            log.warning("%s, record %d: skipped, not a result record (%s)", source, where, e)


def _jsonl_rows(path: Path, settings: Settings) -> Callable[[list[int]], Iterator[ReportRow]]:
    def records(skipped: list[int]) -> Iterator[tuple[int, Any]]:
        with _opened(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    skipped[0] += 1
                    log.warning("%s, line %d: skipped, not JSON (%s)", path, n, e)

    return lambda skipped: _rows_of(records(skipped), path, settings, skipped)


def _csv_rows(path: Path, settings: Settings) -> Callable[[list[int]], Iterator[ReportRow]]:
    def records() -> Iterator[tuple[int, Any]]:
        with _opened(path) as f:
            yield from enumerate(csv.DictReader(f), 2)

    return lambda skipped: _rows_of(records(), path, settings, skipped)


def _parquet_rows(path: Path, settings: Settings) -> Callable[[list[int]], Iterator[ReportRow]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            f"reading {path} needs pyarrow: pip install 'ics-service[parquet]'"
        ) from None

    def records() -> Iterator[tuple[int, Any]]:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own kinds for a file that is not Parquet
            raise UsageError(f"cannot read {path} as Parquet: {e}") from None
        n = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                n += 1
                yield n, record

    return lambda skipped: _rows_of(records(), path, settings, skipped)


@contextmanager
def _opened(path: Path) -> Iterator[TextIO]:
    """A text file opened for reading; failing to open it is a UsageError naming it."""
    try:
        f = open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        yield f


def _is_capture(path: Path) -> bool:
    """Whether a .jsonl file holds capture records: its first record has captureData."""
    with _opened(path) as f:
        for line in f:
            if line.strip():
                return '"captureData"' in line
    return False


def _execution_rows(execution_id: str, settings: Settings) -> RowStream:
    from ..store import Store

    store = Store(settings.store_url, create=False)
    try:
        execution = store.get_execution(execution_id)
    except BaseException:
        store.close()
        raise

    def rows() -> Iterator[ReportRow]:
        try:
            for r in store.results(execution.id):
                yield result_row(r, settings.max_bytes)
        finally:
            store.close()

    return RowStream(f"execution {execution.id}", rows(), total=execution.counts.done)
