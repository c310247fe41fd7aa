"""The domain records: items, predictions, results, executions and their statuses."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Step(StrEnum):
    """The workflow's states, named as in the original Step Functions definition."""

    SERIALIZE_IMAGE_DATA = "SerializeImageData"
    CLASSIFY_IMAGE = "ClassifyImage"
    FILTER_LOW_CONFIDENCE = "FilterLowConfidence"
    NOTIFY = "Notify"


class ItemStatus(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    LOW_CONFIDENCE = "LOW_CONFIDENCE"
    FAILED = "FAILED"


class ExecutionStatus(StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"

    @property
    def finished(self) -> bool:
        return self is not ExecutionStatus.RUNNING


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def isoformat(ts: dt.datetime | None) -> str | None:
    return None if ts is None else ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Item:
    """One unit of work of an execution: where the image is, and its place in the execution."""

    seq: int
    uri: str
    #: Fields of the item's manifest row besides its URI (CSV columns, JSON fields).
    metadata: dict[str, Any] | None = None

    @property
    def item_id(self) -> str:
        return str(self.seq)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str
    message: str


@dataclass(frozen=True, slots=True)
class ImageInfo:
    width: int
    height: int
    format: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    index: int
    confidence: float


@dataclass(frozen=True, slots=True)
class LabelScore:
    """A label of a multi-label model that reached its own threshold."""

    label: str
    index: int
    confidence: float
    threshold: float


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Captured:
    """What data capture needs of a classified item: its original bytes, their content type
    and the class probabilities (C,) it was decided from. Only sampled items carry it."""

    data: bytes
    content_type: str
    probs: Any


@dataclass(slots=True)
class ItemResult:
    """The recorded outcome of one item (the result record of the outside contract)."""

    execution_id: str
    item_id: str
    uri: str
    status: ItemStatus
    threshold: float
    model: ModelRef
    started_at: dt.datetime
    finished_at: dt.datetime
    label: str | None = None
    label_index: int | None = None
    confidence: float | None = None
    top_k: list[Prediction] = field(default_factory=list)
    error: ErrorInfo | None = None
    image: ImageInfo | None = None
    attempts: int = 1
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: The item's manifest fields besides its URI (None when it was not from a manifest).
    metadata: dict[str, Any] | None = None
    #: A multi-label model's every label at or over its own threshold, most confident
    #: first (empty: none reached its threshold); None for a single-label model and for a
    #: FAILED item.
    labels: list[LabelScore] | None = None
    #: For data capture only (never serialised): set when capture is on and the item sampled.
    captured: Captured | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "item_id": self.item_id,
            "uri": self.uri,
            "status": self.status.value,
            "label": self.label,
            "label_index": self.label_index,
            "confidence": self.confidence,
            "top_k": [asdict(p) for p in self.top_k],
            "threshold": self.threshold,
            "model": asdict(self.model),
            "error": None if self.error is None else asdict(self.error),
            "image": None if self.image is None else asdict(self.image),
            "attempts": self.attempts,
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "timings_ms": self.timings_ms,
            "metadata": self.metadata,
            "labels": None if self.labels is None else [asdict(x) for x in self.labels],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemResult:
        return cls(
            execution_id=d["execution_id"],
            item_id=d["item_id"],
            uri=d["uri"],
            status=ItemStatus(d["status"]),
            label=d.get("label"),
            label_index=d.get("label_index"),
            confidence=d.get("confidence"),
            top_k=[Prediction(**p) for p in d.get("top_k") or []],
            threshold=d["threshold"],
            model=ModelRef(**d["model"]),
            error=ErrorInfo(**d["error"]) if d.get("error") else None,
            image=ImageInfo(**d["image"]) if d.get("image") else None,
            attempts=d.get("attempts", 1),
            started_at=dt.datetime.fromisoformat(d["started_at"]),
            finished_at=dt.datetime.fromisoformat(d["finished_at"]),
            timings_ms=d.get("timings_ms") or {},
            metadata=d.get("metadata"),
            labels=None if d.get("labels") is None else [LabelScore(**x) for x in d["labels"]],
        )


@dataclass(slots=True)
class Counts:
    total: int = 0
    succeeded: int = 0
    low_confidence: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.succeeded + self.low_confidence + self.failed

    def add(self, status: ItemStatus, n: int = 1) -> None:
        if status is ItemStatus.SUCCEEDED:
            self.succeeded += n
        elif status is ItemStatus.LOW_CONFIDENCE:
            self.low_confidence += n
        else:
            self.failed += n

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "SUCCEEDED": self.succeeded,
            "LOW_CONFIDENCE": self.low_confidence,
            "FAILED": self.failed,
        }


@dataclass(slots=True)
class Execution:
    id: str
    name: str | None
    status: ExecutionStatus
    params: dict[str, Any]
    counts: Counts
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    error: ErrorInfo | None = None
    #: "host:pid" of the process running it, and when that process last reported.
    owner: str | None = None
    heartbeat_at: dt.datetime | None = None
    cancel_requested: bool = False
    items_listed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.id,
            "name": self.name,
            "status": self.status.value,
            "counts": self.counts.to_dict(),
            "params": self.params,
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "error": None if self.error is None else asdict(self.error),
            "owner": self.owner,
            "heartbeat_at": isoformat(self.heartbeat_at),
        }
