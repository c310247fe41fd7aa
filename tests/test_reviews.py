"""Reviews in the store (on SQLite and PostgreSQL): the queue's order and cursor, one answer
per item, undo; and migration 8 filling the label and confidence columns of results
recorded before it."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import update

from ics_service.errors import ExecutionBusy, ExecutionNotFound
from ics_service.store.reviews import Reviews
from ics_service.store.rows import result_to_row
from ics_service.store.schema import items
from ics_service.types import ItemResult, ItemStatus
from test_store import make_result, new_execution, opened, shipped_up_to, uris

LOW = ItemStatus.LOW_CONFIDENCE


def low(execution_id: str, seq: int, confidence: float) -> ItemResult:
    return dataclasses.replace(make_result(execution_id, seq, LOW), confidence=confidence)


def test_the_queue_is_least_confident_first_and_answers_leave_it(store_url: str) -> None:
    with opened(store_url) as store:
        a, b = new_execution(store), new_execution(store)
        store.add_items(a.id, uris(4))
        store.add_items(b.id, uris(3))
        store.record_results(
            a.id,
            [
                low(a.id, 0, 0.5),
                low(a.id, 1, 0.2),
                make_result(a.id, 2, ItemStatus.SUCCEEDED),
                make_result(a.id, 3, ItemStatus.FAILED),
            ],
        )
        store.record_results(b.id, [low(b.id, 0, 0.3), low(b.id, 1, 0.2)])
        reviews = Reviews(store)
        assert reviews.waiting() == 4 and reviews.waiting(b.id) == 2
        queue = reviews.queue(limit=10)
        order = [(r.execution_id, r.item_id) for r, _ in queue]
        ties = sorted([(a.id, "1"), (b.id, "1")])  # 0.2 both: by execution, then item
        assert order == [*ties, (b.id, "0"), (a.id, "0")]
        # A skip moves past an item by its cursor; the rest follow.
        first, cursor = queue[0]
        assert [
            (r.execution_id, r.item_id) for r, _ in reviews.queue(after=cursor, limit=10)
        ] == order[1:]
        assert [r.item_id for r, _ in reviews.queue(order="oldest", limit=10)] != []

        review = reviews.record(
            first.execution_id, int(first.item_id), "relabelled", "cup", 968, "ana"
        )
        assert reviews.get(first.execution_id, int(first.item_id)) == review
        assert reviews.waiting() == 3
        assert [(r.execution_id, r.item_id) for r, _ in reviews.queue(limit=10)] == order[1:]
        with pytest.raises(ExecutionBusy, match="reviewed already by ana"):
            reviews.record(first.execution_id, int(first.item_id), "none", None, None, "bo")
        with pytest.raises(ExecutionNotFound):
            reviews.record(a.id, 99, "none", None, None, "bo")
        reviews.record(a.id, 0, "accepted", "espresso", 967, "bo")
        answered = list(reviews.answered())
        assert [(x.review.reviewer, x.result.uri) for x in answered] == [
            ("ana", first.uri),
            ("bo", "file:///photos/000000.jpg"),
        ]
        assert [x.review.item_id for x in reviews.answered(execution_id=a.id, page_size=1)] == (
            [r.review.item_id for r in answered if r.review.execution_id == a.id]
        )
        assert reviews.undo(first.execution_id, int(first.item_id))
        assert not reviews.undo(first.execution_id, int(first.item_id))
        assert reviews.waiting() == 3


def test_migration_8_fills_label_and_confidence_of_results_recorded_before(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with shipped_up_to(7, monkeypatch), opened(store_url) as store:
        e = new_execution(store)
        store.add_items(e.id, uris(3))
        # Recorded as an ICS of version 7 did, without either column.
        with store.engine.begin() as conn:
            for r in (low(e.id, 0, 0.25), make_result(e.id, 1, ItemStatus.FAILED)):
                row = result_to_row(r)
                conn.execute(
                    update(items)
                    .where(items.c.execution_id == e.id, items.c.seq == int(r.item_id))
                    .values(status=row["r_status"], result=row["r_result"])
                )
    with opened(store_url) as store:
        reviews = Reviews(store)
        ((result, cursor),) = reviews.queue(limit=5)
        assert result.item_id == "0" and cursor == (0.25, e.id, 0)
