"""People's answers about items (the console's review queue), and the queue itself.

A review is one row per item (`ics_reviews`): the model's label accepted, another label
of the model's, or none of them, with who answered and when. Undo deletes it, and the
item is back in the queue. The queue holds the LOW_CONFIDENCE items of every execution
that have no review, least confident first (read from `ix_ics_items_confidence`) or
oldest first, a page at a time from a cursor (keyset: what a skip moves past).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select, and_, delete, func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError

from ..errors import ExecutionBusy, ExecutionNotFound
from ..types import ItemResult, ItemStatus, isoformat, utcnow
from .connection import store_errors
from .rows import result_from_row, utc
from .schema import items, reviews
from .store import Store

Verdict = Literal["accepted", "relabelled", "none"]
VERDICTS: tuple[Verdict, ...] = ("accepted", "relabelled", "none")
Order = Literal["confidence", "oldest"]
#: Where a page of the queue starts: after this (sort value, execution id, item seq).
Cursor = tuple[Any, str, int]


@dataclass(frozen=True)
class Review:
    """One person's answer about one item."""

    execution_id: str
    item_id: str
    verdict: Verdict
    #: The label given: the model's top label (accepted), another (relabelled), or None.
    label: str | None
    label_index: int | None
    reviewer: str
    reviewed_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "item_id": self.item_id,
            "verdict": self.verdict,
            "label": self.label,
            "label_index": self.label_index,
            "reviewer": self.reviewer,
            "reviewed_at": isoformat(self.reviewed_at),
        }


@dataclass(frozen=True)
class Reviewed:
    """A review with the item's recorded result (its URI, the model's answer)."""

    review: Review
    result: ItemResult


def _review(m: Any) -> Review:
    return Review(
        execution_id=m["execution_id"],
        item_id=str(m["item_seq"]),
        verdict=m["verdict"],
        label=m["label"],
        label_index=m["label_index"],
        reviewer=m["reviewer"],
        reviewed_at=utc(m["reviewed_at"]) or utcnow(),
    )


def _waiting(q: Select[Any]) -> Select[Any]:
    """The query over the items that wait for review: LOW_CONFIDENCE, without a review."""
    joined = items.outerjoin(
        reviews,
        and_(reviews.c.execution_id == items.c.execution_id, reviews.c.item_seq == items.c.seq),
    )
    return q.select_from(joined).where(
        items.c.status == ItemStatus.LOW_CONFIDENCE.value, reviews.c.item_seq.is_(None)
    )


class Reviews:
    """The reviews of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(
        self,
        execution_id: str,
        item_id: int,
        verdict: Verdict,
        label: str | None,
        label_index: int | None,
        reviewer: str,
    ) -> Review:
        """Store an answer; ExecutionBusy (409) when the item has one already (another
        reviewer's: the first answer stands until it is undone)."""
        review = Review(execution_id, str(item_id), verdict, label, label_index, reviewer, utcnow())
        with self.store._connect() as conn:
            found = conn.execute(
                select(items.c.status).where(
                    items.c.execution_id == execution_id, items.c.seq == item_id
                )
            ).first()
        if found is None or found.status is None:
            raise ExecutionNotFound(f"execution {execution_id} has no result for item {item_id}")
        taken = False
        with store_errors(self.store.safe_url):
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(
                        insert(reviews).values(
                            execution_id=execution_id,
                            item_seq=item_id,
                            verdict=verdict,
                            label=label,
                            label_index=label_index,
                            reviewer=reviewer,
                            reviewed_at=review.reviewed_at,
                        )
                    )
            except IntegrityError:  # the primary key: one answer per item
                taken = True
        if taken:
            other = self.get(execution_id, item_id)
            by = f" by {other.reviewer} at {isoformat(other.reviewed_at)}" if other else ""
            raise ExecutionBusy(
                f"item {item_id} of execution {execution_id} was reviewed already{by}"
            )
        return review

    def undo(self, execution_id: str, item_id: int) -> bool:
        """Delete an item's review (it is back in the queue); False when it had none."""
        with self.store._begin() as conn:
            done = conn.execute(
                delete(reviews).where(
                    reviews.c.execution_id == execution_id, reviews.c.item_seq == item_id
                )
            )
        return bool(done.rowcount)

    def get(self, execution_id: str, item_id: int) -> Review | None:
        with self.store._connect() as conn:
            row = conn.execute(
                select(reviews).where(
                    reviews.c.execution_id == execution_id, reviews.c.item_seq == item_id
                )
            ).first()
        return None if row is None else _review(row._mapping)

    def queue(
        self,
        *,
        order: Order = "confidence",
        after: Cursor | None = None,
        limit: int = 1,
        execution_id: str | None = None,
    ) -> list[tuple[ItemResult, Cursor]]:
        """The next items waiting for review (with each one's cursor, to skip past it)."""
        key = items.c.confidence if order == "confidence" else items.c.finished_at
        q = _waiting(select(key.label("key"), items.c.execution_id, items.c.seq, items.c.result))
        if execution_id is not None:
            q = q.where(items.c.execution_id == execution_id)
        if after is not None:
            q = q.where(tuple_(key, items.c.execution_id, items.c.seq) > tuple_(*after))
        q = q.order_by(key, items.c.execution_id, items.c.seq).limit(limit)
        with self.store._connect() as conn:
            rows = conn.execute(q).all()
        return [(result_from_row(r._mapping), (r.key, r.execution_id, int(r.seq))) for r in rows]

    def waiting(self, execution_id: str | None = None) -> int:
        """How many items wait for review."""
        q = _waiting(select(func.count()))
        if execution_id is not None:
            q = q.where(items.c.execution_id == execution_id)
        with self.store._connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def answered(
        self,
        *,
        execution_id: str | None = None,
        after: tuple[dt.datetime, str, int] | None = None,
        page_size: int = 500,
    ) -> Iterator[Reviewed]:
        """Every review, oldest first, with its item's result (a page per query)."""
        while True:
            q = select(reviews, items.c.result).join(
                items,
                and_(
                    reviews.c.execution_id == items.c.execution_id,
                    reviews.c.item_seq == items.c.seq,
                ),
            )
            if execution_id is not None:
                q = q.where(reviews.c.execution_id == execution_id)
            if after is not None:
                q = q.where(
                    tuple_(reviews.c.reviewed_at, reviews.c.execution_id, reviews.c.item_seq)
                    > tuple_(*after)
                )
            q = q.order_by(reviews.c.reviewed_at, reviews.c.execution_id, reviews.c.item_seq).limit(
                page_size
            )
            with self.store._connect() as conn:
                rows = conn.execute(q).all()
            for row in rows:
                m = row._mapping
                yield Reviewed(_review(m), result_from_row(m))
            if len(rows) < page_size:
                return
            last = rows[-1]._mapping
            after = (last["reviewed_at"], last["execution_id"], int(last["item_seq"]))
