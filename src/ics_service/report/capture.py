"""SageMaker Model Monitor capture records (a capture folder, or one .jsonl file) as report
rows, read with the capture package's reader.

Each record holds the input image and the endpoint's class probabilities; labels and top-k
come from the configured model's card. Records name no threshold: each is decided at the
one its run recorded, found in the execution store by the record's inferenceId
(EXECUTION_ID/ITEM_ID), unless a threshold is given; the threshold setting when the store
does not know the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..capture.reader import CaptureRecord, iter_records
from ..config import Settings
from ..errors import ExecutionNotFound, StoreError, UsageError
from ..modelcard import ModelCard
from ..models import get_card
from ..policies import decide
from .rows import Fetch, ReportRow, Skipped

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)


def capture_rows(
    path: Path, settings: Settings, skipped: Skipped, threshold: float | None = None
) -> Iterator[ReportRow]:
    """The records of a capture file or folder tree, in inferenceTime order, decided at
    `threshold` if given, else at the threshold each record's run recorded."""
    card = get_card(settings.model, settings)
    recorded = RecordedThresholds(settings)
    try:
        yield from _rows(path, settings, skipped, card, threshold, recorded)
    finally:
        recorded.close()


def _rows(
    path: Path,
    settings: Settings,
    skipped: Skipped,
    card: ModelCard,
    threshold: float | None,
    recorded: RecordedThresholds,
) -> Iterator[ReportRow]:
    labels = card.labels

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
        line = threshold if threshold is not None else recorded.of(record.inference_id)
        line = settings.threshold if line is None else line
        best = decide(
            probs[None],
            threshold=line,
            top_k=3,
            labels=labels,
            label_thresholds=card.decision_thresholds(line),
        )[0]
        yield ReportRow(
            status=best.status.value,
            time=record.inference_time,
            label=best.label,
            confidence=best.confidence,
            top_k=tuple((p.label, p.confidence) for p in best.top_k),
            uri=record.inference_id,
            fetch=_image_of(record) if record.content_type else None,
            threshold=line,
            run=record.inference_id.rpartition("/")[0] or None,
        )


def _image_of(record: CaptureRecord) -> Fetch:
    return lambda: record.input_bytes or b""


class RecordedThresholds:
    """The threshold each captured inference was decided at, from the execution store: its
    execution's (a batch records one), or its own result's (a real-time execution's requests
    may each give one). None when the store or the run is not there."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: Store | None = None
        self._opened = False
        #: Execution id → its threshold, or None: decided per item (real-time) or unknown.
        self._executions: dict[str, tuple[bool, float | None]] = {}

    def of(self, inference_id: str) -> float | None:
        execution_id, _, item_id = inference_id.rpartition("/")
        store = self._open()
        if store is None or not execution_id:
            return None
        known = self._executions.get(execution_id)
        if known is None:
            known = self._executions[execution_id] = self._execution(store, execution_id)
        per_item, threshold = known
        if not per_item or not item_id.isdigit():
            return threshold
        for result in store.results(execution_id, after_seq=int(item_id) - 1, limit=1):
            if result.item_id == item_id:
                return result.threshold
        return None

    def _execution(self, store: Store, execution_id: str) -> tuple[bool, float | None]:
        try:
            execution = store.get_execution(execution_id)
        except (ExecutionNotFound, UsageError):
            return False, None
        if execution.id != execution_id:  # a name or the start of an id: not this run
            return False, None
        recorded: Any = execution.params.get("threshold")
        if isinstance(recorded, int | float) and not isinstance(recorded, bool):
            return False, float(recorded)
        return True, None

    def _open(self) -> Store | None:
        if not self._opened:
            self._opened = True
            from ..store import Store

            try:
                self._store = Store(self._settings.store_url, create=False)
            except StoreError as e:
                log.info("no execution store to find the runs' thresholds in: %s", e)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
