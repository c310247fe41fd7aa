"""SageMaker Model Monitor capture records (a capture folder, or one .jsonl file) as report
rows, read with the capture package's reader.

Each record holds the input image and the endpoint's class probabilities; labels, top-k and
status come from the configured model's card and threshold (records name neither).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..capture.reader import CaptureRecord, iter_records
from ..config import Settings
from ..models import get_card
from ..policies import decide
from .rows import Fetch, ReportRow, Skipped


def capture_rows(path: Path, settings: Settings, skipped: Skipped) -> Iterator[ReportRow]:
    """The records of a capture file or folder tree, in inferenceTime order."""
    labels = get_card(settings.model).labels

    def bad(file: Path, line: int, why: str) -> None:
        skipped.record(f"{file}, line {line}", f"not a capture record ({why})")

    for record in iter_records(path, on_bad=bad):
        where = f"{record.path}, line {record.line}"
        if record.probabilities is None:
            skipped.record(where, "no endpointOutput (captured with --capture-mode input)")
            continue
        probs = np.asarray(record.probabilities, dtype=np.float64)
        if probs.shape != (len(labels),):
            skipped.record(
                where, f"{probs.size} probabilities, the model {settings.model} has {len(labels)}"
            )
            continue
        best = decide(probs[None], threshold=settings.threshold, top_k=3, labels=labels)[0]
        yield ReportRow(
            status=best.status.value,
            time=record.inference_time,
            label=best.label,
            confidence=best.confidence,
            top_k=tuple((p.label, p.confidence) for p in best.top_k),
            uri=record.inference_id,
            fetch=_image_of(record) if record.content_type else None,
            threshold=settings.threshold,
        )


def _image_of(record: CaptureRecord) -> Fetch:
    return lambda: record.input_bytes or b""
