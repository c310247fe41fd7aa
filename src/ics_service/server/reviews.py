"""People's reviews of items over HTTP: `GET /v1/reviews`, a page at a time, oldest first
(the console's review queue writes them; `ics review export` exports them)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import itertools
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from ..errors import UsageError
from ..store.reviews import Reviews
from .executions import MAX_PAGE
from .service import Service

router = APIRouter()


def _reviews(request: Request) -> Reviews:
    service: Service = request.app.state.service
    return Reviews(service.store)


def encode_cursor(at: dt.datetime, execution_id: str, item_id: str) -> str:
    raw = f"{at.isoformat()}|{execution_id}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, execution_id, seq = raw.split("|")
        return dt.datetime.fromisoformat(at), execution_id, int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise UsageError(
            f"cursor {cursor!r} is not one this server gave: pass the `next` of a page"
        ) from None


@router.get("/v1/reviews", summary="People's reviews of items, oldest first, a page at a time")
def list_reviews(
    request: Request,
    execution_id: Annotated[
        str | None, Query(max_length=64, description="Only this execution's items.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(description="The `next` of the previous page.")] = None,
) -> dict[str, Any]:
    reviews = _reviews(request)
    if execution_id is not None:
        execution_id = reviews.store.get_execution(execution_id).id
    after = None if cursor is None else decode_cursor(cursor)
    # One more than the page says whether another follows.
    found = list(
        itertools.islice(
            reviews.answered(execution_id=execution_id, after=after, page_size=limit + 1),
            limit + 1,
        )
    )
    page = found[:limit]
    last = page[-1].review if len(found) > limit else None
    return {
        "reviews": [{**r.review.to_dict(), "uri": r.result.uri} for r in page],
        "next": None
        if last is None
        else encode_cursor(last.reviewed_at, last.execution_id, last.item_id),
    }
