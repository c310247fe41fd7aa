"""Batch executions over HTTP: start one, list them, read one's results and history, cancel
and resume.

The routes are plain functions (FastAPI runs them on its thread pool): each reads or
writes the store, which blocks. Running the executions is `Batches`' work.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UsageError
from ..store import Store
from ..types import Execution, ExecutionStatus, ItemStatus
from .batches import Batches
from .service import Service

router = APIRouter()

#: Results (or executions) per page at most.
MAX_PAGE = 1000
#: Results per chunk of a JSON Lines stream.
STREAM_CHUNK = 500


class BatchRequest(BaseModel):
    """The body of `POST /v1/executions`; unset settings are the server's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sources: list[str] = Field(
        min_length=1,
        max_length=1000,
        description="Files, folders, globs or @list files, under the server's allowed_sources.",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Execution name; a name already used returns that execution (200).",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A model this server serves (GET /v1/models); by default the default "
        "model. A resume runs on the same model.",
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="By default the model's, as for real-time requests."
    )
    top_k: int | None = Field(None, ge=1, le=1000)
    low_confidence: Literal["flag", "fail"] | None = Field(
        None,
        description="'flag': LOW_CONFIDENCE items are alerted and counted, only FAILED ones "
        "count against the tolerated failures; 'fail': they count too.",
    )
    tolerated_failure_percentage: float | None = Field(None, ge=0.0, le=100.0)
    tolerated_failure_count: int | None = Field(None, ge=0)


def _batches(request: Request) -> Batches:
    batches: Batches = request.app.state.batches
    return batches


def _store(request: Request) -> Store:
    service: Service = request.app.state.service
    return service.store


def execution_doc(batches: Batches, execution: Execution) -> dict[str, Any]:
    """The execution as `Execution.to_dict()`, and whether it waits in this server's queue."""
    return {**execution.to_dict(), "queued": batches.queued(execution.id)}


def _answer(batches: Batches, execution: Execution, status: int) -> JSONResponse:
    return JSONResponse(
        execution_doc(batches, execution),
        status_code=status,
        headers={"Location": f"/v1/executions/{execution.id}"},
    )


@router.post(
    "/v1/executions",
    status_code=202,
    summary="Start a batch execution (202), or return the one with this name (200)",
    responses={
        200: {"description": "An execution with this name exists: that one."},
        403: {"description": "A source is outside allowed_sources."},
        404: {"description": "The server does not serve that model."},
    },
)
def start_execution(body: BatchRequest, request: Request) -> JSONResponse:
    batches = _batches(request)
    overrides = body.model_dump(exclude_none=True, exclude={"sources", "name", "model"})
    execution, created = batches.start(body.sources, overrides, body.name, body.model)
    return _answer(batches, execution, 202 if created else 200)


@router.get("/v1/executions", summary="Executions, most recent first, a page at a time")
def list_executions(
    request: Request,
    status: Annotated[
        ExecutionStatus | None, Query(description="Only executions with this status.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(description="The `next` of the previous page.")] = None,
) -> dict[str, Any]:
    batches = _batches(request)
    store = _store(request)
    before = None if cursor is None else decode_cursor(cursor)
    # One more than the page says whether another follows; the store reads from the cursor
    # on (keyset), so a page costs the same however deep it is.
    rows = store.list_executions(limit=limit + 1, status=status, before=before)
    page = rows[:limit]
    return {
        "executions": [execution_doc(batches, e) for e in page],
        "next": encode_cursor(page[-1]) if len(rows) > limit else None,
    }


def encode_cursor(e: Execution) -> str:
    raw = f"{e.started_at.isoformat()}|{e.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        started, _, execution_id = raw.partition("|")
        when = dt.datetime.fromisoformat(started)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise UsageError(
            f"cursor {cursor!r} is not one this server gave: pass the `next` of a page"
        ) from None
    if not execution_id or when.tzinfo is None:
        raise UsageError(
            f"cursor {cursor!r} is not one this server gave: pass the `next` of a page"
        )
    return when, execution_id


@router.get(
    "/v1/executions/{execution_id}",
    summary="One execution, by id, a unique start of its id, or its name",
    responses={
        400: {"description": "Several executions match (the error lists them)."},
        404: {"description": "No such execution."},
    },
)
def get_execution(execution_id: str, request: Request) -> dict[str, Any]:
    batches = _batches(request)
    store = _store(request)
    execution = store.get_execution(execution_id)
    return {**execution_doc(batches, execution), "failure_types": store.failure_types(execution.id)}


@router.get(
    "/v1/executions/{execution_id}/results",
    summary="An execution's recorded results in item order: a page of JSON, or every one "
    "as JSON Lines (format=jsonl)",
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": '`{"results": [...], "next": ITEM_ID or null}`, or JSON Lines.',
        },
        404: {"description": "No such execution."},
    },
)
def get_results(
    execution_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[
        int, Query(ge=-1, description="The item id after which the page starts.")
    ] = -1,
    status: Annotated[ItemStatus | None, Query(description="Only items with this status.")] = None,
    label: Annotated[
        str | None, Query(max_length=255, description="Only items with this label.")
    ] = None,
    min_confidence: Annotated[
        float | None, Query(ge=0.0, le=1.0, description="Only items at least this confident.")
    ] = None,
    max_confidence: Annotated[
        float | None, Query(ge=0.0, le=1.0, description="Only items at most this confident.")
    ] = None,
    format: Annotated[Literal["json", "jsonl"], Query()] = "json",
) -> Any:
    store = _store(request)
    execution = store.get_execution(execution_id)
    filters = ResultFilters(status, label, min_confidence, max_confidence)
    if format == "jsonl":
        return StreamingResponse(
            _json_lines(store, execution.id, filters, after), media_type="application/x-ndjson"
        )
    results = list(
        store.results(execution.id, after_seq=after, limit=limit + 1, **filters.as_kwargs())
    )
    page = results[:limit]
    return {
        "results": [r.to_dict() for r in page],
        "next": page[-1].item_id if len(results) > limit else None,
    }


@dataclass(frozen=True)
class ResultFilters:
    """Which of an execution's results a page shows (the API's and the console's)."""

    status: ItemStatus | None = None
    label: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "label": self.label,
            "min_confidence": self.min_confidence,
            "max_confidence": self.max_confidence,
        }


def _json_lines(
    store: Store, execution_id: str, filters: ResultFilters, after: int
) -> Iterator[str]:
    """Every result as a JSON line, in chunks: Starlette pulls each chunk on a thread, and
    the store reads a page at a time, so memory stays flat however many there are."""
    lines: list[str] = []
    for result in store.results(execution_id, after_seq=after, **filters.as_kwargs()):
        lines.append(json.dumps(result.to_dict(), separators=(",", ":")) + "\n")
        if len(lines) >= STREAM_CHUNK:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)


@router.get(
    "/v1/executions/{execution_id}/history",
    summary="An execution's event history, oldest first, a page at a time",
    responses={404: {"description": "No such execution."}},
)
def get_history(
    execution_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    after: Annotated[int, Query(ge=0, description="The event id after which the page starts.")] = 0,
) -> dict[str, Any]:
    store = _store(request)
    execution = store.get_execution(execution_id)
    events = list(store.history(execution.id, after=after, limit=limit + 1))
    page = events[:limit]
    return {
        "events": [ev.to_dict() for ev in page],
        "next": page[-1].id if len(events) > limit else None,
    }


@router.post(
    "/v1/executions/{execution_id}/cancel",
    summary="Stop an execution: 200 once it has ended (ABORTED), 202 while it still stops",
    responses={
        202: {"description": "Cancel requested; the execution is still stopping."},
        404: {"description": "No such execution."},
    },
)
def cancel(
    execution_id: str,
    request: Request,
    wait: Annotated[
        float, Query(ge=0.0, le=60.0, description="Seconds to wait for it to stop.")
    ] = 10.0,
) -> JSONResponse:
    batches = _batches(request)
    execution = batches.cancel(execution_id, wait)
    return _answer(batches, execution, 202 if execution.status is ExecutionStatus.RUNNING else 200)


@router.post(
    "/v1/executions/{execution_id}/resume",
    status_code=202,
    summary="Finish an interrupted execution (aborted, cancelled, left by a dead process): "
    "queued (202); items with a result are not redone",
    responses={
        400: {"description": "Every item has its result, or it cannot be resumed."},
        403: {"description": "A source of the execution is outside allowed_sources."},
        404: {"description": "No such execution."},
        409: {"description": "It is running in a live process."},
    },
)
def resume(execution_id: str, request: Request) -> JSONResponse:
    batches = _batches(request)
    execution = batches.resume(execution_id)
    return _answer(batches, execution, 202)
