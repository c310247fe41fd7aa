"""The review queue (`/review`): the LOW_CONFIDENCE items of every execution that nobody has
reviewed, least confident (or oldest) first, one at a time, worked from the keyboard:
accept the model's label, pick another of its top k, type any label of the model, or
"none of these"; skip; undo the last answer. Answers are store rows (`store.reviews`),
with the reviewer's name (kept in a cookie) and time."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import urllib.parse
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from ...errors import IcsError, UsageError
from ...models import get_card
from ...store import Store
from ...store.reviews import Cursor, Order, Reviews, Verdict
from ...types import ItemResult
from .items import recorded
from .render import HEADERS, page
from .session import Session, sessions_of, viewer

router = APIRouter(include_in_schema=False)

#: The cookie that keeps the reviewer's name between answers.
REVIEWER_COOKIE = "ics_reviewer"
MAX_REVIEWER = 100


def _store(request: Request) -> Store:
    store: Store = request.app.state.service.store
    return store


def encode_cursor(cursor: Cursor | None) -> str:
    if cursor is None:
        return ""
    key, execution_id, seq = cursor
    shown = key.isoformat() if isinstance(key, dt.datetime) else repr(key)
    return base64.urlsafe_b64encode(f"{shown}|{execution_id}|{seq}".encode()).decode()


def decode_cursor(text: str | None, order: Order) -> Cursor | None:
    if not text:
        return None
    try:
        key, execution_id, seq = base64.urlsafe_b64decode(text).decode().split("|")
        value: Any = dt.datetime.fromisoformat(key) if order == "oldest" else float(key)
        return value, execution_id, int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise UsageError("that review position is not one this server gave") from None


def _item(text: str) -> tuple[str, int]:
    execution_id, _, seq = text.rpartition(":")
    if not execution_id or not seq.isdigit():
        raise UsageError(f"item {text!r} is not EXECUTION_ID:ITEM")
    return execution_id, int(seq)


def model_labels(request: Request, result: ItemResult) -> list[str]:
    """The labels of the item's model (its card from the registry), or its top k's when the
    model is not registered here."""
    try:
        return list(get_card(result.model.name, request.app.state.settings).labels)
    except IcsError:
        return [p.label for p in result.top_k]


@router.get("/review")
def review_page(
    request: Request,
    session: Annotated[Session, Depends(viewer)],
    order: Order = "confidence",
    after: Annotated[str | None, Query(max_length=400)] = None,
    item: Annotated[str | None, Query(max_length=200)] = None,
    last: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    store = _store(request)
    reviews = Reviews(store)
    cursor = decode_cursor(after, order)
    skip_to = None
    if item is not None:
        result: ItemResult | None = recorded(store, *_item(item))
    else:
        found = reviews.queue(order=order, after=cursor, limit=1)
        result, skip_to = found[0] if found else (None, None)
    labels = model_labels(request, result) if result is not None else []
    return page(
        request,
        session,
        "review.html",
        result=result,
        labels=labels,
        order=order,
        after=after or "",
        skip=encode_cursor(skip_to) if skip_to is not None else (after or ""),
        waiting=reviews.waiting(),
        reviewer=request.cookies.get(REVIEWER_COOKIE, ""),
        last=last or "",
    )


def _back(order: str, after: str, **more: str) -> str:
    query = {"order": order, **({"after": after} if after else {}), **more}
    return "/review?" + urllib.parse.urlencode(query)


@router.post("/review")
def answer(
    request: Request,
    session: Annotated[Session, Depends(viewer)],
    execution_id: Annotated[str, Form(max_length=64)],
    item_id: Annotated[int, Form(ge=0)],
    action: Annotated[str, Form(max_length=16)],
    reviewer: Annotated[str, Form(max_length=MAX_REVIEWER)] = "",
    label: Annotated[str, Form(max_length=255)] = "",
    order: Annotated[Literal["confidence", "oldest"], Form()] = "confidence",
    after: Annotated[str, Form(max_length=400)] = "",
    csrf: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    sessions_of(request).check_form(session, csrf)
    store = _store(request)
    result = recorded(store, execution_id, item_id)
    reviewer = reviewer.strip()
    try:
        if not reviewer:
            raise UsageError("give your name (it is stored with your answers)")
        verdict, chosen, index = _decided(request, result, action, label)
        Reviews(store).record(result.execution_id, item_id, verdict, chosen, index, reviewer)
    except IcsError as e:
        return page(
            request,
            session,
            "message.html",
            http_status=e.http_status,
            title="Review",
            message=str(e),
            back=_back(order, after, item=f"{result.execution_id}:{item_id}"),
        )
    response = RedirectResponse(
        _back(order, after, last=f"{result.execution_id}:{item_id}"),
        status_code=303,
        headers=HEADERS,
    )
    response.set_cookie(
        REVIEWER_COOKIE, reviewer, max_age=365 * 86400, path="/", httponly=True, samesite="strict"
    )
    return response


def _decided(
    request: Request, result: ItemResult, action: str, label: str
) -> tuple[Verdict, str | None, int | None]:
    """The answer a button means: (verdict, label, label index)."""
    if action == "none":
        return "none", None, None
    if action == "accept":
        if result.label is None:
            raise UsageError("this item has no label of the model's to accept")
        return "accepted", result.label, result.label_index
    if action.startswith("pick:") and action[5:].isdigit():
        rank = int(action[5:])
        if not 1 <= rank <= len(result.top_k):
            raise UsageError(f"the model gave {len(result.top_k)} labels, not {rank}")
        p = result.top_k[rank - 1]
        return ("accepted" if p.index == result.label_index else "relabelled"), p.label, p.index
    if action == "type":
        labels = model_labels(request, result)
        typed = label.strip()
        if typed not in labels:
            raise UsageError(f"{typed!r} is not a label of model {result.model.name}")
        index = labels.index(typed)
        return ("accepted" if index == result.label_index else "relabelled"), typed, index
    raise UsageError(f"unknown answer {action!r}")


@router.post("/review/undo")
def undo(
    request: Request,
    session: Annotated[Session, Depends(viewer)],
    item: Annotated[str, Form(max_length=200)],
    order: Annotated[Literal["confidence", "oldest"], Form()] = "confidence",
    after: Annotated[str, Form(max_length=400)] = "",
    csrf: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Take the last answer back: its item is shown again, to answer anew."""
    sessions_of(request).check_form(session, csrf)
    execution_id, seq = _item(item)
    Reviews(_store(request)).undo(execution_id, seq)
    return RedirectResponse(_back(order, after, item=item), status_code=303, headers=HEADERS)
