"""One item's page (`/executions/ID/items/ITEM`): its picture, top-k, status, error,
attempts, timings and history; and the pictures of items (`.../picture/thumb|view`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...errors import ExecutionNotFound
from ...store import Store
from ...store.reviews import Reviews
from ...types import ItemResult
from .render import page
from .session import Session, viewer
from .thumbnails import Thumbnails, Unavailable

router = APIRouter(include_in_schema=False)

#: Events of one item shown (its attempts, retries and result).
ITEM_EVENTS = 100


def _store(request: Request) -> Store:
    store: Store = request.app.state.service.store
    return store


def recorded(store: Store, execution_id: str, item_id: int) -> ItemResult:
    """The item's recorded result (ExecutionNotFound, a 404, for an item without one)."""
    execution = store.get_execution(execution_id)
    for result in store.results(execution.id, after_seq=item_id - 1, limit=1):
        if result.item_id == str(item_id):
            return result
    raise ExecutionNotFound(f"execution {execution.id} has no result for item {item_id}")


@router.get("/executions/{execution_id}/items/{item_id}")
def item_page(
    request: Request,
    execution_id: str,
    item_id: int,
    session: Annotated[Session, Depends(viewer)],
) -> Response:
    store = _store(request)
    result = recorded(store, execution_id, item_id)
    events = list(store.history(result.execution_id, item_seq=item_id, limit=ITEM_EVENTS))
    review = Reviews(store).get(result.execution_id, item_id)
    return page(request, session, "item.html", result=result, events=events, review=review)


@router.get("/executions/{execution_id}/items/{item_id}/picture/{size}")
async def picture(
    request: Request,
    execution_id: str,
    item_id: int,
    size: Literal["thumb", "view"],
    session: Annotated[Session, Depends(viewer)],
) -> Response:
    store = _store(request)
    result = await asyncio.to_thread(recorded, store, execution_id, item_id)
    thumbnails: Thumbnails = request.app.state.thumbnails
    async with request.app.state.picture_slots:
        try:
            data = await asyncio.to_thread(
                thumbnails.picture, result.execution_id, result.item_id, result.uri, size
            )
        except Unavailable as e:
            return Response(f"no picture: {e}", status_code=404, media_type="text/plain")
    return Response(
        data,
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
