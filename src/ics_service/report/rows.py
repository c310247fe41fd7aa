"""What reports read: every SOURCE kind as one stream of small report rows.

A SOURCE is a results file (JSON Lines, CSV, Parquet), a capture folder or file
(SageMaker Model Monitor records, see capture.py) or an execution id in the store. Each
kind is one reader turning its records into `ReportRow`s; `open_rows` picks the reader.
A record that cannot be read is counted and skipped, never the end of the report.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import jsonlines
from ..config import Settings
from ..errors import ExecutionNotFound, StoreError, UsageError, install_hint
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
    #: The execution (run) the row came from, when the source says: the confidence-over-time
    #: chart joins only the points of one run.
    run: str | None = None


@dataclass
class Skipped:
    """Records of a source that could not be read: counted, logged, and left out."""

    count: int = 0

    def record(self, where: str, why: str) -> None:
        self.count += 1
        log.warning("%s: skipped, %s", where, why)


@dataclass
class RowStream:
    """The rows of one SOURCE, read lazily as `rows` is iterated."""

    description: str
    rows: Iterator[ReportRow]
    #: Rows expected, when the source knows (for the progress bar).
    total: int | None = None
    skipped: Skipped = field(default_factory=Skipped)


Reader = Callable[[Path, Settings, Skipped], Iterator[ReportRow]]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def open_rows(source: str, settings: Settings, *, threshold: float | None = None) -> RowStream:
    """The reader for SOURCE: a file or folder by its content, otherwise an execution id.

    Capture records are decided at `threshold` if given, else at their runs' (capture.py).
    """
    from functools import partial

    from .capture import capture_rows as decided

    capture_rows = partial(decided, threshold=threshold)

    path = Path(source)
    if path.is_dir():
        if not any(path.rglob("*.jsonl")):
            raise UsageError(
                f"no .jsonl capture files under {source}; give a capture folder, a results "
                "file (.jsonl, .csv, .parquet) or an execution id"
            )
        return _stream(f"capture {source}", capture_rows, path, settings)
    if path.exists():
        suffix = path.suffix.lower()
        reader: Reader | None = None
        if suffix in PARQUET_SUFFIXES:
            reader = _parquet_rows
        elif suffix == ".csv":
            reader = _csv_rows
        elif suffix in JSONL_SUFFIXES and _is_capture(path):
            return _stream(f"capture {source}", capture_rows, path, settings)
        elif suffix in JSONL_SUFFIXES:
            reader = _jsonl_rows
        if reader is None:
            raise UsageError(
                f"cannot tell what {source} holds; give a results file (.jsonl, .csv, "
                ".parquet), a capture folder or .jsonl file, or an execution id"
            )
        return _stream(f"results file {source}", reader, path, settings)
    if "/" in source or path.suffix:
        raise UsageError(
            f"SOURCE {source} does not exist; give a results file (.jsonl, .csv, .parquet), "
            "a capture folder or .jsonl file, or an execution id (`ics executions list`)"
        )
    return _execution_rows(source, settings)


def _stream(description: str, reader: Reader, path: Path, settings: Settings) -> RowStream:
    skipped = Skipped()
    return RowStream(description, reader(path, settings, skipped), skipped=skipped)


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
        run=r.execution_id,
    )


def _dict_row(d: dict[str, Any], max_bytes: int) -> ReportRow:
    """A row from a result record, nested (JSON) or flat (CSV, Parquet)."""
    status = str(d["status"])
    if status not in ("SUCCEEDED", "LOW_CONFIDENCE", "FAILED"):
        raise ValueError(f"unknown status {status!r}")
    top_k = d.get("top_k") or []
    if isinstance(top_k, str):
        top_k = jsonlines.loads(top_k)
    error = d.get("error") or {}
    confidence = d.get("confidence")
    threshold = d.get("threshold")
    finished = d.get("finished_at")
    uri = d.get("uri")
    return ReportRow(
        status=status,
        time=parse_time(finished) if finished else None,
        label=d.get("label") or None,
        confidence=None if confidence in (None, "") else _finite("confidence", confidence),
        top_k=tuple((str(p["label"]), _finite("top_k confidence", p["confidence"])) for p in top_k),
        error_type=d.get("error_type") or error.get("type") or None,
        uri=str(uri) if uri else None,
        fetch=fetcher(str(uri), max_bytes) if uri else None,
        threshold=None if threshold in (None, "") else _finite("threshold", threshold),
        run=str(d["execution_id"]) if d.get("execution_id") not in (None, "") else None,
    )


def _finite(name: str, value: Any) -> float:
    """A number that the charts can place: NaN and infinity are refused (row skipped)."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} is {v}")
    return v


def parse_time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _rows_of(
    records: Iterator[tuple[int, Any]], source: Path, settings: Settings, skipped: Skipped
) -> Iterator[ReportRow]:
    for where, record in records:
        try:
            yield _dict_row(record, settings.max_bytes)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            skipped.record(f"{source}, record {where}", f"not a result record ({e})")


def _jsonl_rows(path: Path, settings: Settings, skipped: Skipped) -> Iterator[ReportRow]:
    def records() -> Iterator[tuple[int, Any]]:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, jsonlines.loads(line)
                except jsonlines.BadLine as e:
                    skipped.record(f"{path}, line {n}", str(e))

    return _rows_of(records(), path, settings, skipped)


def _csv_rows(path: Path, settings: Settings, skipped: Skipped) -> Iterator[ReportRow]:
    def records() -> Iterator[tuple[int, Any]]:
        with open_text(path) as f:
            yield from enumerate(csv.DictReader(f), 2)

    return _rows_of(records(), path, settings, skipped)


def _parquet_rows(path: Path, settings: Settings, skipped: Skipped) -> Iterator[ReportRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"reading {path} needs pyarrow: {install_hint('parquet')}") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own kinds for a file that is not Parquet
        raise UsageError(f"cannot read {path} as Parquet: {e}") from None

    def records() -> Iterator[tuple[int, Any]]:
        n = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                n += 1
                yield n, record

    return _rows_of(records(), path, settings, skipped)


@contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """A text file opened for reading; failing to open it is a UsageError naming it."""
    try:
        f = open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        yield f


def _is_capture(path: Path) -> bool:
    """Whether a .jsonl file holds capture records: its first record has captureData."""
    with open_text(path) as f:
        for line in f:
            if line.strip():
                return '"captureData"' in line
    return False


def source_hint(source: str) -> str:
    return f"SOURCE {source} is no file or folder, so it was taken for an execution id"


def _execution_rows(execution_id: str, settings: Settings) -> RowStream:
    from ..store import Store

    try:
        store = Store(settings.store_url, create=False)
    except StoreError as e:
        raise StoreError(f"{source_hint(execution_id)}; {e}") from None
    try:
        execution = store.get_execution(execution_id)
    except ExecutionNotFound as e:
        store.close()
        raise ExecutionNotFound(f"{source_hint(execution_id)}; {e}") from None
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
