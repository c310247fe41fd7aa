"""Results files: one record per item as JSON Lines, CSV or Parquet (or JSONL on stdout)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .errors import UsageError
from .types import ItemResult

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
    return fmt


class ResultsWriter:
    """A result sink writing one file; records are flushed as batches finish."""

    def __init__(self, path: str, fmt: str | None = None, *, append: bool = False) -> None:
        self.path = path
        self.format = format_for(path, fmt)
        self.count = 0
        self._parquet: Any = None
        self._file: IO[str] | None = None
        self._csv: Any = None
        if self.format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise UsageError(
                    "writing Parquet needs pyarrow: pip install 'ics-service[parquet]'"
                ) from None
            if append:
                raise UsageError("Parquet results cannot be appended to; use .jsonl or .csv")
            return
        if path == "-":
            self._file = sys.stdout
            needs_header = True
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            needs_header = not (append and Path(path).is_file() and Path(path).stat().st_size > 0)
            self._file = open(  # noqa: SIM115 (closed by close(), the sink contract)
                path, "a" if append else "w", encoding="utf-8", newline=""
            )
        if self.format == "csv":
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
            if needs_header:
                self._csv.writeheader()

    def write(self, results: Sequence[ItemResult]) -> None:
        if not results:
            return
        self.count += len(results)
        if self.format == "parquet":
            self._write_parquet(results)
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

    def _write_parquet(self, results: Sequence[ItemResult]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([flat_record(r) for r in results], schema=_parquet_schema())
        if self._parquet is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
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
