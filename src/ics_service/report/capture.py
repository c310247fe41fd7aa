"""SageMaker Model Monitor capture records as report rows (a folder of .jsonl files, or one).

Each record holds the input image (base64) and the endpoint's class probabilities (a JSON
array); labels, top-k and status come from the configured model's card and threshold.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..engine.decide import decide
from ..models import get_card
from .rows import ReportRow, Skipped, open_text, parse_time


def capture_rows(path: Path, settings: Settings, skipped: Skipped) -> Iterator[ReportRow]:
    """The records of one .jsonl file, or of every .jsonl file under a folder, in name order."""
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    labels = get_card(settings.model).labels
    for file in files:
        with open_text(file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield _row(json.loads(line), labels, settings)
                except (KeyError, ValueError, TypeError, IndexError) as e:
                    skipped.record(f"{file}, line {n}", f"not a capture record ({e})")


def _row(record: dict[str, Any], labels: tuple[str, ...], settings: Settings) -> ReportRow:
    data = record["captureData"]
    probs = np.asarray(json.loads(data["endpointOutput"]["data"]), dtype=np.float64)
    if probs.shape != (len(labels),):
        raise ValueError(
            f"{probs.size} probabilities, the model {settings.model} has {len(labels)}"
        )
    best = decide(probs[None], threshold=settings.threshold, top_k=3, labels=labels)[0]
    image = data.get("endpointInput", {}).get("data")
    meta = record.get("eventMetadata", {})
    when = meta.get("inferenceTime")
    time = parse_time(when) if when else None
    return ReportRow(
        status=best.status.value,
        time=time,
        label=best.label,
        confidence=best.confidence,
        top_k=tuple((p.label, p.confidence) for p in best.top_k),
        uri=str(meta.get("inferenceId") or meta.get("eventId") or ""),
        fetch=(lambda: base64.b64decode(image, validate=True)) if image else None,
        threshold=settings.threshold,
    )
