"""The execution store: executions, their items' results and their history, over SQLAlchemy.

One code path serves SQLite (the embedded default, in WAL mode so the server and the CLI
can share one file) and PostgreSQL. Results are written as items finish, a batch per
transaction, and an item's final result is written at most once.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError

from ..errors import ExecutionNotFound, StoreError
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
from . import schema
from .schema import events, executions, items

log = logging.getLogger(__name__)

_INSERT_CHUNK = 1000


@dataclass(frozen=True)
class Event:
    id: int
    execution_id: str
    ts: dt.datetime
    type: str
    item_seq: int | None
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        from ..types import isoformat

        return {
            "id": self.id,
            "timestamp": isoformat(self.ts),
            "type": self.type,
            "item_id": None if self.item_seq is None else str(self.item_seq),
            "details": self.details,
        }


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
    )
)


def new_execution_id() -> str:
    return f"{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _utc(ts: dt.datetime | None) -> dt.datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


class Store:
    """Executions and results in a SQL database (`sqlite:///PATH` or `postgresql://...`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        try:
            self._migrate()
        except BaseException as e:
            self.engine.dispose()  # a refused store leaves no connection behind
            if isinstance(e, OperationalError):
                raise StoreError(
                    f"cannot open the execution store {self.safe_url}: {e.orig}"
                ) from None
            raise

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # --- schema ---------------------------------------------------------------------

    def _migrate(self) -> None:
        """Apply the migrations newer than the store's version, all in one transaction.

        The usual case (up to date) only reads. Otherwise the migrating transaction first
        takes a lock, so stores opened at once on a new database queue instead of racing on
        the DDL, and a migration that fails leaves the store exactly as it was.
        """
        current = self._stored_version()
        if current == schema.LATEST:
            return
        self._refuse_newer(current)
        applied = []
        with self.engine.begin() as conn:
            _lock_for_migration(conn)
            schema.schema_version.create(conn, checkfirst=True)
            current = int(
                conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0
            )
            self._refuse_newer(current)
            for version, migration in schema.MIGRATIONS:
                if version <= current:
                    continue
                migration(conn)
                conn.execute(
                    insert(schema.schema_version).values(version=version, applied_at=utcnow())
                )
                applied.append(version)
        for version in applied:
            log.info("store %s migrated to schema version %d", self.safe_url, version)

    def _stored_version(self) -> int:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(schema.schema_version.name):
                return 0
            return int(
                conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0
            )

    def _refuse_newer(self, current: int) -> None:
        if current > schema.LATEST:
            raise StoreError(
                f"the store {self.safe_url} has schema version {current}, newer than this "
                f"ICS understands ({schema.LATEST}); upgrade ICS"
            )

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0
            )

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
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(executions).values(**row))
        except IntegrityError:
            if name is not None and (existing := self.find_by_name(name)) is not None:
                return existing, False
            raise
        return self.get_execution(str(row["id"])), True

    def find_by_name(self, name: str) -> Execution | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(executions).where(executions.c.name == name)).first()
        return None if row is None else _execution(row._mapping)

    def get_execution(self, execution_id: str) -> Execution:
        with self.engine.connect() as conn:
            row = conn.execute(select(executions).where(executions.c.id == execution_id)).first()
            if row is None and execution_id:
                # Accept a unique prefix, as people copy the start of an id. Compared with
                # substr, not LIKE: `_` and `%` are plain characters, and case matters on
                # SQLite (whose LIKE ignores it) as on PostgreSQL.
                prefix = func.substr(executions.c.id, 1, len(execution_id))
                rows = conn.execute(select(executions).where(prefix == execution_id).limit(2)).all()
                if len(rows) == 1:
                    row = rows[0]
        if row is None:
            raise ExecutionNotFound(
                f"no execution {execution_id!r} in {self.safe_url} (see `ics executions list`)"
            )
        return _execution(row._mapping)

    def list_executions(
        self, *, limit: int = 50, status: ExecutionStatus | None = None
    ) -> list[Execution]:
        q = select(executions).order_by(executions.c.started_at.desc(), executions.c.id.desc())
        if status is not None:
            q = q.where(executions.c.status == status.value)
        with self.engine.connect() as conn:
            return [_execution(r._mapping) for r in conn.execute(q.limit(limit))]

    def finish_execution(
        self, execution_id: str, status: ExecutionStatus, error: ErrorInfo | None = None
    ) -> Execution:
        """Record the final status, with counts recomputed from the items themselves."""
        now = utcnow()
        with self.engine.begin() as conn:
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
        return self.get_execution(execution_id)

    def counts(self, execution_id: str) -> Counts:
        """Counts per status, recomputed from the items."""
        with self.engine.connect() as conn:
            c = _count_items(conn, execution_id)
        return Counts(c["total"], c["succeeded"], c["low_confidence"], c["failed"])

    def claim(self, execution_id: str, owner: str) -> None:
        """Mark the execution RUNNING in this process (a start or a resume)."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                _update_execution(execution_id).values(
                    status=ExecutionStatus.RUNNING.value,
                    owner=owner,
                    heartbeat_at=now,
                    updated_at=now,
                    cancel_requested=False,
                    finished_at=None,
                    error_type=None,
                    error_message=None,
                )
            )

    def heartbeat(self, execution_id: str) -> bool:
        """Say the owner is alive; returns whether a cancel was requested."""
        with self.engine.begin() as conn:
            conn.execute(_update_execution(execution_id).values(heartbeat_at=utcnow()))
            requested = conn.execute(
                select(executions.c.cancel_requested).where(executions.c.id == execution_id)
            ).scalar()
        return bool(requested)

    def request_cancel(self, execution_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                _update_execution(execution_id).values(cancel_requested=True, updated_at=utcnow())
            )

    def mark_listed(self, execution_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                _update_execution(execution_id).values(items_listed=True, updated_at=utcnow())
            )

    # --- items ----------------------------------------------------------------------

    def add_items(self, execution_id: str, uris: Iterable[str], *, start_seq: int = 0) -> int:
        """Register pending items (seq from start_seq) in chunks; returns how many were added."""
        seq = start_seq
        chunk: list[dict[str, Any]] = []

        def flush() -> None:
            if not chunk:
                return
            with self.engine.begin() as conn:
                conn.execute(insert(items), chunk)
                conn.execute(
                    _update_execution(execution_id).values(
                        total=executions.c.total + len(chunk), updated_at=utcnow()
                    )
                )
            chunk.clear()

        for uri in uris:
            chunk.append({"execution_id": execution_id, "seq": seq, "uri": uri, "attempts": 0})
            seq += 1
            if len(chunk) >= _INSERT_CHUNK:
                flush()
        flush()
        return seq - start_seq

    def pending_items(self, execution_id: str, *, page_size: int = 1000) -> Iterator[Item]:
        """Items without a final result, in order, read a page at a time (memory stays flat)."""
        after = -1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(items.c.seq, items.c.uri)
                    .where(
                        items.c.execution_id == execution_id,
                        items.c.status.is_(None),
                        items.c.seq > after,
                    )
                    .order_by(items.c.seq)
                    .limit(page_size)
                ).all()
            if not rows:
                return
            for seq, uri in rows:
                yield Item(seq=seq, uri=uri)
            after = rows[-1][0]

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
        with self.engine.begin() as conn:
            # Lock first: the execution's row (PostgreSQL), the database (SQLite, whose
            # transaction starts at the first write). Which items still lack a result is
            # then settled until commit; one batched UPDATE writes them.
            conn.execute(_update_execution(execution_id).values(updated_at=utcnow()))
            seqs = list(first)
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
            todo = [r for seq, r in first.items() if seq in pending]
            if todo:
                conn.execute(
                    _RECORD_RESULT,
                    [
                        {
                            "r_execution_id": execution_id,
                            "r_seq": int(r.item_id),
                            "r_status": r.status.value,
                            "r_attempts": r.attempts,
                            "r_result": json.dumps(r.to_dict(), separators=(",", ":")),
                            "r_finished_at": _utc(r.finished_at),
                        }
                        for r in todo
                    ],
                )
            for r in todo:
                counts.add(r.status)
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

    def results(
        self,
        execution_id: str,
        *,
        status: ItemStatus | None = None,
        after_seq: int = -1,
        limit: int | None = None,
    ) -> Iterator[ItemResult]:
        """Recorded results in item order, paged by seq (keyset), optionally of one status."""
        remaining = limit
        while remaining is None or remaining > 0:
            page = 1000 if remaining is None else min(1000, remaining)
            q = (
                select(items.c.seq, items.c.result)
                .where(
                    items.c.execution_id == execution_id,
                    items.c.seq > after_seq,
                    items.c.status.is_not(None),
                )
                .order_by(items.c.seq)
                .limit(page)
            )
            if status is not None:
                q = q.where(items.c.status == status.value)
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
            for _, result in rows:
                yield ItemResult.from_dict(json.loads(result))
            if len(rows) < page:
                return
            after_seq = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    # --- history --------------------------------------------------------------------

    def append_events(
        self, execution_id: str, batch: Iterable[tuple[str, int | None, dict[str, Any] | None]]
    ) -> None:
        """Append (type, item_seq, details) events to the execution's history."""
        rows = [
            {
                "execution_id": execution_id,
                "ts": utcnow(),
                "type": etype,
                "item_seq": seq,
                "details": None if details is None else json.dumps(details, default=str),
            }
            for etype, seq, details in batch
        ]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert(events), rows)

    def history(self, execution_id: str) -> Iterator[Event]:
        after = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(events)
                    .where(events.c.execution_id == execution_id, events.c.id > after)
                    .order_by(events.c.id)
                    .limit(1000)
                ).all()
            for r in rows:
                m = r._mapping
                yield Event(
                    id=m["id"],
                    execution_id=m["execution_id"],
                    ts=_utc(m["ts"]) or utcnow(),
                    type=m["type"],
                    item_seq=m["item_seq"],
                    details=json.loads(m["details"]) if m["details"] else {},
                )
            if len(rows) < 1000:
                return
            after = rows[-1]._mapping["id"]


def _update_execution(execution_id: str) -> Any:
    """An UPDATE of one execution's row; the caller adds `.values(...)`."""
    return update(executions).where(executions.c.id == execution_id)


def _count_items(conn: Any, execution_id: str) -> dict[str, int]:
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


def _execution(m: Any) -> Execution:
    error = None
    if m["error_type"]:
        error = ErrorInfo(type=m["error_type"], message=m["error_message"] or "")
    return Execution(
        id=m["id"],
        name=m["name"],
        status=ExecutionStatus(m["status"]),
        params=json.loads(m["params"]),
        counts=Counts(
            total=m["total"],
            succeeded=m["succeeded"],
            low_confidence=m["low_confidence"],
            failed=m["failed"],
        ),
        started_at=_utc(m["started_at"]) or utcnow(),
        finished_at=_utc(m["finished_at"]),
        error=error,
        owner=m["owner"],
        heartbeat_at=_utc(m["heartbeat_at"]),
        cancel_requested=bool(m["cancel_requested"]),
        items_listed=bool(m["items_listed"]),
    )


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(
            f"bad store URL {url!r}; use sqlite:///PATH or postgresql://USER@HOST/DB"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot open the execution store {url}: {e}") from None
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            return create_engine(parsed, pool_pre_ping=True)
        except (ImportError, NoSuchModuleError):
            raise StoreError(
                "a PostgreSQL store needs psycopg: pip install 'ics-service[postgres]'"
            ) from None
    raise StoreError(f"unsupported store {backend!r} in {url!r}; use sqlite:/// or postgresql://")


#: The PostgreSQL advisory lock that serializes migrations (any constant; per database).
_MIGRATION_LOCK = 0x1C5_5C4E


def _lock_for_migration(conn: Connection) -> None:
    """Serialize migrations, and make SQLite's DDL part of the migrating transaction."""
    if conn.dialect.name == "sqlite":
        # pysqlite opens a transaction only before INSERT/UPDATE/DELETE, so DDL would
        # otherwise commit on its own. BEGIN IMMEDIATE also takes the write lock now
        # (waiting up to busy_timeout for another migrating store).
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # Connections switching a new file to WAL at once can deadlock on the lock upgrade;
    # SQLite then fails one of them at once, without a busy wait: try again.
    for attempt in itertools.count(1):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt >= 100:
                raise
            time.sleep(min(0.01 * attempt, 0.2))
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


__all__ = ["Event", "Store", "new_execution_id"]
