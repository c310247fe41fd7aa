"""The Store: every read and write of executions, their items' results and their history.

Results are written as items finish, a batch per transaction, and an item's final result is
written at most once. Every method reaches the database through `_connect`/`_begin`, so any
database failure surfaces as a StoreError naming the store, never as SQL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    Row,
    Select,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError

from ..errors import ExecutionNotFound, ExecutionTaken, UsageError
from ..types import (
    Counts,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    Item,
    ItemResult,
    ItemStatus,
    ModelRef,
    utcnow,
)
from . import migrations, outbox
from .connection import file_guard, open_engine, safe_url, store_errors
from .rows import (
    Event,
    event_from_row,
    event_to_row,
    execution_from_row,
    result_from_row,
    result_to_row,
)
from .schema import events, executions, items

log = logging.getLogger(__name__)

_INSERT_CHUNK = 1000
_PAGE = 1000
#: How many matches an ambiguous id prefix names before "...".
_AMBIGUOUS_SHOWN = 5

#: One item's final result, written only while it has none (executemany; built once).
_RECORD_RESULT = (
    update(items)
    .where(
        items.c.execution_id == bindparam("r_execution_id"),
        items.c.seq == bindparam("r_seq"),
        items.c.status.is_(None),
    )
    .values(
        status=bindparam("r_status"),
        attempts=bindparam("r_attempts"),
        result=bindparam("r_result"),
        finished_at=bindparam("r_finished_at"),
        error_type=bindparam("r_error_type"),
        label=bindparam("r_label"),
        confidence=bindparam("r_confidence"),
    )
)


def new_execution_id() -> str:
    return f"{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class Store:
    """Executions and results in a SQL database (`sqlite:///PATH` or `postgresql://...`).

    With create=False a store that does not exist yet (no SQLite file, or a database without
    the ICS tables) is a StoreError instead of a new store: for commands that only read or
    change existing executions.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        #: Set by the alerts package when subscriptions exist: alerts are then written in
        #: the transactions of the results and execution ends that raise them.
        self.alert_planner: outbox.AlertPlanner | None = None
        with store_errors(self.safe_url):
            self.engine = open_engine(url, create=create)
        try:
            with store_errors(self.safe_url):
                migrations.migrate(self.engine, self.safe_url, create=create)
        except BaseException:
            self.engine.dispose()  # a refused store leaves no connection behind
            raise

    def close(self) -> None:
        self.engine.dispose()

    def verify(self) -> None:
        """StoreLost when the store's SQLite file was deleted or replaced since it was
        opened (every checkout checks it too); nothing for PostgreSQL."""
        guard = file_guard(self.engine)
        if guard is not None:
            guard.check()

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        with store_errors(self.safe_url), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with store_errors(self.safe_url), self.engine.begin() as conn:
            yield conn

    def _pages(
        self,
        query: Select[Any],
        key: Column[int],
        *,
        after: int,
        page_size: int = _PAGE,
        limit: int | None = None,
    ) -> Iterator[Row[Any]]:
        """The query's rows in key order, a page per query (keyset: `key > last seen`).

        Memory stays flat however many rows match, and each page reads an index from where
        the last one ended instead of skipping rows (OFFSET would).
        """
        remaining = limit
        while remaining is None or remaining > 0:
            page = page_size if remaining is None else min(page_size, remaining)
            with self._connect() as conn:
                rows = conn.execute(query.where(key > after).order_by(key).limit(page)).all()
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1]._mapping[key]
            if remaining is not None:
                remaining -= len(rows)

    def schema_version(self) -> int:
        with self._connect() as conn:
            return migrations.stored_version(conn)

    # --- executions -----------------------------------------------------------------

    def create_execution(
        self,
        *,
        params: dict[str, Any],
        model: ModelRef,
        threshold: float,
        name: str | None = None,
        execution_id: str | None = None,
    ) -> tuple[Execution, bool]:
        """Start a RUNNING execution; with a name already used, return that one (created=False)."""
        if name is not None:
            existing = self.find_by_name(name)
            if existing is not None:
                return existing, False
        now = utcnow()
        row = {
            "id": execution_id or new_execution_id(),
            "name": name,
            "status": ExecutionStatus.RUNNING.value,
            "params": json.dumps(params, default=str),
            "model_name": model.name,
            "model_version": model.version,
            "threshold": threshold,
            "total": 0,
            "succeeded": 0,
            "low_confidence": 0,
            "failed": 0,
            "started_at": now,
            "updated_at": now,
            "cancel_requested": False,
            "items_listed": False,
        }
        # The unique name, not the check above, settles a race between two processes: the
        # IntegrityError must reach this method before it becomes a StoreError.
        with store_errors(self.safe_url):
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(executions).values(**row))
            except IntegrityError:
                if name is not None and (existing := self.find_by_name(name)) is not None:
                    return existing, False
                raise
        return self.get_execution(str(row["id"])), True

    def find_by_name(self, name: str) -> Execution | None:
        with self._connect() as conn:
            row = conn.execute(select(executions).where(executions.c.name == name)).first()
        return None if row is None else execution_from_row(row._mapping)

    def get_execution(self, execution_id: str) -> Execution:
        """The execution with this id; else the one with this name, or the only one whose id
        starts with it (a name that is also the start of other ids is ambiguous)."""
        with self._connect() as conn:
            row = conn.execute(select(executions).where(executions.c.id == execution_id)).first()
            if row is not None:
                return execution_from_row(row._mapping)
            matches: list[Row[Any]] = []
            if execution_id:
                named = conn.execute(
                    select(executions).where(executions.c.name == execution_id)
                ).first()
                matches = [] if named is None else [named]
                # Accept a unique prefix, as people copy the start of an id. Compared with
                # substr, not LIKE: `_` and `%` are plain characters, and case matters on
                # SQLite (whose LIKE ignores it) as on PostgreSQL.
                prefix = func.substr(executions.c.id, 1, len(execution_id))
                matches += conn.execute(
                    select(executions)
                    .where(prefix == execution_id)
                    .order_by(executions.c.id)
                    .limit(_AMBIGUOUS_SHOWN + 1)
                ).all()
        matches = list({m._mapping["id"]: m for m in matches}.values())
        if len(matches) > 1:
            raise _ambiguous(execution_id, [m._mapping for m in matches])
        if not matches:
            raise ExecutionNotFound(
                f"no execution {execution_id!r} in {self.safe_url}: no id, start of an id "
                "or name matches it (see `ics executions list`)"
            )
        return execution_from_row(matches[0]._mapping)

    def list_executions(
        self,
        *,
        limit: int = 50,
        status: ExecutionStatus | None = None,
        before: tuple[dt.datetime, str] | None = None,
    ) -> list[Execution]:
        """The most recent executions first (started_at, then id, descending).

        With `before` (the started_at and id of the last one of a page), the page after it:
        a keyset read from the index, however many pages came before.
        """
        c = executions.c
        q = select(executions).order_by(c.started_at.desc(), c.id.desc())
        if status is not None:
            q = q.where(c.status == status.value)
        if before is not None:
            # As aware UTC: SQLite compares the stored UTC text, which drops the zone.
            when, last_id = before[0].astimezone(dt.UTC), before[1]
            # (started_at, id) < (when, last_id), spelt out: SQLite and PostgreSQL both
            # read it, and the equal-timestamp case keeps ties in id order.
            q = q.where(or_(c.started_at < when, and_(c.started_at == when, c.id < last_id)))
        with self._connect() as conn:
            return [execution_from_row(r._mapping) for r in conn.execute(q.limit(limit))]

    def finish_execution(
        self, execution_id: str, status: ExecutionStatus, error: ErrorInfo | None = None
    ) -> Execution:
        """Record the final status, with counts recomputed from the items themselves."""
        now = utcnow()
        with self._begin() as conn:
            counts = _count_items(conn, execution_id)
            conn.execute(
                _update_execution(execution_id).values(
                    status=status.value,
                    finished_at=now,
                    updated_at=now,
                    error_type=None if error is None else error.type,
                    error_message=None if error is None else error.message,
                    **counts,
                )
            )
            if self.alert_planner is not None:
                row = conn.execute(
                    select(executions).where(executions.c.id == execution_id)
                ).first()
                if row is not None:
                    ended = execution_from_row(row._mapping)
                    outbox.write_alerts(conn, self.alert_planner.for_end(ended))
                outbox.roll_up(conn, self.alert_planner, execution_id)
        return self.get_execution(execution_id)

    def counts(self, execution_id: str) -> Counts:
        """Counts per status, recomputed from the items."""
        with self._connect() as conn:
            c = _count_items(conn, execution_id)
        return Counts(c["total"], c["succeeded"], c["low_confidence"], c["failed"])

    def failure_types(self, execution_id: str) -> dict[str, int]:
        """How many items FAILED with each error type, most frequent first."""
        n = func.count().label("n")
        with self._connect() as conn:
            rows = conn.execute(
                select(items.c.error_type, n)
                .where(
                    items.c.execution_id == execution_id,
                    items.c.status == ItemStatus.FAILED.value,
                )
                .group_by(items.c.error_type)
                .order_by(n.desc(), items.c.error_type)
            ).all()
        # A FAILED item without a type can only come from a result written without one.
        return {etype or "Unknown": count for etype, count in rows}

    def claim(self, execution_id: str, owner: str) -> None:
        """Mark the execution RUNNING in this process (a start or a resume)."""
        with self._begin() as conn:
            conn.execute(_update_execution(execution_id).values(**_claimed_by(owner)))

    def take_over(
        self,
        execution_id: str,
        owner: str,
        *,
        expected_owner: str | None,
        expected_heartbeat: dt.datetime | None,
    ) -> bool:
        """Claim the execution (as `claim`) only if its owner and heartbeat are still the
        ones the caller saw; returns whether it did.

        Of processes taking over one execution at once, one wins: the UPDATE locks the row
        (SQLite: the database), and the others' condition no longer holds once it commits.
        """
        c = executions.c
        beat = None if expected_heartbeat is None else expected_heartbeat.astimezone(dt.UTC)
        with self._begin() as conn:
            changed = conn.execute(
                _update_execution(execution_id)
                .where(
                    c.owner.is_not_distinct_from(expected_owner),
                    c.heartbeat_at.is_not_distinct_from(beat),
                )
                .values(**_claimed_by(owner))
            ).rowcount
        return bool(changed == 1)

    def heartbeat(self, execution_id: str, owner: str | None = None) -> bool:
        """Say the owner is alive; returns whether a cancel was requested. With `owner`:
        only while that owner holds the execution, else ExecutionTaken (another process
        took it over while this one went unheard)."""
        with self._begin() as conn:
            beat = _update_execution(execution_id)
            if owner is not None:
                beat = beat.where(executions.c.owner == owner)
            changed = conn.execute(beat.values(heartbeat_at=utcnow())).rowcount
            if owner is not None and changed != 1:
                raise ExecutionTaken(
                    f"execution {execution_id} was taken over by another process while "
                    f"{owner} went unheard: {owner} stops running it"
                )
            requested = conn.execute(
                select(executions.c.cancel_requested).where(executions.c.id == execution_id)
            ).scalar()
        return bool(requested)

    def request_cancel(self, execution_id: str) -> None:
        with self._begin() as conn:
            conn.execute(
                _update_execution(execution_id).values(cancel_requested=True, updated_at=utcnow())
            )

    def mark_listed(self, execution_id: str) -> None:
        with self._begin() as conn:
            conn.execute(
                _update_execution(execution_id).values(items_listed=True, updated_at=utcnow())
            )

    # --- items ----------------------------------------------------------------------

    def add_items(
        self,
        execution_id: str,
        uris: Iterable[str | tuple[str, dict[str, Any] | None]],
        *,
        start_seq: int = 0,
    ) -> int:
        """Register pending items (seq from start_seq) in chunks; returns how many were added.

        An item is its URI, or (URI, metadata) for one read from a manifest."""
        seq = start_seq
        chunk: list[dict[str, Any]] = []

        def flush() -> None:
            if not chunk:
                return
            if all(row["metadata"] is None for row in chunk):
                # Plain listings write what they always wrote.
                for row in chunk:
                    del row["metadata"]
            with self._begin() as conn:
                conn.execute(insert(items), chunk)
                conn.execute(
                    _update_execution(execution_id).values(
                        total=executions.c.total + len(chunk), updated_at=utcnow()
                    )
                )
            chunk.clear()

        entries = iter(uris)
        while True:
            try:
                entry = next(entries)
            except StopIteration:
                break
            except BaseException:
                # A listing that fails part-way (a bad manifest row) keeps the items before it.
                flush()
                raise
            uri, meta = (entry, None) if isinstance(entry, str) else entry
            chunk.append(
                {
                    "execution_id": execution_id,
                    "seq": seq,
                    "uri": uri,
                    "attempts": 0,
                    "metadata": None if meta is None else json.dumps(meta),
                }
            )
            seq += 1
            if len(chunk) >= _INSERT_CHUNK:
                flush()
        flush()
        return seq - start_seq

    def registered_uris(self, execution_id: str, uris: Sequence[str]) -> set[str]:
        """Which of uris the execution has registered as items (through ix_ics_items_uri:
        on PostgreSQL it indexes md5(uri), so the query looks up the digests)."""
        wanted = set(uris)
        if self.engine.dialect.name == "postgresql":
            digests = [hashlib.md5(u.encode("utf-8", "surrogatepass")).hexdigest() for u in wanted]
            match = func.md5(items.c.uri).in_(digests)
        else:
            match = items.c.uri.in_(list(wanted))
        q = select(items.c.uri).where(items.c.execution_id == execution_id, match)
        with self._connect() as conn:
            # The digests match what was asked for (an MD5 collision would add a stranger).
            return {row.uri for row in conn.execute(q)} & wanted

    def pending_items(
        self, execution_id: str, *, page_size: int = _PAGE, after: int = -1
    ) -> Iterator[Item]:
        """Items without a final result, in order (after seq `after`), read a page at a time
        (memory stays flat)."""
        q = select(items.c.seq, items.c.uri, items.c.metadata).where(
            items.c.execution_id == execution_id, items.c.status.is_(None)
        )
        for row in self._pages(q, items.c.seq, after=after, page_size=page_size):
            meta = None if row.metadata is None else json.loads(row.metadata)
            yield Item(seq=row.seq, uri=row.uri, metadata=meta)

    def record_results(self, execution_id: str, results: Sequence[ItemResult]) -> int:
        """Write final results in one transaction; an item that already has one keeps it.

        Returns how many were written. The same item twice in `results`: the first wins.
        """
        if not results:
            return 0
        first: dict[int, ItemResult] = {}
        for r in results:
            first.setdefault(int(r.item_id), r)
        counts = Counts()
        with self._begin() as conn:
            # Lock first: the execution's row (PostgreSQL), the database (SQLite, whose
            # transaction starts at the first write). Which items still lack a result is
            # then settled until commit; one batched UPDATE writes them.
            conn.execute(_update_execution(execution_id).values(updated_at=utcnow()))
            pending = _still_pending(conn, execution_id, list(first))
            todo = [r for seq, r in first.items() if seq in pending]
            if todo:
                conn.execute(
                    _RECORD_RESULT,
                    [{"r_execution_id": execution_id, **result_to_row(r)} for r in todo],
                )
            for r in todo:
                counts.add(r.status)
            if self.alert_planner is not None and todo:
                outbox.write_alerts(conn, self.alert_planner.for_results(execution_id, todo))
            conn.execute(
                _update_execution(execution_id).values(
                    succeeded=executions.c.succeeded + counts.succeeded,
                    low_confidence=executions.c.low_confidence + counts.low_confidence,
                    failed=executions.c.failed + counts.failed,
                )
            )
        if len(todo) < len(results):
            log.warning(
                "%d of %d results for %s not recorded: their items already had one (or do "
                "not exist)",
                len(results) - len(todo),
                len(results),
                execution_id,
            )
        return counts.done

    def append_results(self, execution_id: str, results: Sequence[ItemResult]) -> None:
        """Add finished items (real-time requests) with their results, in one transaction.

        Each result gets the execution's next item id (set on it), so any number of
        processes may append to one execution.
        """
        if not results:
            return
        counts = Counts()
        with self._begin() as conn:
            # Lock the execution's row first: the next seq is then settled until commit.
            conn.execute(_update_execution(execution_id).values(updated_at=utcnow()))
            last = conn.execute(
                select(func.max(items.c.seq)).where(items.c.execution_id == execution_id)
            ).scalar()
            rows = []
            for seq, r in enumerate(results, start=-1 if last is None else int(last)):
                r.item_id = str(seq + 1)
                row = {k[2:]: v for k, v in result_to_row(r).items()}
                rows.append({"execution_id": execution_id, "uri": r.uri, **row})
                counts.add(r.status)
            conn.execute(insert(items), rows)
            if self.alert_planner is not None:
                outbox.write_alerts(conn, self.alert_planner.for_results(execution_id, results))
            conn.execute(
                _update_execution(execution_id).values(
                    total=executions.c.total + len(rows),
                    succeeded=executions.c.succeeded + counts.succeeded,
                    low_confidence=executions.c.low_confidence + counts.low_confidence,
                    failed=executions.c.failed + counts.failed,
                )
            )

    def results(
        self,
        execution_id: str,
        *,
        status: ItemStatus | None = None,
        after_seq: int = -1,
        limit: int | None = None,
        label: str | None = None,
        min_confidence: float | None = None,
        max_confidence: float | None = None,
    ) -> Iterator[ItemResult]:
        """Recorded results in item order, paged by seq (keyset), optionally of one status,
        one label, and a confidence range (inclusive)."""
        q = _filtered(
            select(items.c.seq, items.c.result), execution_id, status, label,
            min_confidence, max_confidence,
        )  # fmt: skip
        for row in self._pages(q, items.c.seq, after=after_seq, limit=limit):
            yield result_from_row(row._mapping)

    def results_by_confidence(
        self,
        execution_id: str,
        *,
        descending: bool = False,
        after: tuple[float, int] | None = None,
        limit: int = 100,
        status: ItemStatus | None = None,
        label: str | None = None,
        min_confidence: float | None = None,
        max_confidence: float | None = None,
    ) -> list[tuple[ItemResult, tuple[float, int]]]:
        """A page of the results that have a confidence, least (or most) confident first,
        each with the cursor that the next page starts after (keyset on confidence, seq)."""
        q = _filtered(
            select(items.c.seq, items.c.confidence, items.c.result), execution_id, status,
            label, min_confidence, max_confidence,
        ).where(items.c.confidence.is_not(None))  # fmt: skip
        key = tuple_(items.c.confidence, items.c.seq)
        if after is not None:
            q = q.where(key < tuple_(*after) if descending else key > tuple_(*after))
        if descending:
            q = q.order_by(items.c.confidence.desc(), items.c.seq.desc())
        else:
            q = q.order_by(items.c.confidence, items.c.seq)
        with self._connect() as conn:
            rows = conn.execute(q.limit(limit)).all()
        return [(result_from_row(r._mapping), (float(r.confidence), int(r.seq))) for r in rows]

    def confidence_histogram(self, execution_id: str, bins: int = 20) -> list[int]:
        """How many of the execution's results have a confidence in each of `bins` equal
        ranges of 0..1 (1.0 itself in the last)."""
        scaled = items.c.confidence * bins
        # SQLite's CAST truncates; PostgreSQL's rounds, and it has floor (SQLite may not).
        whole = (
            cast(scaled, Integer) if self.engine.dialect.name == "sqlite" else func.floor(scaled)
        )
        b = case((items.c.confidence >= 1.0, bins - 1), else_=whole).label("b")
        q = (
            select(b, func.count())
            .where(items.c.execution_id == execution_id, items.c.confidence.is_not(None))
            .group_by(b)
        )
        counts = [0] * bins
        with self._connect() as conn:
            for i, n in conn.execute(q).all():
                counts[int(i)] += int(n)
        return counts

    def label_counts(self, execution_id: str, limit: int = 10) -> list[tuple[str, int]]:
        """The execution's most frequent labels, with how many results have each."""
        n = func.count().label("n")
        q = (
            select(items.c.label, n)
            .where(items.c.execution_id == execution_id, items.c.label.is_not(None))
            .group_by(items.c.label)
            .order_by(n.desc(), items.c.label)
            .limit(limit)
        )
        with self._connect() as conn:
            return [(str(label), int(count)) for label, count in conn.execute(q).all()]

    # --- history --------------------------------------------------------------------

    def append_events(
        self, execution_id: str, batch: Iterable[tuple[str, int | None, dict[str, Any] | None]]
    ) -> None:
        """Append (type, item_seq, details) events to the execution's history."""
        rows = [event_to_row(execution_id, *e) for e in batch]
        if rows:
            with self._begin() as conn:
                conn.execute(insert(events), rows)

    def history(
        self,
        execution_id: str,
        *,
        after: int = 0,
        limit: int | None = None,
        item_seq: int | None = None,
        execution_level: bool = False,
    ) -> Iterator[Event]:
        """Events oldest first, paged by event id (keyset): those after the id `after`;
        with `item_seq`, only that item's; with `execution_level`, only the execution's own
        (started, listed, ended), not its items'."""
        q = select(events).where(events.c.execution_id == execution_id)
        if item_seq is not None:
            q = q.where(events.c.item_seq == item_seq)
        if execution_level:
            q = q.where(events.c.item_seq.is_(None))
        for row in self._pages(q, events.c.id, after=after, limit=limit):
            yield event_from_row(row._mapping)


def _filtered(
    q: Select[Any],
    execution_id: str,
    status: ItemStatus | None,
    label: str | None,
    min_confidence: float | None,
    max_confidence: float | None,
) -> Select[Any]:
    """The query over an execution's recorded results, narrowed by the filters given."""
    q = q.where(items.c.execution_id == execution_id, items.c.status.is_not(None))
    if status is not None:
        q = q.where(items.c.status == status.value)
    if label is not None:
        q = q.where(items.c.label == label)
    if min_confidence is not None:
        q = q.where(items.c.confidence >= min_confidence)
    if max_confidence is not None:
        q = q.where(items.c.confidence <= max_confidence)
    return q


def _update_execution(execution_id: str) -> Any:
    """An UPDATE of one execution's row; the caller adds `.values(...)`."""
    return update(executions).where(executions.c.id == execution_id)


def _claimed_by(owner: str) -> dict[str, Any]:
    """The columns of an execution that `owner` runs from now on (a start or a resume)."""
    now = utcnow()
    return {
        "status": ExecutionStatus.RUNNING.value,
        "owner": owner,
        "heartbeat_at": now,
        "updated_at": now,
        "cancel_requested": False,
        "finished_at": None,
        "error_type": None,
        "error_message": None,
    }


def _still_pending(conn: Connection, execution_id: str, seqs: list[int]) -> set[int]:
    """Which of these items have no final result yet, locking their rows until commit."""
    pending: set[int] = set()
    for i in range(0, len(seqs), _INSERT_CHUNK):
        pending.update(
            conn.execute(
                select(items.c.seq)
                .where(
                    items.c.execution_id == execution_id,
                    items.c.seq.in_(seqs[i : i + _INSERT_CHUNK]),
                    items.c.status.is_(None),
                )
                .with_for_update()
            ).scalars()
        )
    return pending


def _count_items(conn: Connection, execution_id: str) -> dict[str, int]:
    rows = conn.execute(
        select(items.c.status, func.count())
        .where(items.c.execution_id == execution_id)
        .group_by(items.c.status)
    ).all()
    by_status = {status: n for status, n in rows}
    return {
        "total": sum(by_status.values()),
        "succeeded": by_status.get(ItemStatus.SUCCEEDED.value, 0),
        "low_confidence": by_status.get(ItemStatus.LOW_CONFIDENCE.value, 0),
        "failed": by_status.get(ItemStatus.FAILED.value, 0),
    }


def _ambiguous(ref: str, rows: list[Any]) -> UsageError:
    """Several executions answer to `ref`: the start of their ids, or the name of one."""
    named = [str(r["id"]) for r in rows if r["name"] == ref]
    ids = [str(r["id"]) for r in rows if r["name"] != ref]
    shown = ", ".join(ids[:_AMBIGUOUS_SHOWN]) + (", ..." if len(ids) > _AMBIGUOUS_SHOWN else "")
    if not named:
        return UsageError(
            f"execution id prefix {ref!r} is ambiguous: it matches {shown}; give more characters"
        )
    return UsageError(
        f"execution {ref!r} is ambiguous: it is the name of {named[0]} and the start of the "
        f"id of {shown}; give the full id"
    )
