"""The alert outbox: alert documents and one delivery row per subscription.

Alerts are written by the Store in the same transaction as the results (or the execution
end) that raise them, through an AlertPlanner the alerts package gives it; the store never
learns what a subscription's spec means or how a channel sends. A dispatcher then claims
due deliveries one at a time with a lease, so two processes on one store never send one
delivery at once (until the lease of a dead sender runs out: delivery is at least once).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, and_, case, func, insert, or_, select, update

from ..types import Execution, ItemResult, utcnow
from .rows import execution_from_row, utc
from .schema import alerts, deliveries, executions, subscriptions

if TYPE_CHECKING:
    from .store import Store


class DeliveryStatus(StrEnum):
    PENDING = "PENDING"  # to send (now, or at next_at after a failure)
    SENT = "SENT"
    DEAD = "DEAD"  # gave up: out of attempts, or refused for good; `ics alerts retry`
    HELD = "HELD"  # for a digest subscription: waits to be rolled into a digest
    DIGESTED = "DIGESTED"  # rolled into the digest alert `rolled_into`
    SUPPRESSED = "SUPPRESSED"  # over the rate limit; counted by a "suppressed" notice


#: How many of the worst alerts a digest lists.
DIGEST_WORST = 10


@dataclass(frozen=True)
class NewAlert:
    """An alert document to store, and which subscriptions get it now or in a digest."""

    alert_id: str
    kind: str
    document: dict[str, Any]
    execution_id: str | None = None
    item_seq: int | None = None
    confidence: float | None = None
    send_to: tuple[str, ...] = ()
    hold_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class Held:
    """What one subscription's held alerts of one execution add up to: a digest's content."""

    subscription_id: str
    execution: Execution | None
    counts: dict[str, int]
    #: Documents of the worst alerts: failures first, then the lowest confidence.
    worst: list[dict[str, Any]]
    first_at: dt.datetime | None
    last_at: dt.datetime | None


class AlertPlanner(Protocol):
    """Turns results and execution ends into alerts (the alerts package implements it)."""

    def for_results(self, execution_id: str, results: Sequence[ItemResult]) -> list[NewAlert]: ...

    def for_end(self, execution: Execution) -> list[NewAlert]: ...

    def digest(self, alert_id: str, held: Held) -> NewAlert: ...


@dataclass(frozen=True)
class Delivery:
    """A due delivery, with what sending it needs."""

    id: int
    alert_id: str
    subscription_id: str
    attempts: int
    kind: str
    document: dict[str, Any]
    spec: str
    shown: str


def write_alerts(conn: Connection, new: Iterable[NewAlert]) -> None:
    """Insert alerts and their delivery rows on the caller's transaction."""
    now = utcnow()
    alert_rows: list[dict[str, Any]] = []
    delivery_rows: list[dict[str, Any]] = []
    for a in new:
        if not a.send_to and not a.hold_for:
            continue
        alert_rows.append(
            {
                "id": a.alert_id,
                "execution_id": a.execution_id,
                "item_seq": a.item_seq,
                "kind": a.kind,
                "confidence": a.confidence,
                "created_at": now,
                "document": json.dumps(a.document, separators=(",", ":"), default=str),
            }
        )
        for sub, status in [(s, DeliveryStatus.PENDING) for s in a.send_to] + [
            (s, DeliveryStatus.HELD) for s in a.hold_for
        ]:
            delivery_rows.append(
                {
                    "alert_id": a.alert_id,
                    "subscription_id": sub,
                    "status": status.value,
                    "attempts": 0,
                    "created_at": now,
                    "next_at": now,
                }
            )
    if alert_rows:
        conn.execute(insert(alerts), alert_rows)
    if delivery_rows:
        conn.execute(insert(deliveries), delivery_rows)


def roll_up(
    conn: Connection,
    planner: AlertPlanner,
    execution_id: str,
    subscription_id: str | None = None,
) -> int:
    """Replace the HELD deliveries of an execution by one digest per subscription; returns
    how many digests were written."""
    d, a = deliveries.c, alerts.c
    of_execution = select(a.id).where(a.execution_id == execution_id)
    q = (
        select(d.subscription_id)
        .distinct()
        .where(d.status == DeliveryStatus.HELD.value, d.alert_id.in_(of_execution))
    )
    if subscription_id is not None:
        q = q.where(d.subscription_id == subscription_id)
    written = 0
    for (sub,) in conn.execute(q).all():
        digest_id = str(uuid.uuid4())
        # Marking first settles which rows this digest carries, even with another process
        # rolling up at once: its UPDATE finds them no longer HELD.
        n = conn.execute(
            update(deliveries)
            .where(
                d.subscription_id == sub,
                d.status == DeliveryStatus.HELD.value,
                d.alert_id.in_(of_execution),
            )
            .values(status=DeliveryStatus.DIGESTED.value, rolled_into=digest_id)
        ).rowcount
        if not n:
            continue
        carried = and_(d.rolled_into == digest_id, d.alert_id == a.id)
        counts = {
            kind: int(count)
            for kind, count in conn.execute(
                select(a.kind, func.count()).where(carried).group_by(a.kind)
            ).all()
        }
        first_at, last_at = conn.execute(
            select(func.min(a.created_at), func.max(a.created_at)).where(carried)
        ).one()
        worst = [
            json.loads(doc)
            for (doc,) in conn.execute(
                select(a.document)
                .where(carried)
                .order_by(
                    case((a.kind == "low_confidence", 1), else_=0),
                    a.confidence,
                    a.created_at,
                )
                .limit(DIGEST_WORST)
            ).all()
        ]
        row = conn.execute(select(executions).where(executions.c.id == execution_id)).first()
        held = Held(
            subscription_id=sub,
            execution=None if row is None else execution_from_row(row._mapping),
            counts=counts,
            worst=worst,
            first_at=utc(first_at),
            last_at=utc(last_at),
        )
        write_alerts(conn, [planner.digest(digest_id, held)])
        written += 1
    return written


@dataclass
class Outbox:
    """The dispatcher's and `ics alerts`'s view of the outbox of one store."""

    store: Store
    _registered: set[str] = field(default_factory=set)

    def register(self, subs: Sequence[tuple[str, str, str]]) -> None:
        """Record (id, shown URL, spec) of subscriptions not yet in the store; processes
        starting at once may register the same ones."""
        rows = [
            {"id": i, "shown": shown, "spec": spec, "created_at": utcnow()}
            for i, shown, spec in subs
        ]
        if not rows:
            return
        # Imported on use: the PostgreSQL dialect took a SQLite store's commands 20 ms more.
        from sqlalchemy.dialects import postgresql, sqlite

        with self.store._begin() as conn:
            dialect = conn.dialect.name
            ignore = postgresql.insert if dialect == "postgresql" else sqlite.insert
            conn.execute(ignore(subscriptions).values(rows).on_conflict_do_nothing())

    def add(self, new: Iterable[NewAlert]) -> None:
        """Write alerts for their subscriptions (registered ones) in one transaction."""
        with self.store._begin() as conn:
            write_alerts(conn, new)

    def specs(self, ids: Sequence[str]) -> list[str]:
        """The stored specs of these subscriptions (those the store knows)."""
        s = subscriptions.c
        with self.store._connect() as conn:
            return list(conn.execute(select(s.spec).where(s.id.in_(list(ids)))).scalars())

    def anything_due(self) -> bool:
        """Whether a delivery is due now: one indexed query."""
        d = deliveries.c
        now = utcnow()
        q = (
            select(d.id)
            .where(
                d.status == DeliveryStatus.PENDING.value,
                d.next_at <= now,
                or_(d.lease_until.is_(None), d.lease_until < now),
            )
            .limit(1)
        )
        with self.store._connect() as conn:
            return conn.execute(q).first() is not None

    def due(self, *, limit: int = 50, skip: Iterable[str] = ()) -> list[Delivery]:
        """PENDING deliveries whose time has come and that nobody holds, oldest first, but
        those of the subscriptions in skip."""
        now = utcnow()
        d, a, s = deliveries.c, alerts.c, subscriptions.c
        q = (
            select(
                d.id,
                d.alert_id,
                d.subscription_id,
                d.attempts,
                a.kind,
                a.document,
                s.spec,
                s.shown,
            )
            .join(alerts, a.id == d.alert_id)
            .join(subscriptions, s.id == d.subscription_id)
            .where(
                d.status == DeliveryStatus.PENDING.value,
                d.next_at <= now,
                or_(d.lease_until.is_(None), d.lease_until < now),
                d.subscription_id.not_in(list(skip)),
            )
            .order_by(d.next_at, d.id)
            .limit(limit)
        )
        with self.store._connect() as conn:
            rows = conn.execute(q).all()
        return [
            Delivery(
                id=r.id,
                alert_id=r.alert_id,
                subscription_id=r.subscription_id,
                attempts=r.attempts,
                kind=r.kind,
                document=json.loads(r.document),
                spec=r.spec,
                shown=r.shown,
            )
            for r in rows
        ]

    def next_due_at(self) -> dt.datetime | None:
        """When the earliest PENDING delivery is due (None: nothing pending)."""
        d = deliveries.c
        with self.store._connect() as conn:
            when = conn.execute(
                select(func.min(d.next_at)).where(d.status == DeliveryStatus.PENDING.value)
            ).scalar()
        return utc(when)

    def claim(self, delivery_id: int, owner: str, lease: dt.timedelta) -> bool:
        """Take the delivery for `lease`, if it is still due and nobody holds it."""
        now = utcnow()
        d = deliveries.c
        with self.store._begin() as conn:
            changed = conn.execute(
                update(deliveries)
                .where(
                    d.id == delivery_id,
                    d.status == DeliveryStatus.PENDING.value,
                    d.next_at <= now,
                    or_(d.lease_until.is_(None), d.lease_until < now),
                )
                .values(lease_owner=owner, lease_until=now + lease)
            ).rowcount
        return bool(changed == 1)

    def _set(self, delivery_id: int, owner: str, **values: Any) -> bool:
        """Settle a delivery this owner holds; False: its lease ran out and another process
        may hold it now (that one settles it)."""
        d = deliveries.c
        with self.store._begin() as conn:
            changed = conn.execute(
                update(deliveries)
                .where(d.id == delivery_id, d.lease_owner == owner)
                .values(lease_owner=None, lease_until=None, **values)
            ).rowcount
        return bool(changed == 1)

    def sent(self, delivery_id: int, owner: str) -> bool:
        return self._set(
            delivery_id,
            owner,
            status=DeliveryStatus.SENT.value,
            sent_at=utcnow(),
            attempts=deliveries.c.attempts + 1,
        )

    def failed(
        self, delivery_id: int, owner: str, error: str, *, retry_at: dt.datetime | None
    ) -> bool:
        """Count a failed attempt: try again at retry_at, or (None) dead-letter it."""
        status = DeliveryStatus.DEAD if retry_at is None else DeliveryStatus.PENDING
        return self._set(
            delivery_id,
            owner,
            status=status.value,
            attempts=deliveries.c.attempts + 1,
            last_error=error,
            **({} if retry_at is None else {"next_at": retry_at}),
        )

    def release(self, delivery_id: int, owner: str, *, next_at: dt.datetime | None = None) -> bool:
        """Give the delivery back unsent without counting an attempt (due at next_at)."""
        return self._set(delivery_id, owner, **({} if next_at is None else {"next_at": next_at}))

    def suppress(self, delivery_id: int, owner: str) -> bool:
        return self._set(delivery_id, owner, status=DeliveryStatus.SUPPRESSED.value)

    def sent_since(self, subscription_id: str, since: dt.datetime) -> int:
        d = deliveries.c
        with self.store._connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        d.subscription_id == subscription_id,
                        d.status == DeliveryStatus.SENT.value,
                        d.sent_at > since,
                    )
                ).scalar()
                or 0
            )

    def suppressed_waiting(self) -> list[tuple[str, str, str]]:
        """(id, spec, shown) of subscriptions with suppressed deliveries no notice counted
        yet."""
        d, s = deliveries.c, subscriptions.c
        with self.store._connect() as conn:
            rows = conn.execute(
                select(d.subscription_id, s.spec, s.shown)
                .join(subscriptions, s.id == d.subscription_id)
                .where(d.status == DeliveryStatus.SUPPRESSED.value, d.rolled_into.is_(None))
                .group_by(d.subscription_id, s.spec, s.shown)
            ).all()
        return [(r[0], r[1], r[2]) for r in rows]

    def notice(self, subscription_id: str, build: Callable[[str, int], NewAlert]) -> int:
        """Count the subscription's uncounted suppressed deliveries into one notice alert
        (build(alert_id, n)); returns n."""
        d = deliveries.c
        notice_id = str(uuid.uuid4())
        with self.store._begin() as conn:
            n = conn.execute(
                update(deliveries)
                .where(
                    d.subscription_id == subscription_id,
                    d.status == DeliveryStatus.SUPPRESSED.value,
                    d.rolled_into.is_(None),
                )
                .values(rolled_into=notice_id)
            ).rowcount
            if n:
                write_alerts(conn, [build(notice_id, int(n))])
        return int(n or 0)

    def overdue_held(self, cutoff: dt.datetime) -> list[tuple[str, str]]:
        """(subscription, execution) pairs holding an alert since before cutoff, or of an
        execution that ended without rolling them up (a process without the subscription
        ended it)."""
        d, a, e = deliveries.c, alerts.c, executions.c
        with self.store._connect() as conn:
            rows = conn.execute(
                select(d.subscription_id, a.execution_id)
                .join(alerts, a.id == d.alert_id)
                .join(executions, e.id == a.execution_id)
                .where(
                    d.status == DeliveryStatus.HELD.value,
                    or_(d.created_at <= cutoff, e.status != "RUNNING"),
                )
                .group_by(d.subscription_id, a.execution_id)
            ).all()
        return [(r[0], r[1]) for r in rows if r[1] is not None]

    def roll_up(self, planner: AlertPlanner, execution_id: str, subscription_id: str) -> int:
        with self.store._begin() as conn:
            return roll_up(conn, planner, execution_id, subscription_id)

    def list(self, *, failed: bool = False, limit: int = 50) -> list[dict[str, Any]]:
        """Alerts newest first, each with its deliveries; failed: only those with a dead or
        failing delivery."""
        a, d, s = alerts.c, deliveries.c, subscriptions.c
        q = select(alerts).order_by(a.created_at.desc(), a.id.desc()).limit(limit)
        if failed:
            q = q.where(
                a.id.in_(
                    select(d.alert_id).where(
                        or_(
                            d.status == DeliveryStatus.DEAD.value,
                            and_(
                                d.status == DeliveryStatus.PENDING.value, d.last_error.is_not(None)
                            ),
                        )
                    )
                )
            )
        with self.store._connect() as conn:
            rows = conn.execute(q).all()
            ids = [r.id for r in rows]
            by_alert: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                for r in conn.execute(
                    select(deliveries, s.shown)
                    .join(subscriptions, s.id == d.subscription_id)
                    .where(d.alert_id.in_(ids))
                    .order_by(d.id)
                ).all():
                    by_alert[r.alert_id].append(
                        {
                            "subscription": r.shown,
                            "status": r.status,
                            "attempts": r.attempts,
                            "next_at": _iso(r.next_at)
                            if r.status == DeliveryStatus.PENDING.value
                            else None,
                            "sent_at": _iso(r.sent_at),
                            "last_error": r.last_error,
                            "rolled_into": r.rolled_into,
                        }
                    )
        return [
            {
                "alert_id": r.id,
                "kind": r.kind,
                "execution_id": r.execution_id,
                "item_id": None if r.item_seq is None else str(r.item_seq),
                "created_at": _iso(r.created_at),
                "document": json.loads(r.document),
                "deliveries": by_alert[r.id],
            }
            for r in rows
        ]

    def retry(self, alert_ids: Sequence[str] = ()) -> int:
        """Make dead deliveries (of these alerts, or id prefixes; none given: all) due again
        with fresh attempts; returns how many."""
        d, a = deliveries.c, alerts.c
        q = update(deliveries).where(d.status == DeliveryStatus.DEAD.value)
        if alert_ids:
            q = q.where(
                d.alert_id.in_(
                    select(a.id).where(or_(*[func.substr(a.id, 1, len(p)) == p for p in alert_ids]))
                )
            )
        with self.store._begin() as conn:
            n = conn.execute(
                q.values(
                    status=DeliveryStatus.PENDING.value,
                    attempts=0,
                    next_at=utcnow(),
                    lease_owner=None,
                    lease_until=None,
                )
            ).rowcount
        return int(n or 0)


def _iso(ts: dt.datetime | None) -> str | None:
    when = utc(ts)
    return None if when is None else when.isoformat()
