"""The executions pages: the list (`/`), one execution (`/executions/ID`) with the workflow's
states, its history and its items, its progress for the live view, and its cancel and
resume buttons. They read the store through the API's own queries and cursors."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from ...errors import IcsError
from ...types import Execution, ExecutionStatus, ItemStatus, Step
from ..batches import Batches
from ..executions import decode_cursor, encode_cursor, execution_doc
from .render import HEADERS, page
from .session import Session, sessions_of, viewer

router = APIRouter(include_in_schema=False)

#: Executions and items per page.
PAGE = 50
#: Events of the execution's own history shown on its page (each item's are on the item's
#: page; the API pages through all).
HISTORY_SHOWN = 200
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
    status: ExecutionStatus | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    batches = _batches(request)
    store = batches.store
    before = None if cursor is None else decode_cursor(cursor)
    rows = store.list_executions(limit=PAGE + 1, status=status, before=before)
    shown = rows[:PAGE]
    return page(
        request,
        session,
        "executions.html",
        rows=[summary(batches, e) for e in shown],
        status=status.value if status else "",
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
    status: ItemStatus | None = None,
    after: Annotated[int, Query(ge=-1)] = -1,
) -> Response:
    batches = _batches(request)
    store = batches.store
    execution = store.get_execution(execution_id)
    failures = store.failure_types(execution.id)
    results = list(store.results(execution.id, status=status, after_seq=after, limit=PAGE + 1))
    shown = results[:PAGE]
    return page(
        request,
        session,
        "execution.html",
        **summary(batches, execution),
        states=states(execution, failures),
        failures=sorted(failures.items(), key=lambda kv: -kv[1]),
        history=list(store.history(execution.id, limit=HISTORY_SHOWN, execution_level=True)),
        items=shown,
        status=status.value if status else "",
        statuses=[s.value for s in ItemStatus],
        next=int(shown[-1].item_id) if len(results) > PAGE else None,
        resumable=execution.status is not ExecutionStatus.RUNNING
        and execution.counts.done < execution.counts.total,
    )


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
