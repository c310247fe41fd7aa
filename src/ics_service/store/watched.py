"""A watcher's exactly-once state: which objects it registered, as items of which execution.

One transaction takes the watcher's next micro-batch number, creates its execution (RUNNING,
owned by the caller, every item listed), registers as items the objects no earlier batch
registered, and records them in `ics_watched`. A crash before the commit leaves nothing; a
crash after it leaves an execution that a resume finishes. So an object is never lost
between "seen" and "registered", and never registered twice: the primary key of
`ics_watched` settles even two processes registering one object at once.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ..errors import UsageError
from ..types import Execution, ExecutionStatus, ModelRef, utcnow
from .connection import store_errors
from .rows import event_to_row, execution_from_row
from .schema import events, executions, items, watched, watchers
from .store import Store, new_execution_id

#: Objects looked up per query (an IN list).
_CHUNK = 500
#: Watch executions of one watcher looked at for resuming, at most.
_UNFINISHED_SCANNED = 10_000


@dataclass(frozen=True)
class Seen:
    """An object a watcher found: its item URI and what tells this state of it from others."""

    uri: str
    version: str


def batch_prefix(watcher: str) -> str:
    """The start of the execution names of a watcher's micro-batches (`watch-NAME-N`)."""
    return f"watch-{watcher}-"


class WatchState:
    """The state of one watcher (by name) in a store."""

    def __init__(self, store: Store, watcher: str) -> None:
        self.store = store
        self.watcher = watcher

    def known(self, objects: Iterable[Seen]) -> set[Seen]:
        """Which of the objects this watcher registered already."""
        wanted = list(dict.fromkeys(objects))
        found: set[Seen] = set()
        w = watched.c
        with store_errors(self.store.safe_url), self.store.engine.connect() as conn:
            for i in range(0, len(wanted), _CHUNK):
                uris = [s.uri for s in wanted[i : i + _CHUNK]]
                rows = conn.execute(
                    select(w.uri, w.version).where(w.watcher == self.watcher, w.uri.in_(uris))
                ).all()
                found.update(Seen(r.uri, r.version) for r in rows)
        return found & set(wanted)

    def executions_of(self, objects: Iterable[Seen]) -> list[str]:
        """The ids of the executions that registered these objects."""
        wanted = list(dict.fromkeys(objects))
        ids: set[str] = set()
        w = watched.c
        with store_errors(self.store.safe_url), self.store.engine.connect() as conn:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i : i + _CHUNK]
                rows = conn.execute(
                    select(w.uri, w.version, w.execution_id).where(
                        w.watcher == self.watcher, w.uri.in_([s.uri for s in chunk])
                    )
                ).all()
                ids.update(r.execution_id for r in rows if Seen(r.uri, r.version) in chunk)
        return sorted(ids)

    def register(
        self,
        objects: Sequence[Seen],
        *,
        params: dict[str, Any],
        model: ModelRef,
        threshold: float,
        owner: str,
    ) -> Execution | None:
        """The next micro-batch's execution with the objects not registered yet as its
        items, all in one transaction; None (and nothing written) when there are none."""
        fresh = list(dict.fromkeys(objects))
        with (
            store_errors(self.store.safe_url),
            self.store.engine.connect() as conn,
            conn.begin() as tx,
        ):
            # The counter's row lock (the database's on SQLite) serializes registrations
            # of one watcher, so the number, and which objects are new, are settled.
            n = self._next_batch(conn)
            while _name_taken(conn, f"{batch_prefix(self.watcher)}{n}"):
                # Taken by an execution named so before `watch-` was reserved (check_name):
                # on to the next number, or every registration would fail on it.
                n = self._next_batch(conn)
            execution_id = new_execution_id()
            now = utcnow()
            conn.execute(
                insert(executions).values(
                    id=execution_id,
                    name=f"{batch_prefix(self.watcher)}{n}",
                    status=ExecutionStatus.RUNNING.value,
                    params=json.dumps(params, default=str),
                    model_name=model.name,
                    model_version=model.version,
                    threshold=threshold,
                    total=0,
                    succeeded=0,
                    low_confidence=0,
                    failed=0,
                    started_at=now,
                    updated_at=now,
                    owner=owner,
                    heartbeat_at=now,
                    cancel_requested=False,
                    items_listed=True,
                )
            )
            added: list[Seen] = []
            for obj in fresh:
                row = {
                    "watcher": self.watcher,
                    "uri": obj.uri,
                    "version": obj.version,
                    "execution_id": execution_id,
                    "item_seq": len(added),
                    "registered_at": now,
                }
                if conn.execute(_insert_new(conn, row)).first() is not None:
                    added.append(obj)
            if not added:
                tx.rollback()
                return None
            conn.execute(
                insert(items),
                [
                    {"execution_id": execution_id, "seq": seq, "uri": s.uri, "attempts": 0}
                    for seq, s in enumerate(added)
                ],
            )
            conn.execute(
                update(executions).where(executions.c.id == execution_id).values(total=len(added))
            )
            conn.execute(
                insert(events).values(
                    **event_to_row(
                        execution_id,
                        "ExecutionStarted",
                        None,
                        {"params": params, "watcher": self.watcher},
                    )
                )
            )
        return self.store.get_execution(execution_id)

    # --- who runs the watcher, and forgetting its state ---------------------------------

    def attach(self, owner: str) -> None:
        """Record that process `owner` runs this watcher now (its heartbeat starts now)."""
        now = utcnow()
        with self.store._begin() as conn:
            conn.execute(
                _dialect(conn)
                .insert(watchers)
                .values(name=self.watcher, batches=0, created_at=now, owner=owner, heartbeat_at=now)
                .on_conflict_do_update(
                    index_elements=[watchers.c.name], set_={"owner": owner, "heartbeat_at": now}
                )
            )

    def beat(self, owner: str) -> None:
        """The heartbeat of the process running this watcher: `owner`, or `owner` again
        when another process of this watcher name stopped meanwhile (two may run at once)."""
        w = watchers.c
        with self.store._begin() as conn:
            conn.execute(
                update(watchers)
                .where(w.name == self.watcher, or_(w.owner == owner, w.owner.is_(None)))
                .values(owner=owner, heartbeat_at=utcnow())
            )

    def detach(self, owner: str) -> None:
        """Record that `owner` no longer runs this watcher."""
        w = watchers.c
        with self.store._begin() as conn:
            conn.execute(
                update(watchers)
                .where(w.name == self.watcher, w.owner == owner)
                .values(owner=None, heartbeat_at=None)
            )

    def count(self) -> int:
        """How many objects (URI and version) this watcher has registered."""
        q = select(func.count()).select_from(watched).where(watched.c.watcher == self.watcher)
        with self.store._connect() as conn:
            return int(conn.execute(q).scalar_one())

    def forget(self, gone: Callable[[str | None, dt.datetime | None], bool]) -> int:
        """Delete what this watcher registered (its ics_watched rows), so that its next
        start classifies every object again; returns how many rows. Refused (UsageError)
        while a process runs it: `gone(owner, heartbeat_at)` says whether the one recorded
        is gone. Its batch counter is kept: new micro-batches do not reuse names."""
        w = watchers.c
        with self.store._begin() as conn:
            # Takes the watcher's row lock (SQLite: the database's) first: a watcher that
            # starts meanwhile waits for this transaction, and then finds nothing.
            conn.execute(update(watchers).where(w.name == self.watcher).values(batches=w.batches))
            row = conn.execute(
                select(w.owner, w.heartbeat_at).where(w.name == self.watcher)
            ).first()
            if row is not None and row.owner is not None:
                beat = row.heartbeat_at
                if beat is not None and beat.tzinfo is None:  # SQLite keeps no zone: UTC
                    beat = beat.replace(tzinfo=dt.UTC)
                if not gone(row.owner, beat):
                    raise UsageError(
                        f"watcher {self.watcher} is running (in {row.owner}): stop it "
                        "(SIGINT or SIGTERM), then forget it"
                    )
            deleted = conn.execute(delete(watched).where(watched.c.watcher == self.watcher))
            return int(deleted.rowcount)

    def _next_batch(self, conn: Connection) -> int:
        values = {"name": self.watcher, "batches": 1, "created_at": utcnow()}
        stmt = (
            _dialect(conn)
            .insert(watchers)
            .values(**values)
            .on_conflict_do_update(
                index_elements=[watchers.c.name], set_={"batches": watchers.c.batches + 1}
            )
            .returning(watchers.c.batches)
        )
        return int(conn.execute(stmt).scalar_one())

    def unfinished(self) -> list[Execution]:
        """This watcher's micro-batch executions left with work: RUNNING ones, and ended
        ones (ABORTED by a signal, FAILED by a full disk...) with items still to run, but
        not those cancelled by request. Oldest first."""
        prefix = batch_prefix(self.watcher)
        c = executions.c
        pending = (
            select(items.c.seq)
            .where(items.c.execution_id == c.id, items.c.status.is_(None))
            .exists()
        )
        q = (
            select(executions)
            .where(
                func.substr(c.name, 1, len(prefix)) == prefix,
                or_(
                    c.status == ExecutionStatus.RUNNING.value,
                    and_(c.cancel_requested.is_(False), pending),
                ),
            )
            .order_by(c.started_at, c.id)
            .limit(_UNFINISHED_SCANNED)
        )
        with store_errors(self.store.safe_url), self.store.engine.connect() as conn:
            rows = conn.execute(q).all()
        # "watch-a-" also starts "watch-a-b-1", the batches of watcher "a-b".
        return [
            execution_from_row(r._mapping)
            for r in rows
            if str(r._mapping["name"])[len(prefix) :].isdigit()
        ]


def _name_taken(conn: Connection, name: str) -> bool:
    found = conn.execute(select(executions.c.id).where(executions.c.name == name)).first()
    return found is not None


def _dialect(conn: Connection) -> Any:
    return postgresql if conn.dialect.name == "postgresql" else sqlite


def _insert_new(conn: Connection, row: dict[str, Any]) -> Insert:
    """INSERT the row unless its key is there already (then it changes nothing); it
    returns a row only when it inserted one (rowcount is not reliable for INSERT)."""
    stmt: Insert = (
        _dialect(conn)
        .insert(watched)
        .values(**row)
        .on_conflict_do_nothing()
        .returning(watched.c.item_seq)
    )
    return stmt
