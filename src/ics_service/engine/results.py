"""The result record of one item, built in one place for every path that classifies: the
engine's pipeline (batch executions, the watcher) and the server's requests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..policies import Decision
from ..types import ErrorInfo, ImageInfo, ItemResult, ItemStatus, ModelRef, utcnow


def item_result(
    uri: str,
    outcome: Decision | ErrorInfo,
    *,
    threshold: float,
    model: ModelRef,
    started_at: dt.datetime,
    execution_id: str = "",
    item_id: str = "",
    image: ImageInfo | None = None,
    attempts: int = 1,
    timings_ms: Mapping[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ItemResult:
    """An item's result, finished now: its decision's status, label and top k, or FAILED
    with the error. Timings are kept to the microsecond (3 decimals of a millisecond)."""
    decision = None if isinstance(outcome, ErrorInfo) else outcome
    return ItemResult(
        execution_id=execution_id,
        item_id=item_id,
        uri=uri,
        status=ItemStatus.FAILED if decision is None else decision.status,
        threshold=threshold,
        model=model,
        started_at=started_at,
        finished_at=utcnow(),
        label=None if decision is None else decision.label,
        label_index=None if decision is None else decision.index,
        confidence=None if decision is None else decision.confidence,
        top_k=[] if decision is None else decision.top_k,
        error=outcome if isinstance(outcome, ErrorInfo) else None,
        image=image,
        attempts=attempts,
        timings_ms={k: round(v, 3) for k, v in (timings_ms or {}).items()},
        metadata=metadata,
        labels=None if decision is None else decision.over,
    )
