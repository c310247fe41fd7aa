"""The executions pages: the list (`/`), one execution (`/executions/ID`) with the workflow's
states, its history and its items, its progress for the live view, and its cancel and
resume buttons. They read the store through the API's own queries and cursors."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from ...errors import IcsError, UsageError
from ...store import Store
from ...types import Execution, ExecutionStatus, ItemResult, ItemStatus, Step
from ..batches import Batches
from ..executions import ResultFilters, decode_cursor, encode_cursor, execution_doc
from .render import HEADERS, page
from .session import Session, sessions_of, viewer

router = APIRouter(include_in_schema=False)

#: Executions and items per page.
PAGE = 50
#: Events of the execution's own history shown on its page (each item's are on the item's
#: page; the API pages through all).
HISTORY_SHOWN = 200
#: Bins of the confidence histogram, and labels in the labels chart.
HISTOGRAM_BINS = 20
LABELS_SHOWN = 10
#: Error types that the ClassifyImage state raises; every other item error is
#: SerializeImageData's (reading, checking and decoding the image).
CLASSIFY_ERRORS = frozenset(
    {"ModelUnavailable", "InferenceError", "ModelError", "EndpointUnavailable"}
)


def _batches(request: Request) -> Batches:
    batches: Batches = request.app.state.batches
    return batches


def summary(batches: Batches, execution: Execution) -> dict[str, Any]:
    """What the pages show of an execution (and its live view polls)."""
    doc = execution_doc(batches, execution)
    c = execution.counts
    end = execution.finished_at or dt.datetime.now(dt.UTC)
    params = execution.params
    return {
        "execution": execution,
        "doc": doc,
        "counts": c,
        "done": c.done,
        "running": execution.status is ExecutionStatus.RUNNING,
        "seconds": (end - execution.started_at).total_seconds(),
        "sources": [str(s) for s in params.get("sources") or []],
        "model": params.get("model"),
        "threshold": params.get("threshold"),
    }


@router.get("/")
def executions_page(
    request: Request,
    session: Annotated[Session, Depends(viewer)],
    status: Annotated[str, Query(max_length=32)] = "",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    batches = _batches(request)
    store = batches.store
    chosen = _choice(ExecutionStatus, status)
    before = None if cursor is None else decode_cursor(cursor)
    rows = store.list_executions(limit=PAGE + 1, status=chosen, before=before)
    shown = rows[:PAGE]
    return page(
        request,
        session,
        "executions.html",
        rows=[summary(batches, e) for e in shown],
        status=chosen.value if chosen else "",
        statuses=[s.value for s in ExecutionStatus],
        next=encode_cursor(shown[-1]) if len(rows) > PAGE else None,
    )


def states(execution: Execution, failures: dict[str, int]) -> list[dict[str, Any]]:
    """The workflow's states with how many items (of those that have a result) entered
    each, passed, failed or were flagged there; Notify counts the items it alerted of."""
    c = execution.counts
    classify_failed = sum(n for t, n in failures.items() if t in CLASSIFY_ERRORS)
    read_failed = c.failed - classify_failed
    classified = c.succeeded + c.low_confidence
    alerted = c.low_confidence + c.failed

    def state(
        step: Step,
        entered: int,
        passed: int,
        failed: int = 0,
        flagged: int = 0,
        verb: str = "passed",
    ) -> dict[str, Any]:
        return {
            "name": step.value,
            "entered": entered,
            "passed": passed,
            "failed": failed,
            "flagged": flagged,
            "verb": verb,
        }

    return [
        state(Step.SERIALIZE_IMAGE_DATA, c.done, c.done - read_failed, failed=read_failed),
        state(Step.CLASSIFY_IMAGE, c.done - read_failed, classified, failed=classify_failed),
        state(Step.FILTER_LOW_CONFIDENCE, classified, c.succeeded, flagged=c.low_confidence),
        state(Step.NOTIFY, alerted, alerted, verb="alerted"),
    ]


@router.get("/executions/{execution_id}")
def execution_page(
    request: Request,
    execution_id: str,
    session: Annotated[Session, Depends(viewer)],
    status: Annotated[str, Query(max_length=32)] = "",
    label: Annotated[str, Query(max_length=255)] = "",
    min_confidence: Annotated[str, Query(max_length=32)] = "",
    max_confidence: Annotated[str, Query(max_length=32)] = "",
    sort: Literal["item", "confidence", "-confidence"] = "item",
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    # A form's empty field is "any": these arrive as text.
    batches = _batches(request)
    store = batches.store
    execution = store.get_execution(execution_id)
    failures = store.failure_types(execution.id)
    filters = ResultFilters(
        _choice(ItemStatus, status),
        label or None,
        _fraction("min_confidence", min_confidence),
        _fraction("max_confidence", max_confidence),
    )
    shown, next_after = _items_page(store, execution.id, filters, sort, after)
    query = {
        k: v
        for k, v in {
            "status": filters.status.value if filters.status else None,
            "label": filters.label,
            "min_confidence": filters.min_confidence,
            "max_confidence": filters.max_confidence,
            "sort": sort if sort != "item" else None,
        }.items()
        if v is not None
    }
    threshold = execution.params.get("threshold")
    return page(
        request,
        session,
        "execution.html",
        **summary(batches, execution),
        states=states(execution, failures),
        failures=sorted(failures.items(), key=lambda kv: -kv[1]),
        history=list(store.history(execution.id, limit=HISTORY_SHOWN, execution_level=True)),
        items=shown,
        filters=query,
        statuses=[s.value for s in ItemStatus],
        sort=sort,
        next=None if next_after is None else urllib.parse.urlencode({**query, "after": next_after}),
        histogram=histogram(store.confidence_histogram(execution.id, HISTOGRAM_BINS), threshold),
        labels=store.label_counts(execution.id, LABELS_SHOWN),
        resumable=execution.status is not ExecutionStatus.RUNNING
        and execution.counts.done < execution.counts.total,
    )


E = TypeVar("E", ItemStatus, ExecutionStatus)


def _choice(kind: type[E], text: str) -> E | None:
    """A status chosen in a form ("" is any)."""
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"{text!r} is not one of {', '.join(k.value for k in kind)}") from None


def _fraction(name: str, text: str) -> float | None:
    """A confidence bound typed in a form ("" is none)."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be a number from 0 to 1, not {text!r}")
    return value


def _items_page(
    store: Store, execution_id: str, filters: ResultFilters, sort: str, after: str | None
) -> tuple[list[ItemResult], str | None]:
    """A page of the execution's items in the order asked for, and where the next starts."""
    try:
        if sort == "item":
            seq = -1 if not after else int(after)
            found = list(
                store.results(execution_id, after_seq=seq, limit=PAGE + 1, **filters.as_kwargs())
            )
            shown = found[:PAGE]
            return shown, (shown[-1].item_id if len(found) > PAGE else None)
        cursor = None
        if after:
            confidence, _, seq_text = after.partition(":")
            cursor = (float(confidence), int(seq_text))
    except ValueError:
        raise UsageError(f"{after!r} is not a position this page gave") from None
    page_ = store.results_by_confidence(
        execution_id,
        descending=sort == "-confidence",
        after=cursor,
        limit=PAGE + 1,
        **filters.as_kwargs(),
    )
    shown = [r for r, _ in page_[:PAGE]]
    if len(page_) <= PAGE:
        return shown, None
    last_confidence, last_seq = page_[PAGE - 1][1]
    return shown, f"{last_confidence!r}:{last_seq}"


def histogram(counts: list[int], threshold: float | None) -> dict[str, Any]:
    """The confidence histogram as the SVG on the page draws it (bars in a 0..100 box)."""
    top = max(counts, default=0) or 1
    width = 100.0 / len(counts)
    bars = [
        {
            "x": round(i * width, 3),
            "width": round(width * 0.9, 3),
            "height": round(90.0 * n / top, 3),
            "count": n,
            "low": round(i / len(counts), 2),
            "high": round((i + 1) / len(counts), 2),
        }
        for i, n in enumerate(counts)
    ]
    return {
        "bars": bars,
        "threshold_x": None if threshold is None else round(100.0 * float(threshold), 3),
        "total": sum(counts),
    }


@router.get("/executions/{execution_id}/progress")
def progress(
    request: Request, execution_id: str, session: Annotated[Session, Depends(viewer)]
) -> JSONResponse:
    """The live view's poll: status and counts."""
    execution = _batches(request).store.get_execution(execution_id)
    return JSONResponse(
        {
            "status": execution.status.value,
            **execution.counts.to_dict(),
            "done": execution.counts.done,
        },
        headers={"Cache-Control": "no-store"},
    )


@router.post("/executions/{execution_id}/{action}")
def act(
    request: Request,
    execution_id: str,
    action: str,
    session: Annotated[Session, Depends(viewer)],
    csrf: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """The cancel and resume buttons: what the API's routes do, then back to the page."""
    sessions_of(request).check_form(session, csrf)
    batches = _batches(request)
    execution = batches.store.get_execution(execution_id)
    try:
        if action == "cancel":
            batches.cancel(execution.id, 0.0)
        elif action == "resume":
            batches.resume(execution.id)
        else:
            return Response(status_code=404)
    except IcsError as e:
        return page(
            request,
            session,
            "message.html",
            http_status=e.http_status,
            title=f"Execution {execution.id}",
            message=str(e),
            back=f"/executions/{execution.id}",
        )
    return RedirectResponse(f"/executions/{execution.id}", status_code=303, headers=HEADERS)
