"""Alert documents (versioned JSON) and their human-readable title and body.

Kinds: `low_confidence` and `item_failed` (an item), `execution_failed` (an execution that
ended FAILED), `async_inference_succeeded` and `async_inference_failed` (SageMaker's
asynchronous inference notifications), `digest` (a digest subscription's summary of one
execution) and `suppressed` (how many alerts a rate limit held back). `alert_id` is a UUID
stored with the document, so a retried delivery carries the same one and receivers can
deduplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from ..store.outbox import Held
from ..types import Execution, ItemResult, ItemStatus, isoformat, utcnow

VERSION = 1
#: Longest title: SNS subjects allow 100 characters, chat previews show less.
TITLE_MAX = 100
ITEM_KIND = {ItemStatus.LOW_CONFIDENCE: "low_confidence", ItemStatus.FAILED: "item_failed"}
#: SageMaker asynchronous inference notifications (server/sagemaker_async.py): kind → what
#: happened.
ASYNC_KINDS = {"async_inference_succeeded": "completed", "async_inference_failed": "failed"}


def new_id() -> str:
    return str(uuid.uuid4())


def _base(kind: str, alert_id: str) -> dict[str, Any]:
    return {
        "version": VERSION,
        "alert_id": alert_id,
        "kind": kind,
        "timestamp": isoformat(utcnow()),
    }


def execution_link(public_url: str | None, execution_id: str) -> str | None:
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/v1/executions/{quote(execution_id, safe='')}"


def item_alert(result: ItemResult, public_url: str | None) -> dict[str, Any]:
    """The document of a LOW_CONFIDENCE or FAILED item."""
    link = execution_link(public_url, result.execution_id)
    if link is not None:
        # The results page that starts with this item.
        link += f"/results?after={int(result.item_id) - 1}&limit=1"
    return {
        **_base(ITEM_KIND[result.status], new_id()),
        "execution_id": result.execution_id,
        "item_id": result.item_id,
        "uri": result.uri,
        "threshold": result.threshold,
        "confidence": result.confidence,
        "label": result.label,
        "top_k": [asdict(p) for p in result.top_k],
        "error": None if result.error is None else asdict(result.error),
        "model": asdict(result.model),
        "link": link,
    }


def execution_alert(execution: Execution, public_url: str | None) -> dict[str, Any]:
    """The document of an execution that ended FAILED."""
    return {
        **_base("execution_failed", new_id()),
        "execution_id": execution.id,
        "item_id": None,
        "uri": None,
        "threshold": execution.params.get("threshold"),
        "confidence": None,
        "label": None,
        "top_k": [],
        "error": None if execution.error is None else asdict(execution.error),
        "model": {
            "name": execution.params.get("model"),
            "version": execution.params.get("model_version"),
        },
        "counts": execution.counts.to_dict(),
        "link": execution_link(public_url, execution.id),
    }


def digest(alert_id: str, held: Held, public_url: str | None) -> dict[str, Any]:
    """One summary of the alerts a digest subscription held for one execution."""
    e = held.execution
    return {
        **_base("digest", alert_id),
        "execution_id": None if e is None else e.id,
        "execution_name": None if e is None else e.name,
        "execution_status": None if e is None else e.status.value,
        "execution_counts": None if e is None else e.counts.to_dict(),
        "alerts": sum(held.counts.values()),
        "counts": held.counts,
        "first_at": isoformat(held.first_at),
        "last_at": isoformat(held.last_at),
        "worst": [
            {k: w.get(k) for k in ("alert_id", "kind", "item_id", "uri", "confidence", "label")}
            | {"error": w.get("error")}
            for w in held.worst
        ],
        "link": None if e is None else execution_link(public_url, e.id),
    }


def suppressed(alert_id: str, count: int, shown: str, period_s: float) -> dict[str, Any]:
    """How many alerts a subscription's rate limit held back."""
    return {
        **_base("suppressed", alert_id),
        "execution_id": None,
        "suppressed": count,
        "subscription": shown,
        "period_seconds": period_s,
    }


def _name(uri: Any) -> str:
    return PurePosixPath(str(uri)).name or str(uri)


def clip(text: str, limit: int = TITLE_MAX) -> str:
    """One line of at most `limit` characters, ending in "..." when cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def title_of(alert: Mapping[str, Any]) -> str:
    """A short plain title (at most 100 characters)."""
    kind = alert.get("kind")
    if kind == "low_confidence":
        conf = alert.get("confidence")
        shown = "?" if conf is None else f"{conf:.2f}"
        text = f"ICS low confidence {shown}: {_name(alert.get('uri'))}"
    elif kind == "item_failed":
        err = (alert.get("error") or {}).get("type", "error")
        text = f"ICS item failed ({err}): {_name(alert.get('uri'))}"
    elif kind == "execution_failed":
        text = f"ICS execution {alert.get('execution_id')} FAILED"
    elif kind == "digest":
        text = f"ICS digest: {alert.get('alerts')} alerts in execution {alert.get('execution_id')}"
    elif kind == "suppressed":
        text = f"ICS: {alert.get('suppressed')} more alerts suppressed"
    elif kind in ASYNC_KINDS:
        text = f"ICS asynchronous inference {alert.get('inferenceId')} {ASYNC_KINDS[kind]}"
    else:
        text = f"ICS alert {kind}"
    return clip(text)


def body_of(alert: Mapping[str, Any]) -> str:
    """A readable plain-text body: what happened, where, and a link when there is one."""
    kind = alert.get("kind")
    lines = []
    if kind in ("low_confidence", "item_failed"):
        lines.append(f"Item {alert.get('item_id')} of execution {alert.get('execution_id')}")
        lines.append(f"Image: {alert.get('uri')}")
        model = alert.get("model") or {}
        lines.append(f"Model: {model.get('name')} {model.get('version')}")
        if kind == "low_confidence":
            lines.append(
                f"Top label {alert.get('label')!s} at {alert.get('confidence'):.4f}, below the "
                f"threshold {alert.get('threshold')}"
            )
            for p in alert.get("top_k") or []:
                lines.append(f"  {p.get('confidence', 0):.4f}  {p.get('label')}")
        else:
            err = alert.get("error") or {}
            lines.append(f"Error: {err.get('type')}: {err.get('message')}")
    elif kind == "execution_failed":
        err = alert.get("error") or {}
        counts = alert.get("counts") or {}
        lines.append(f"Execution {alert.get('execution_id')} ended FAILED")
        lines.append(f"Reason: {err.get('type')}: {err.get('message')}")
        lines.append(", ".join(f"{k} {v}" for k, v in counts.items()))
    elif kind == "digest":
        lines.append(
            f"Execution {alert.get('execution_id')} ({alert.get('execution_status')}): "
            f"{alert.get('alerts')} alerts from {alert.get('first_at')} to {alert.get('last_at')}"
        )
        lines.append(", ".join(f"{k} {v}" for k, v in (alert.get("counts") or {}).items()))
        if alert.get("worst"):
            lines.append("Worst:")
        for w in alert.get("worst") or []:
            what = (
                f"{w['confidence']:.4f} {w.get('label')}"
                if w.get("confidence") is not None
                else (w.get("error") or {}).get("type", "failed")
            )
            lines.append(f"  item {w.get('item_id')}: {what}  {w.get('uri')}")
    elif kind == "suppressed":
        lines.append(
            f"{alert.get('suppressed')} alerts to {alert.get('subscription')} were not sent: "
            f"over its rate limit (per {alert.get('period_seconds'):g} s). "
            "`ics alerts list` shows them."
        )
    elif kind in ASYNC_KINDS:
        request = alert.get("requestParameters") or {}
        response = alert.get("responseParameters") or {}
        lines.append(f"Inference {alert.get('inferenceId')} {ASYNC_KINDS[kind]}")
        lines.append(f"Input: {request.get('inputLocation')}")
        if alert.get("failureReason"):
            lines.append(f"Reason: {alert['failureReason']}")
        where = response.get("outputLocation") or response.get("failureLocation")
        lines.append(f"{'Output' if response.get('outputLocation') else 'Error'}: {where}")
    if alert.get("link"):
        lines.append(f"Link: {alert['link']}")
    lines.append(f"Alert {alert.get('alert_id')} at {alert.get('timestamp')}")
    return "\n".join(lines)
