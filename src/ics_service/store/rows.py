"""Rows of the store's tables as the domain's records: Execution, ItemResult, Event."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import RowMapping

from ..types import (
    Counts,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    ItemResult,
    isoformat,
    utcnow,
)


@dataclass(frozen=True)
class Event:
    """One entry of an execution's history."""

    id: int
    execution_id: str
    ts: dt.datetime
    type: str
    item_seq: int | None
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "timestamp": isoformat(self.ts),
            "type": self.type,
            "item_id": None if self.item_seq is None else str(self.item_seq),
            "details": self.details,
        }


def utc(ts: dt.datetime | None) -> dt.datetime | None:
    """A timestamp as aware UTC (SQLite returns the stored UTC time without a zone)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


def execution_from_row(m: RowMapping) -> Execution:
    error = None
    if m["error_type"]:
        error = ErrorInfo(type=m["error_type"], message=m["error_message"] or "")
    return Execution(
        id=m["id"],
        name=m["name"],
        status=ExecutionStatus(m["status"]),
        params=json.loads(m["params"]),
        counts=Counts(
            total=m["total"],
            succeeded=m["succeeded"],
            low_confidence=m["low_confidence"],
            failed=m["failed"],
        ),
        started_at=utc(m["started_at"]) or utcnow(),
        finished_at=utc(m["finished_at"]),
        error=error,
        owner=m["owner"],
        heartbeat_at=utc(m["heartbeat_at"]),
        cancel_requested=bool(m["cancel_requested"]),
        items_listed=bool(m["items_listed"]),
    )


def result_from_row(m: RowMapping) -> ItemResult:
    return ItemResult.from_dict(json.loads(m["result"]))


def result_to_row(r: ItemResult) -> dict[str, Any]:
    """The columns record_results writes for one result (bound as r_<column>)."""
    return {
        "r_seq": int(r.item_id),
        "r_status": r.status.value,
        "r_attempts": r.attempts,
        "r_result": json.dumps(r.to_dict(), separators=(",", ":")),
        "r_finished_at": utc(r.finished_at),
        # The column's width: PostgreSQL refuses longer strings (no real type is that long).
        "r_error_type": None if r.error is None else r.error.type[:128],
        "r_label": None if r.label is None else r.label[:255],
        "r_confidence": r.confidence,
    }


def event_from_row(m: RowMapping) -> Event:
    return Event(
        id=m["id"],
        execution_id=m["execution_id"],
        ts=utc(m["ts"]) or utcnow(),
        type=m["type"],
        item_seq=m["item_seq"],
        details=json.loads(m["details"]) if m["details"] else {},
    )


def event_to_row(
    execution_id: str, etype: str, seq: int | None, details: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "ts": utcnow(),
        "type": etype,
        "item_seq": seq,
        "details": None if details is None else json.dumps(details, default=str),
    }
