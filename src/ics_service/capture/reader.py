"""Reading capture files back: one `CaptureRecord` per line, streamed in time order.

A folder is read as a capture tree: every `*.jsonl` under it except hidden files (`.NAME.part`
files are still being written). Files are taken hour by hour (their `yyyy/mm/dd/hh` folders),
and the files of one hour, of any endpoint or variant, are merged by `inferenceTime`; a
line that is not a capture record is skipped with a warning naming its file and line.
"""

from __future__ import annotations

import base64
import datetime as dt
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import jsonlines
from ..errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureRecord:
    """One captured inference. The input image is decoded only when asked for."""

    event_id: str
    inference_id: str
    inference_time: dt.datetime
    #: The image's content type (endpointInput.observedContentType); None if not captured.
    content_type: str | None
    #: The class probabilities (endpointOutput); None if not captured.
    probabilities: list[float] | None
    #: The record as it is in the file.
    raw: dict[str, Any] = field(repr=False)
    path: Path = field(repr=False)
    line: int = field(repr=False)

    @property
    def input_bytes(self) -> bytes | None:
        """The original image bytes (decoded from base64 on each call), or None; BadRecord
        when the data is not base64."""
        endpoint_input = self.raw["captureData"].get("endpointInput")
        if endpoint_input is None:
            return None
        try:
            return base64.b64decode(endpoint_input["data"], validate=True)
        except ValueError as e:  # binascii.Error
            raise BadRecord(f"endpointInput.data is not base64 ({e})") from None


class BadRecord(ValueError):
    pass


def parse_record(raw: Any, path: Path, line: int) -> CaptureRecord:
    """A capture record from one decoded JSON line; BadRecord says what is wrong."""
    try:
        capture = raw["captureData"]
        meta = raw["eventMetadata"]
        when = dt.datetime.fromisoformat(meta["inferenceTime"])
        if when.tzinfo is None:
            raise BadRecord("inferenceTime has no time zone")
        endpoint_input = capture.get("endpointInput")
        endpoint_output = capture.get("endpointOutput")
        if endpoint_input is None and endpoint_output is None:
            raise BadRecord("neither endpointInput nor endpointOutput")
        if endpoint_input is not None and not isinstance(endpoint_input.get("data"), str):
            raise BadRecord("endpointInput.data is not base64 text")
        probs = None if endpoint_output is None else _probabilities(endpoint_output)
        return CaptureRecord(
            event_id=str(meta["eventId"]),
            inference_id=str(meta.get("inferenceId") or meta["eventId"]),
            inference_time=when.astimezone(dt.UTC),
            content_type=None
            if endpoint_input is None
            else str(endpoint_input["observedContentType"]),
            probabilities=probs,
            raw=raw,
            path=path,
            line=line,
        )
    except BadRecord:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadRecord(f"{type(e).__name__}: {e}") from None


def _probabilities(output: dict[str, Any]) -> list[float]:
    data, encoding = output["data"], str(output.get("encoding", "JSON")).upper()
    if encoding == "BASE64":
        data = base64.b64decode(data).decode("utf-8")
    if encoding == "CSV":
        values: Any = [float(v) for v in str(data).split(",")]
    else:
        try:
            values = jsonlines.loads(data)
        except jsonlines.BadLine as e:
            raise BadRecord(f"endpointOutput.data is {e}") from None
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise BadRecord("endpointOutput.data is not an array of finite numbers")
    return [float(v) for v in values]


def _hour_key(path: Path) -> tuple[str, ...]:
    # yyyy/mm/dd/hh of the layout; any other file sorts by its own folder and name.
    return path.parent.parts[-4:]


def capture_files(path: str | Path) -> list[Path]:
    """The complete capture files of a file or folder, in time order (hour, then name)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise UsageError(f"{path} is neither a capture file nor a folder")
    files = [
        f
        for f in p.rglob("*.jsonl")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    ]
    return sorted(files, key=lambda f: (_hour_key(f), f.name))


#: Told of a line that is not a capture record: (file, line number, why).
OnBad = Callable[[Path, int, str], None]


def _warn(path: Path, line: int, why: str) -> None:
    log.warning("%s:%d: not a capture record (%s); skipped", path, line, why)


def _read_file(path: Path, on_bad: OnBad) -> Iterator[CaptureRecord]:
    try:
        with path.open("rb") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield parse_record(jsonlines.loads(line), path, n)
                except ValueError as e:  # BadRecord, BadLine
                    on_bad(path, n, str(e))
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def iter_records(path: str | Path, *, on_bad: OnBad = _warn) -> Iterator[CaptureRecord]:
    """Every record of a capture file or folder tree, streamed in inferenceTime order; a
    line that is not a record goes to `on_bad` (by default a warning) and is skipped."""
    files = capture_files(path)
    for _, hour in itertools.groupby(files, key=_hour_key):
        yield from _merge(list(hour), on_bad)


def _first_time(path: Path) -> dt.datetime | None:
    """The time of a file's first record, from its layout name (`yyyy/mm/dd/hh/MM-SS-mmm-…`);
    None for a file named otherwise."""
    try:
        y, m, d, h = (int(p) for p in path.parent.parts[-4:])
        minute, second, ms = (int(p) for p in path.name.split("-")[:3])
        return dt.datetime(y, m, d, h, minute, second, ms * 1000, tzinfo=dt.UTC)
    except ValueError:
        return None


def _merge(files: list[Path], on_bad: OnBad) -> Iterator[CaptureRecord]:
    """The records of one hour's files in time order, opening a file only once the merge
    reaches the time of its first record (its name): an hour of thousands of files is read
    with few open at once. Files named otherwise are opened from the start."""
    waiting = sorted(
        ((t, f) for f in files if (t := _first_time(f)) is not None), key=lambda tf: tf[0]
    )
    heap: list[tuple[dt.datetime, int, CaptureRecord, Iterator[CaptureRecord]]] = []
    opened = itertools.count()

    def push(records: Iterator[CaptureRecord]) -> None:
        for record in records:
            heapq.heappush(heap, (record.inference_time, next(opened), record, records))
            return

    for f in files:
        if _first_time(f) is None:
            push(_read_file(f, on_bad))
    at = 0
    while heap or at < len(waiting):
        while at < len(waiting) and (not heap or waiting[at][0] <= heap[0][0]):
            push(_read_file(waiting[at][1], on_bad))
            at += 1
        if not heap:
            continue
        _, _, record, records = heapq.heappop(heap)
        yield record
        push(records)
