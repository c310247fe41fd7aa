"""The execution store, on both backends: SQLite (a file) and PostgreSQL (a real server).

Every test takes `store_url` (tests/store_backends.py), so the same test runs on both.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url

from cli import ics_process
from ics_service.errors import ExecutionNotFound, ExitCode, StoreError, UsageError
from ics_service.store import Store, migrations, schema
from ics_service.types import (
    Counts,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    ImageInfo,
    ItemResult,
    ItemStatus,
    ModelRef,
    Prediction,
    utcnow,
)
from store_backends import other_store_url_fixture  # noqa: F401  (the fixture other_store_url)

MODEL = ModelRef(name="efficientnet-lite0", version="1")
STATUSES = [ItemStatus.SUCCEEDED, ItemStatus.LOW_CONFIDENCE, ItemStatus.FAILED]
UTC = dt.UTC


@contextmanager
def opened(url: str) -> Iterator[Store]:
    store = Store(url)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with opened(store_url) as s:
        yield s


def new_execution(
    store: Store, *, name: str | None = None, execution_id: str | None = None, **params: Any
) -> Execution:
    e, created = store.create_execution(
        params=params or {"sources": ["photos/"]},
        model=MODEL,
        threshold=0.94,
        name=name,
        execution_id=execution_id,
    )
    assert created
    return e


def status_of(seq: int) -> ItemStatus:
    return STATUSES[seq % 3]


def make_result(
    execution_id: str,
    seq: int,
    status: ItemStatus | None = None,
    *,
    finished_at: dt.datetime | None = None,
) -> ItemResult:
    status = status_of(seq) if status is None else status
    now = utcnow()
    failed = status is ItemStatus.FAILED
    return ItemResult(
        execution_id=execution_id,
        item_id=str(seq),
        uri=f"file:///photos/{seq:06d}.jpg",
        status=status,
        threshold=0.94,
        model=MODEL,
        started_at=now,
        finished_at=finished_at or now,
        label=None if failed else "espresso",
        label_index=None if failed else 967,
        confidence=None if failed else (0.97 if status is ItemStatus.SUCCEEDED else 0.5),
        top_k=[] if failed else [Prediction("espresso", 967, 0.97), Prediction("cup", 968, 0.01)],
        error=ErrorInfo("InvalidImage", "truncated JPEG") if failed else None,
        image=None if failed else ImageInfo(640, 480, "JPEG", "ab" * 32),
        attempts=1,
        timings_ms={"decode": 1.5, "infer": 3.25},
    )


def uris(n: int, start: int = 0) -> Iterator[str]:
    return (f"file:///photos/{i:06d}.jpg" for i in range(start, start + n))


def version_rows(store: Store) -> list[tuple[int, dt.datetime]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(schema.schema_version.c.version, schema.schema_version.c.applied_at).order_by(
                schema.schema_version.c.version
            )
        ).all()
    return [(v, ts) for v, ts in rows]


def as_utc(ts: dt.datetime) -> dt.datetime:
    """A timestamp read straight from the database (naive on SQLite, which stores UTC)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def assert_utc(ts: dt.datetime | None) -> None:
    assert ts is not None
    assert ts.utcoffset() == dt.timedelta(0), ts


# --- schema and migrations --------------------------------------------------------------


def test_migrates_an_empty_store(store_url: str) -> None:
    with opened(store_url) as store:
        assert store.schema_version() == migrations.LATEST
        assert [v for v, _ in version_rows(store)] == [v for v, _ in migrations.MIGRATIONS]
        insp = inspect(store.engine)
        assert {"ics_schema_version", "ics_executions", "ics_items", "ics_events"} <= set(
            insp.get_table_names()
        )
        assert {"ix_ics_items_status", "ix_ics_items_pending", "ix_ics_items_done"} <= {
            i["name"] for i in insp.get_indexes("ics_items")
        }
        assert "ix_ics_events_execution" in {i["name"] for i in insp.get_indexes("ics_events")}


def describe_schema(engine: Engine) -> dict[str, dict[str, Any]]:
    """Tables, columns, keys and indexes of a database, as its dialect reflects them."""
    insp = inspect(engine)

    def where(index: Any) -> str | None:
        options = index.get("dialect_options", {})
        clause = options.get("sqlite_where", options.get("postgresql_where"))
        return None if clause is None else re.sub(r"[()]", "", str(clause)).strip()

    return {
        table: {
            "columns": [
                (c["name"], c["type"].compile(dialect=engine.dialect), c["nullable"])
                + (("default",) if c.get("default") else ())
                for c in insp.get_columns(table)
            ],
            "primary_key": insp.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                )
                for fk in insp.get_foreign_keys(table)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]), where(i))
                for i in insp.get_indexes(table)
                if not i.get("duplicates_constraint")  # PostgreSQL's UNIQUE (name)
            ),
        }
        for table in sorted(insp.get_table_names())
    }


def golden_v1(backend: str) -> dict[str, dict[str, Any]]:
    """The schema migration 1 builds, written out by hand: it must never change."""
    ts = "DATETIME" if backend == "sqlite" else "TIMESTAMP WITH TIME ZONE"
    double = "FLOAT" if backend == "sqlite" else "DOUBLE PRECISION"
    serial: tuple[str, ...] = () if backend == "sqlite" else ("default",)  # SERIAL's nextval
    by_execution = [(("execution_id",), "ics_executions", ("id",))]
    return {
        "ics_events": {
            "columns": [
                ("id", "INTEGER", False, *serial),
                ("execution_id", "VARCHAR(64)", False),
                ("ts", ts, False),
                ("type", "VARCHAR(64)", False),
                ("item_seq", "INTEGER", True),
                ("details", "TEXT", True),
            ],
            "primary_key": ["id"],
            "foreign_keys": by_execution,
            "unique": [],
            "indexes": [("ix_ics_events_execution", ("execution_id", "id"), False, None)],
        },
        "ics_executions": {
            "columns": [
                ("id", "VARCHAR(64)", False),
                ("name", "VARCHAR(255)", True),
                ("status", "VARCHAR(16)", False),
                ("params", "TEXT", False),
                ("model_name", "VARCHAR(128)", False),
                ("model_version", "VARCHAR(64)", False),
                ("threshold", double, False),
                ("total", "INTEGER", False),
                ("succeeded", "INTEGER", False),
                ("low_confidence", "INTEGER", False),
                ("failed", "INTEGER", False),
                ("started_at", ts, False),
                ("updated_at", ts, False),
                ("finished_at", ts, True),
                ("error_type", "VARCHAR(128)", True),
                ("error_message", "TEXT", True),
                ("owner", "VARCHAR(255)", True),
                ("heartbeat_at", ts, True),
                ("cancel_requested", "BOOLEAN", False),
                ("items_listed", "BOOLEAN", False),
            ],
            "primary_key": ["id"],
            "foreign_keys": [],
            "unique": [("name",)],
            "indexes": [("ix_ics_executions_started", ("started_at",), False, None)],
        },
        "ics_items": {
            "columns": [
                ("execution_id", "VARCHAR(64)", False),
                ("seq", "INTEGER", False),
                ("uri", "TEXT", False),
                ("status", "VARCHAR(16)", True),
                ("attempts", "INTEGER", False),
                ("result", "TEXT", True),
                ("finished_at", ts, True),
            ],
            "primary_key": ["execution_id", "seq"],
            "foreign_keys": by_execution,
            "unique": [],
            "indexes": [
                ("ix_ics_items_done", ("execution_id", "seq"), False, "status IS NOT NULL"),
                ("ix_ics_items_pending", ("execution_id", "seq"), False, "status IS NULL"),
                ("ix_ics_items_status", ("execution_id", "status", "seq"), False, None),
            ],
        },
        "ics_schema_version": {
            "columns": [("version", "INTEGER", False, *serial), ("applied_at", ts, False)],
            "primary_key": ["version"],
            "foreign_keys": [],
            "unique": [],
            "indexes": [],
        },
    }


@contextmanager
def shipped_up_to(version: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, ICS knows only the migrations up to version (an older ICS)."""
    with monkeypatch.context() as m:
        m.setattr(
            migrations, "MIGRATIONS", [(v, f) for v, f in migrations.MIGRATIONS if v <= version]
        )
        m.setattr(migrations, "LATEST", version)
        yield


def test_migration_1_builds_the_same_schema_forever(
    store_url: str, store_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Migration 1 runs fixed SQL: the tables of schema.py have changed since (migration 2
    # added ics_items.error_type), and a new store at version 1 must not see that.
    with shipped_up_to(1, monkeypatch), opened(store_url) as store:
        assert store.schema_version() == 1
        assert describe_schema(store.engine) == golden_v1(store_backend)


def test_the_tables_the_queries_use_are_the_ones_the_migrations_build(
    store_url: str, other_store_url: str
) -> None:
    # The queries see schema.py; the database is what the migrations built. Both must agree
    # (columns in the same order, types, keys, indexes), or a query would drift from the DDL.
    with opened(store_url) as store:
        migrated = describe_schema(store.engine)
    declared = create_engine(
        make_url(other_store_url).set(
            drivername="postgresql+psycopg"
            if other_store_url.startswith("postgresql")
            else "sqlite"
        )
    )
    try:
        with declared.begin() as conn:
            schema.metadata.create_all(conn)
        assert migrated == describe_schema(declared)
    finally:
        declared.dispose()


def test_registered_uris_come_from_the_uri_index_however_long_the_uri(
    store_url: str, store_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume's skip-by-URI lookup (migration 6's ix_ics_items_uri): exact matches of this
    execution only, a URI longer than a PostgreSQL btree entry included, on a store migrated
    from version 5 with its items already there."""
    long = "https://example.com/a.jpg?X-Amz-Signature=" + secrets.token_hex(4000)
    odd = "file:///photos/caf%C3%A9%20\u00fc.jpg"
    with shipped_up_to(5, monkeypatch), opened(store_url) as store:
        e = new_execution(store)
        store.add_items(e.id, [*uris(2000), odd])
    with opened(store_url) as store:
        assert store.schema_version() == migrations.LATEST
        other = new_execution(store)
        store.add_items(other.id, uris(10, start=5000))
        store.add_items(e.id, [long], start_seq=2001)
        asked = [*uris(10, start=1995), long, odd, "file:///photos/none.jpg", *uris(3, start=5000)]
        assert store.registered_uris(e.id, asked) == {*uris(5, start=1995), long, odd}
        assert store.registered_uris(other.id, asked) == set(uris(3, start=5000))
        if store_backend == "sqlite":
            with store.engine.connect() as conn:
                plan = conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT uri FROM ics_items "
                    "WHERE execution_id = ? AND uri IN (?, ?)",
                    (e.id, long, odd),
                ).all()
            assert "ix_ics_items_uri" in str(plan), plan


def test_reopening_a_store_does_not_migrate_again(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(store_url) as store:
        e = new_execution(store, name="kept")
        store.add_items(e.id, uris(3))
        applied = version_rows(store)

    def must_not_run(conn: Any) -> None:
        raise AssertionError("a migration ran again on an up-to-date store")

    monkeypatch.setattr(
        migrations, "MIGRATIONS", [(v, must_not_run) for v, _ in migrations.MIGRATIONS]
    )
    for _ in range(2):
        with opened(store_url) as store:
            assert store.schema_version() == migrations.LATEST
            assert version_rows(store) == applied
            again = store.get_execution(e.id)
            assert again.name == "kept"
            assert again.counts.total == 3


def test_upgrades_an_older_store(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened(store_url) as store:
        e = new_execution(store, name="from-v1")
        store.add_items(e.id, uris(3))
        store.record_results(e.id, [make_result(e.id, 0, ItemStatus.SUCCEEDED)])
        store.append_events(e.id, [("ExecutionStarted", None, None)])

    calls: list[int] = []

    def add_note(conn: Any) -> None:
        calls.append(1)
        conn.execute(text("ALTER TABLE ics_executions ADD COLUMN note VARCHAR(64)"))
        conn.execute(text("CREATE INDEX ix_test_note ON ics_executions (note)"))

    newer = migrations.LATEST + 1
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, (newer, add_note)])
    monkeypatch.setattr(migrations, "LATEST", newer)

    with opened(store_url) as store:
        assert store.schema_version() == newer
        assert calls == [1]
        assert "note" in {c["name"] for c in inspect(store.engine).get_columns("ics_executions")}
        # Everything written by the older version is still there and usable.
        old = store.get_execution(e.id)
        assert old.name == "from-v1"
        assert old.counts == Counts(total=3, succeeded=1)
        assert [r.item_id for r in store.results(e.id)] == ["0"]
        assert [i.seq for i in store.pending_items(e.id)] == [1, 2]
        assert [ev.type for ev in store.history(e.id)] == ["ExecutionStarted"]
        store.record_results(e.id, [make_result(e.id, 1, ItemStatus.FAILED)])
        assert store.counts(e.id) == Counts(total=3, succeeded=1, failed=1)

    with opened(store_url) as store:
        assert store.schema_version() == newer
        assert calls == [1]


def test_a_failed_migration_leaves_the_store_as_it_was(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(store_url) as store:
        e = new_execution(store)
    newer = migrations.LATEST + 1
    shipped = list(migrations.MIGRATIONS)

    def half_done(conn: Any) -> None:
        conn.execute(text("ALTER TABLE ics_executions ADD COLUMN note VARCHAR(64)"))
        raise RuntimeError("power cut in the middle of a migration")

    def whole(conn: Any) -> None:
        conn.execute(text("ALTER TABLE ics_executions ADD COLUMN note VARCHAR(64)"))

    monkeypatch.setattr(migrations, "LATEST", newer)
    monkeypatch.setattr(migrations, "MIGRATIONS", [*shipped, (newer, half_done)])
    with pytest.raises(RuntimeError, match="power cut"):
        Store(store_url)
    gc.collect()  # a leaked connection would warn (warnings are errors) here

    monkeypatch.setattr(migrations, "MIGRATIONS", shipped)
    monkeypatch.setattr(migrations, "LATEST", shipped[-1][0])
    with opened(store_url) as store:
        assert store.schema_version() == shipped[-1][0]
        assert "note" not in {
            c["name"] for c in inspect(store.engine).get_columns("ics_executions")
        }

    # The same migration, fixed, then applies cleanly: no wipe, no manual repair.
    monkeypatch.setattr(migrations, "LATEST", newer)
    monkeypatch.setattr(migrations, "MIGRATIONS", [*shipped, (newer, whole)])
    with opened(store_url) as store:
        assert store.schema_version() == newer
        assert store.get_execution(e.id).id == e.id


def test_refuses_a_store_with_a_newer_schema(store_url: str) -> None:
    newer = migrations.LATEST + 1
    with opened(store_url) as store, store.engine.begin() as conn:
        conn.execute(insert(schema.schema_version).values(version=newer, applied_at=utcnow()))
    with pytest.raises(StoreError, match=rf"schema version {newer}, newer than .*upgrade ICS"):
        Store(store_url)
    gc.collect()  # the refused store closed its connections (no ResourceWarning)


def open_at_once(url: str, n: int) -> tuple[list[int], list[BaseException]]:
    """Open n stores on url from n threads at the same moment: their versions, and errors."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []
    versions: list[int] = []

    def open_store() -> None:
        try:
            barrier.wait(timeout=30)
            with opened(url) as s:
                versions.append(s.schema_version())
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return versions, errors


def test_stores_opened_at_once_on_a_new_database_migrate_once(
    store_url: str, store_backend: str, tmp_path: Path
) -> None:
    # The server and the CLI may both create the store; on SQLite, also turning a new file
    # to WAL mode at once. Several rounds on SQLite (new files are cheap) catch the race.
    urls = [store_url]
    if store_backend == "sqlite":
        urls += [f"sqlite:///{tmp_path / f'race-{i}.db'}" for i in range(25)]
    for url in urls:
        versions, errors = open_at_once(url, 4)
        assert not errors, errors
        assert versions == [migrations.LATEST] * 4
        with opened(url) as store:
            assert [v for v, _ in version_rows(store)] == [v for v, _ in migrations.MIGRATIONS]


def test_bad_store_urls_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="bad store URL"):
        Store("::not a url::")
    with pytest.raises(StoreError, match="unsupported store"):
        Store("mysql://localhost/ics")
    with pytest.raises(StoreError, match="cannot open"):
        Store("postgresql://ics:ics@127.0.0.1:1/ics")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot open"):
        Store(f"sqlite:///{tmp_path / 'a-file' / 'store.db'}")


# --- stores that cannot be used ---------------------------------------------------------


def assert_for_people(e: StoreError, *, names: str) -> None:
    """A StoreError's message: names the store, hides its password, quotes no SQL."""
    message = str(e)
    assert names in message, message
    assert "secret" not in message, message
    for sql in ("SELECT", "INSERT", "UPDATE", "PRAGMA", "CREATE", "[SQL", "[parameters"):
        assert sql not in message, message
    assert e.exit_code == ExitCode.ENVIRONMENT


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite://", "a store must be a file, sqlite:///PATH"),
        ("sqlite:///:memory:", "a store must be a file, sqlite:///PATH"),
        ("sqlite:", "bad store URL 'sqlite:'"),
        ("notaurl", "bad store URL 'notaurl'"),
        ("postgresql://ics:secret@localhost:notaport/ics", "bad store URL"),
        ("mysql://x", "unsupported store 'mysql'"),
    ],
)
def test_a_bad_store_url_says_how_to_name_a_store(url: str, says: str) -> None:
    with pytest.raises(StoreError) as caught:
        Store(url)
    assert_for_people(caught.value, names=says)


def test_a_file_that_is_not_a_database_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match="is not a usable execution store") as caught:
        Store(f"sqlite:///{path}")
    assert_for_people(caught.value, names=str(path))
    assert "file is not a database" in str(caught.value)
    assert path.read_bytes() == garbage
    gc.collect()  # the refused store closed its connections (no ResourceWarning)


def test_a_folder_is_not_a_store(tmp_path: Path) -> None:
    for create in (True, False):
        with pytest.raises(StoreError, match="is a folder: a store must be a file") as caught:
            Store(f"sqlite:///{tmp_path}", create=create)
        assert_for_people(caught.value, names=f"sqlite:///{tmp_path / 'ics.db'}")


def test_a_read_only_store_is_read_but_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ics.db"
    with opened(f"sqlite:///{path}") as store:
        e = new_execution(store)
        store.add_items(e.id, uris(3))
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    with opened(read_only) as store:
        assert store.get_execution(e.id).counts.total == 3
        assert [i.seq for i in store.pending_items(e.id)] == [0, 1, 2]
        writes: list[Callable[[], object]] = [
            lambda: new_execution(store),
            lambda: store.add_items(e.id, uris(1)),
            lambda: store.record_results(e.id, [make_result(e.id, 0)]),
            lambda: store.request_cancel(e.id),
        ]
        for write in writes:
            with pytest.raises(StoreError, match="is read-only") as caught:
                write()
            assert_for_people(caught.value, names=read_only)
        assert store.counts(e.id) == Counts(total=3)
    # SQLite's URI is not a path: nothing named "file:" appears in the working folder.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ics.db")) == []


def test_a_read_only_store_that_needs_a_migration_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ics.db"
    with shipped_up_to(1, monkeypatch), opened(f"sqlite:///{path}"):
        pass
    with pytest.raises(StoreError, match="is read-only") as caught:
        Store(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert_for_people(caught.value, names=str(path))


def test_a_full_disk_is_a_store_error_and_loses_nothing_written(tmp_path: Path) -> None:
    with opened(f"sqlite:///{tmp_path / 'ics.db'}") as store:
        e = new_execution(store)
        store.add_items(e.id, uris(10))
        with store.engine.connect() as conn:
            pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())

        # SQLite's own cap on the file's size fails writes with its real "database or disk
        # is full" (SQLITE_FULL), as a full disk does.
        def cap(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 1}")

        event.listen(store.engine, "connect", cap)
        store.engine.dispose()  # the pooled connections predate the cap
        with pytest.raises(StoreError, match="is full") as caught:
            store.add_items(e.id, uris(20_000, start=10), start_seq=10)
        assert_for_people(caught.value, names=store.safe_url)
        assert "database or disk is full" in str(caught.value)
        event.remove(store.engine, "connect", cap)
        store.engine.dispose()
        assert store.counts(e.id).total == store.get_execution(e.id).counts.total >= 10


def test_an_unreachable_postgresql_is_a_store_error_within_seconds() -> None:
    with pytest.raises(StoreError, match="cannot open the execution store") as caught:
        Store("postgresql://ics:secret@127.0.0.1:1/ics")
    assert_for_people(caught.value, names="postgresql://ics:***@127.0.0.1:1/ics")

    # A server that accepts the connection and never answers (a hung host, a firewall):
    # the store gives up after its connect timeout instead of waiting forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://ics:secret@127.0.0.1:{silent.getsockname()[1]}/ics"
        outcome: list[BaseException] = []

        def open_store() -> None:
            try:
                Store(url).close()
            except BaseException as e:  # checked below
                outcome.append(e)

        started = time.monotonic()
        opener = threading.Thread(target=open_store, daemon=True)
        opener.start()
        opener.join(timeout=30)
        assert not opener.is_alive(), "no connect timeout: still waiting for a silent server"
        assert time.monotonic() - started < 20
        assert len(outcome) == 1 and isinstance(outcome[0], StoreError), outcome
        assert_for_people(outcome[0], names=make_url(url).render_as_string(hide_password=True))


def test_a_password_in_the_store_urls_query_is_shown_by_nothing(ics_home: Path) -> None:
    """libpq takes `?password=`: neither `ics config show` nor a store error shows it."""
    url = "postgresql://ics@127.0.0.1:1/ics?password=hunter2secret&sslmode=disable"
    env = {"ICS_STORE": url}
    shown = ics_process("config", "show", "--json", env=env)
    assert shown.returncode == ExitCode.OK, shown.stderr
    assert json.loads(shown.stdout)["settings"]["store"]["value"] == (
        "postgresql://ics@127.0.0.1:1/ics?password=***&sslmode=disable"
    )
    failed = ics_process("executions", "list", "--log-level", "debug", env=env)
    assert failed.returncode == ExitCode.ENVIRONMENT, failed.stderr
    assert "password=***" in failed.stderr
    assert "hunter2secret" not in shown.stdout + failed.stdout + failed.stderr


def test_a_store_that_does_not_exist_is_not_created_for_reading(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "yet" / "ics.db"
    for url in (f"sqlite:///{path}", f"sqlite:///file:{path}?mode=ro&uri=true"):
        with pytest.raises(StoreError) as caught:
            Store(url, create=False)
        assert str(caught.value) == (
            f"no execution store at {path}: nothing has run with this store yet "
            "(or --store/ICS_STORE points elsewhere)"
        )
    assert list(tmp_path.iterdir()) == []


def test_reading_opens_and_migrates_an_existing_store(
    store_url: str, other_store_url: str, store_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store_backend == "postgresql":
        # The database exists but holds no store: reading it must not create the tables.
        with pytest.raises(StoreError, match="no execution store in"):
            Store(other_store_url, create=False)
        with opened(other_store_url) as store:
            assert store.list_executions() == []  # still version 0, so creatable
    else:
        with pytest.raises(StoreError, match="no execution store at"):
            Store(store_url, create=False)
        assert not Path(make_url(store_url).database or "").exists()
    with shipped_up_to(1, monkeypatch), opened(store_url) as old:
        e = new_execution(old)
    with opened_for_reading(store_url) as store:
        assert store.schema_version() == migrations.LATEST
        assert store.get_execution(e.id) == e


@contextmanager
def opened_for_reading(url: str) -> Iterator[Store]:
    store = Store(url, create=False)
    try:
        yield store
    finally:
        store.close()


# --- executions -------------------------------------------------------------------------


def test_create_get_and_list_executions(store: Store) -> None:
    before = utcnow()
    e = new_execution(store, sources=["s3://bucket/photos/"], top_k=5)
    assert e.status is ExecutionStatus.RUNNING
    assert e.params == {"sources": ["s3://bucket/photos/"], "top_k": 5}
    assert e.counts == Counts()
    assert e.finished_at is None
    assert e.error is None
    assert e.name is None
    assert_utc(e.started_at)
    assert before - dt.timedelta(seconds=1) <= e.started_at <= utcnow() + dt.timedelta(seconds=1)
    assert store.get_execution(e.id) == e

    later = [new_execution(store).id for _ in range(3)]
    assert [x.id for x in store.list_executions()] == [*reversed(later), e.id]
    assert [x.id for x in store.list_executions(limit=2)] == list(reversed(later))[:2]

    store.finish_execution(later[0], ExecutionStatus.SUCCEEDED)
    assert [x.id for x in store.list_executions(status=ExecutionStatus.SUCCEEDED)] == [later[0]]
    assert [x.id for x in store.list_executions(status=ExecutionStatus.RUNNING)] == [
        later[2],
        later[1],
        e.id,
    ]
    with pytest.raises(ExecutionNotFound):
        store.get_execution("20990101-000000-ffffff")


def test_executions_are_listed_a_page_at_a_time_with_a_keyset(store: Store) -> None:
    made = [new_execution(store) for _ in range(9)]
    store.finish_execution(made[2].id, ExecutionStatus.SUCCEEDED)
    store.finish_execution(made[5].id, ExecutionStatus.SUCCEEDED)
    # Ties on started_at (several executions in one microsecond) must page by id.
    t = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    starts = [t, t, t, t, t + dt.timedelta(seconds=1), t + dt.timedelta(seconds=1)]
    starts += [t + dt.timedelta(seconds=2), t - dt.timedelta(days=1), t]
    with store.engine.begin() as conn:
        for e, when in zip(made, starts, strict=True):
            conn.execute(
                update(schema.executions)
                .where(schema.executions.c.id == e.id)
                .values(started_at=when)
            )
    expected = [
        e.id for e, _ in sorted(zip(made, starts, strict=True), key=lambda p: (p[1], p[0].id))
    ][::-1]
    assert [x.id for x in store.list_executions(limit=100)] == expected

    def pages(limit: int, status: ExecutionStatus | None = None) -> list[list[str]]:
        out: list[list[str]] = []
        before: tuple[dt.datetime, str] | None = None
        while True:
            page = store.list_executions(limit=limit, status=status, before=before)
            if not page:
                return out
            out.append([x.id for x in page])
            before = (page[-1].started_at, page[-1].id)

    for limit in (1, 2, 3, 4, 9):
        got = pages(limit)
        assert [i for page in got for i in page] == expected, limit
        assert all(len(page) == limit for page in got[:-1])
    done = {made[2].id, made[5].id}
    assert [i for page in pages(1, ExecutionStatus.SUCCEEDED) for i in page] == [
        i for i in expected if i in done
    ]
    assert [i for page in pages(2, ExecutionStatus.RUNNING) for i in page] == [
        i for i in expected if i not in done
    ]
    # The same instant in another zone is the same place in the list.
    paris = dt.timezone(dt.timedelta(hours=1))
    assert store.list_executions(limit=100, before=(t.astimezone(paris), made[3].id)) == (
        store.list_executions(limit=100, before=(t, made[3].id))
    )
    assert [x.id for x in store.list_executions(limit=100, before=(t, made[3].id))] == (
        expected[expected.index(made[3].id) + 1 :]
    )


def test_take_over_claims_only_the_execution_as_it_was_seen(store: Store) -> None:
    e = new_execution(store)
    assert e.owner is None and e.heartbeat_at is None
    assert not store.take_over(e.id, "a:1", expected_owner="x:9", expected_heartbeat=None)
    assert store.take_over(e.id, "a:1", expected_owner=None, expected_heartbeat=None)
    seen = store.get_execution(e.id)
    assert seen.owner == "a:1" and seen.heartbeat_at is not None
    assert not store.take_over(e.id, "b:2", expected_owner=None, expected_heartbeat=None)
    stale = seen.heartbeat_at - dt.timedelta(microseconds=1)
    assert not store.take_over(e.id, "b:2", expected_owner="a:1", expected_heartbeat=stale)
    # The same instant in another zone is the same heartbeat.
    paris = dt.timezone(dt.timedelta(hours=1))
    beat = seen.heartbeat_at.astimezone(paris)
    assert store.take_over(e.id, "b:2", expected_owner="a:1", expected_heartbeat=beat)
    assert not store.take_over(e.id, "c:3", expected_owner="a:1", expected_heartbeat=beat)
    assert store.get_execution(e.id).owner == "b:2"

    ended = store.finish_execution(e.id, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "x"))
    assert store.take_over(
        e.id, "c:3", expected_owner=ended.owner, expected_heartbeat=ended.heartbeat_at
    )
    again = store.get_execution(e.id)
    assert again.status is ExecutionStatus.RUNNING and again.owner == "c:3"
    assert again.finished_at is None and again.error is None
    assert not store.take_over(
        "20990101-000000-ffffff", "c:3", expected_owner=None, expected_heartbeat=None
    )


def test_execution_prefix_lookup(store: Store) -> None:
    a = new_execution(store, execution_id="20260101-120000-aaaaaa")
    b = new_execution(store, execution_id="20260101-120000-abbbbb")
    assert store.get_execution("20260101-120000-aaaaaa").id == a.id
    assert store.get_execution("20260101-120000-aa").id == a.id
    assert store.get_execution("20260101-120000-ab").id == b.id
    for not_one in [
        "20260101-120000-c",  # no such execution
        "20260101_120000-aa",  # LIKE wildcards are plain characters
        "%-aa",
        "20260101-120000-AA",  # case matters, on SQLite as on PostgreSQL
        "",
    ]:
        with pytest.raises(ExecutionNotFound):
            store.get_execution(not_one)


def test_an_ambiguous_id_prefix_names_its_matches(store: Store) -> None:
    two = ["20260101-120000-b11111", "20260101-120000-b22222"]
    seven = [f"20260101-120000-a{c * 5}" for c in "abcdefg"]
    for execution_id in [*two, *seven]:
        new_execution(store, execution_id=execution_id)

    with pytest.raises(UsageError) as caught:
        store.get_execution("20260101-120000-b")
    assert not isinstance(caught.value, ExecutionNotFound)  # it exists, more than once
    assert caught.value.exit_code == ExitCode.USAGE
    assert str(caught.value) == (
        "execution id prefix '20260101-120000-b' is ambiguous: it matches "
        "20260101-120000-b11111, 20260101-120000-b22222; give more characters"
    )
    # Many matches: the first five, then "...".
    with pytest.raises(UsageError, match=r"ambiguous") as caught:
        store.get_execution("20260101-120000-a")
    assert f"it matches {', '.join(seven[:5])}, ...; give more characters" in str(caught.value)
    assert seven[5] not in str(caught.value)
    assert store.get_execution("20260101-120000-b2").id == two[1]


def test_an_execution_is_found_by_its_name_unless_that_is_ambiguous(store: Store) -> None:
    nightly = new_execution(store, name="nightly", execution_id="20260101-120000-c11111")
    other = new_execution(store, name="2026", execution_id="20260102-120000-c22222")
    assert store.get_execution("nightly").id == nightly.id
    assert store.get_execution(nightly.id).id == nightly.id
    assert store.get_execution("20260101").id == nightly.id  # a unique start of an id
    # "2026" names one execution and starts the ids of both: which one is meant?
    with pytest.raises(UsageError) as caught:
        store.get_execution("2026")
    assert not isinstance(caught.value, ExecutionNotFound)
    assert str(caught.value) == (
        f"execution '2026' is ambiguous: it is the name of {other.id} and the start of the "
        f"id of {nightly.id}; give the full id"
    )
    with pytest.raises(ExecutionNotFound, match="no id, start of an id or name matches it"):
        store.get_execution("weekly")


def test_an_execution_name_is_used_once(store: Store) -> None:
    e, created = store.create_execution(
        params={"run": 1}, model=MODEL, threshold=0.94, name="nightly"
    )
    assert created
    again, created = store.create_execution(
        params={"run": 2}, model=MODEL, threshold=0.5, name="nightly"
    )
    assert not created
    assert again == e
    assert again.params == {"run": 1}
    assert store.find_by_name("nightly") == e
    assert store.find_by_name("weekly") is None
    # Unnamed executions never collide.
    assert new_execution(store).id != new_execution(store).id
    assert len(store.list_executions()) == 3


def test_the_same_name_from_two_threads_creates_one_execution(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both threads get past the "is this name used?" check before either inserts, so the
    # database's unique constraint, not luck, decides: one creates, the other gets it.
    barrier = threading.Barrier(2)
    checked = threading.local()
    original = Store.find_by_name

    def find_then_wait(self: Store, name: str) -> Execution | None:
        found = original(self, name)
        if not getattr(checked, "done", False):
            checked.done = True
            barrier.wait(timeout=30)
        return found

    monkeypatch.setattr(Store, "find_by_name", find_then_wait)
    with opened(store_url) as first, opened(store_url) as second:
        outcomes: list[tuple[Execution, bool]] = []
        errors: list[BaseException] = []

        def start(store: Store, run: int) -> None:
            try:
                outcomes.append(
                    store.create_execution(
                        params={"run": run}, model=MODEL, threshold=0.94, name="race"
                    )
                )
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [
            threading.Thread(target=start, args=(s, i)) for i, s in enumerate([first, second])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert sorted(created for _, created in outcomes) == [False, True]
        assert outcomes[0][0] == outcomes[1][0]
        assert [x.name for x in first.list_executions()] == ["race"]


# --- items and results ------------------------------------------------------------------


def test_add_items_and_page_through_pending_items(store: Store) -> None:
    e = new_execution(store)
    other = new_execution(store)
    assert store.add_items(e.id, uris(2500)) == 2500
    assert store.add_items(e.id, ["s3://b/x.jpg", "s3://b/y.jpg"], start_seq=2500) == 2
    assert store.add_items(e.id, []) == 0
    store.add_items(other.id, uris(10))
    assert store.get_execution(e.id).counts == Counts(total=2502)
    assert store.counts(e.id) == Counts(total=2502)

    pending = list(store.pending_items(e.id, page_size=1000))
    assert [i.seq for i in pending] == list(range(2502))
    assert pending[7].uri == "file:///photos/000007.jpg"
    assert pending[7].item_id == "7"
    assert pending[-1].uri == "s3://b/y.jpg"

    store.record_results(e.id, [make_result(e.id, s) for s in range(0, 2502, 2)])
    assert [i.seq for i in store.pending_items(e.id, page_size=7)] == list(range(1, 2502, 2))
    assert [i.seq for i in store.pending_items(other.id)] == list(range(10))
    assert list(store.pending_items(new_execution(store).id)) == []


def test_an_items_final_result_is_recorded_once(store: Store) -> None:
    e = new_execution(store)
    store.add_items(e.id, uris(10))
    first = [make_result(e.id, s) for s in range(6)]
    assert store.record_results(e.id, first) == 6

    # Items 0 and 1 already have a result: only item 6 is new.
    again = [
        make_result(e.id, 0, ItemStatus.FAILED),
        make_result(e.id, 1, ItemStatus.SUCCEEDED),
        make_result(e.id, 6, ItemStatus.LOW_CONFIDENCE),
    ]
    assert store.record_results(e.id, again) == 1
    # The same item twice in one batch: the first one wins.
    twice = [make_result(e.id, 7, ItemStatus.SUCCEEDED), make_result(e.id, 7, ItemStatus.FAILED)]
    assert store.record_results(e.id, twice) == 1
    # Items the execution does not have are not invented.
    assert store.record_results(e.id, [make_result(e.id, 99)]) == 0
    assert store.record_results(e.id, []) == 0

    stored = list(store.results(e.id))
    assert [r.to_dict() for r in stored[:6]] == [r.to_dict() for r in first]
    assert {r.item_id: r.status for r in stored} == {
        "0": ItemStatus.SUCCEEDED,
        "1": ItemStatus.LOW_CONFIDENCE,
        "2": ItemStatus.FAILED,
        "3": ItemStatus.SUCCEEDED,
        "4": ItemStatus.LOW_CONFIDENCE,
        "5": ItemStatus.FAILED,
        "6": ItemStatus.LOW_CONFIDENCE,
        "7": ItemStatus.SUCCEEDED,
    }
    expected = Counts(total=10, succeeded=3, low_confidence=3, failed=2)
    assert store.counts(e.id) == expected
    # The running counters on the execution were not double-counted either.
    assert store.get_execution(e.id).counts == expected
    assert [i.seq for i in store.pending_items(e.id)] == [8, 9]


def test_counts_and_finish_execution(store: Store) -> None:
    e = new_execution(store)
    store.add_items(e.id, uris(5))
    store.record_results(e.id, [make_result(e.id, s) for s in range(3)])
    assert store.counts(e.id) == Counts(total=5, succeeded=1, low_confidence=1, failed=1)

    # finish_execution recomputes the counts from the items, whatever the counters say.
    with store.engine.begin() as conn:
        conn.execute(
            update(schema.executions)
            .where(schema.executions.c.id == e.id)
            .values(succeeded=99, failed=0)
        )
    error = ErrorInfo("States.ExceedToleratedFailureThreshold", "2 of 5 items failed")
    done = store.finish_execution(e.id, ExecutionStatus.FAILED, error)
    assert done.status is ExecutionStatus.FAILED
    assert done.error == error
    assert done.counts == Counts(total=5, succeeded=1, low_confidence=1, failed=1)
    assert_utc(done.finished_at)
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert store.get_execution(e.id) == done

    ok = store.finish_execution(e.id, ExecutionStatus.SUCCEEDED)
    assert ok.status is ExecutionStatus.SUCCEEDED
    assert ok.error is None
    assert store.finish_execution(e.id, ExecutionStatus.ABORTED).status is ExecutionStatus.ABORTED


def failed(execution_id: str, seq: int, error_type: str) -> ItemResult:
    return dataclasses.replace(
        make_result(execution_id, seq, ItemStatus.FAILED), error=ErrorInfo(error_type, "why")
    )


def error_types(store: Store, execution_id: str) -> dict[int, str | None]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(schema.items.c.seq, schema.items.c.error_type).where(
                schema.items.c.execution_id == execution_id
            )
        ).all()
    return {seq: etype for seq, etype in rows}


def test_failure_types_count_failed_items_by_error_type(store: Store) -> None:
    e = new_execution(store)
    other = new_execution(store)
    store.add_items(e.id, uris(12))
    store.add_items(other.id, uris(2))
    kinds = ["InvalidImage", "InternalError", "InvalidImage", "SourceNotFound", "InvalidImage"]
    store.record_results(
        e.id,
        [failed(e.id, seq, kind) for seq, kind in enumerate(kinds)]
        + [make_result(e.id, seq, ItemStatus.SUCCEEDED) for seq in (5, 6)]
        + [make_result(e.id, 7, ItemStatus.LOW_CONFIDENCE)]
        + [failed(e.id, 8, "X" * 200)],  # longer than the column: kept to its width
    )
    store.record_results(other.id, [failed(other.id, 0, "InternalError")])

    expected = {"InvalidImage": 3, "InternalError": 1, "SourceNotFound": 1, "X" * 128: 1}
    assert store.failure_types(e.id) == expected
    assert next(iter(store.failure_types(e.id))) == "InvalidImage"  # most frequent first
    assert error_types(store, e.id) == {
        **{seq: kind for seq, kind in enumerate(kinds)},
        5: None,
        6: None,
        7: None,
        8: "X" * 128,
        **{seq: None for seq in range(9, 12)},  # no result yet
    }
    # An item's first result stays, error type included.
    assert store.record_results(e.id, [failed(e.id, 0, "InternalError")]) == 0
    assert store.failure_types(e.id) == expected
    assert store.failure_types(other.id) == {"InternalError": 1}
    assert store.failure_types(new_execution(store).id) == {}


def test_a_version_1_store_is_migrated_in_place_with_its_error_types(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with shipped_up_to(1, monkeypatch), opened(store_url) as old:
        e = new_execution(old)
        old.add_items(e.id, uris(4))
        # Results as version 1 wrote them: the error only inside the JSON result.
        written = [
            make_result(e.id, 0, ItemStatus.SUCCEEDED),
            failed(e.id, 1, "InvalidImage"),
            failed(e.id, 2, "InternalError"),
        ]
        with old.engine.begin() as conn:
            for r in written:
                conn.execute(
                    update(schema.items)
                    .where(
                        schema.items.c.execution_id == e.id,
                        schema.items.c.seq == int(r.item_id),
                    )
                    .values(
                        status=r.status.value,
                        attempts=1,
                        result=json.dumps(r.to_dict()),
                        finished_at=r.finished_at,
                    )
                )
        assert "error_type" not in {c["name"] for c in inspect(old.engine).get_columns("ics_items")}

    with opened(store_url) as store:
        assert [v for v, _ in version_rows(store)] == [v for v, _ in migrations.MIGRATIONS]
        columns = {c["name"]: c for c in inspect(store.engine).get_columns("ics_items")}
        assert columns["error_type"]["nullable"]
        # Migration 2 filled the new column from the results already there.
        assert error_types(store, e.id) == {0: None, 1: "InvalidImage", 2: "InternalError", 3: None}
        assert store.failure_types(e.id) == {"InternalError": 1, "InvalidImage": 1}
        assert [r.to_dict() for r in store.results(e.id)] == [r.to_dict() for r in written]
        store.record_results(e.id, [failed(e.id, 3, "InvalidImage")])
        assert store.failure_types(e.id) == {"InvalidImage": 2, "InternalError": 1}
        assert store.counts(e.id) == Counts(total=4, succeeded=1, failed=3)


def test_a_version_2_store_gains_item_metadata_and_keeps_its_items(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with shipped_up_to(2, monkeypatch), opened(store_url) as old:
        e = new_execution(old)
        old.add_items(e.id, uris(2))
        assert "metadata" not in {c["name"] for c in inspect(old.engine).get_columns("ics_items")}

    with opened(store_url) as store:
        columns = {c["name"]: c for c in inspect(store.engine).get_columns("ics_items")}
        assert columns["metadata"]["nullable"]
        store.add_items(e.id, [("file:///photos/x.jpg", {"shelf": "b", "n": 2})], start_seq=2)
        pending = list(store.pending_items(e.id))
        assert [(i.seq, i.metadata) for i in pending] == [
            (0, None),
            (1, None),
            (2, {"shelf": "b", "n": 2}),
        ]


def test_results_paged_by_status_with_a_keyset(store: Store) -> None:
    n = 2600
    e = new_execution(store)
    store.add_items(e.id, uris(n + 5))  # the last 5 never get a result
    for start in range(0, n, 500):
        store.record_results(
            e.id, [make_result(e.id, s) for s in range(start, min(start + 500, n))]
        )

    assert [int(r.item_id) for r in store.results(e.id)] == list(range(n))
    for status in STATUSES:
        got = list(store.results(e.id, status=status))
        assert [int(r.item_id) for r in got] == [s for s in range(n) if status_of(s) is status]
        assert {r.status for r in got} == {status}

    # Pages of 100 chained by the last seq of each page cover every FAILED result once.
    seen: list[int] = []
    after = -1
    while page := list(store.results(e.id, status=ItemStatus.FAILED, after_seq=after, limit=100)):
        assert len(page) <= 100
        seen += [int(r.item_id) for r in page]
        after = seen[-1]
    assert seen == [s for s in range(n) if status_of(s) is ItemStatus.FAILED]

    assert list(store.results(e.id, limit=0)) == []
    assert [int(r.item_id) for r in store.results(e.id, limit=1500)] == list(range(1500))
    assert [int(r.item_id) for r in store.results(e.id, after_seq=2590)] == list(range(2591, n))


def test_history_is_appended_and_read_in_order(store: Store) -> None:
    e = new_execution(store)
    other = new_execution(store)
    batch: list[tuple[str, int | None, dict[str, Any] | None]] = [
        (
            "MapIterationStarted" if i % 2 == 0 else "MapIterationSucceeded",
            i // 2,
            None if i % 3 else {"attempt": i},
        )
        for i in range(2100)
    ]
    store.append_events(e.id, [("ExecutionStarted", None, {"sources": ["photos/"]})])
    store.append_events(e.id, batch[:1000])
    store.append_events(other.id, [("ExecutionStarted", None, None)])
    store.append_events(e.id, batch[1000:])
    store.append_events(e.id, [])
    store.append_events(e.id, [("ExecutionSucceeded", None, None)])

    history = list(store.history(e.id))
    assert [(h.type, h.item_seq, h.details) for h in history] == [
        ("ExecutionStarted", None, {"sources": ["photos/"]}),
        *[(t, s, d or {}) for t, s, d in batch],
        ("ExecutionSucceeded", None, {}),
    ]
    ids = [h.id for h in history]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {h.execution_id for h in history} == {e.id}
    for h in history[:3]:
        assert_utc(h.ts)
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(history))
    assert history[1].to_dict() == {
        "id": history[1].id,
        "timestamp": history[1].to_dict()["timestamp"],
        "type": "MapIterationStarted",
        "item_id": "0",
        "details": {"attempt": 0},
    }
    assert history[1].to_dict()["timestamp"].endswith("Z")
    assert [h.type for h in store.history(other.id)] == ["ExecutionStarted"]
    # A page after an event id, across the store's own pages of 1000.
    assert list(store.history(e.id, after=ids[998], limit=5)) == history[999:1004]
    assert list(store.history(e.id, after=ids[-2])) == history[-1:]
    assert list(store.history(e.id, after=ids[-1])) == []


def test_timestamps_are_utc_whatever_the_session_time_zone(
    store_url: str, store_backend: str
) -> None:
    zoned_url = store_url
    if store_backend == "postgresql":
        zoned_url = (
            make_url(store_url)
            .update_query_dict({"options": "-c timezone=America/New_York"})
            .render_as_string(hide_password=False)
        )
    with opened(store_url) as store, opened(zoned_url) as zoned:
        e = new_execution(zoned)
        assert_utc(e.started_at)
        seen = store.get_execution(e.id)
        assert_utc(seen.started_at)
        assert seen.started_at == e.started_at

        # A result that finished in another time zone is stored as the same instant.
        store.add_items(e.id, uris(1))
        finished = dt.datetime(2026, 3, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        zoned.record_results(e.id, [make_result(e.id, 0, finished_at=finished)])
        with store.engine.connect() as conn:
            raw = conn.execute(select(schema.items.c.finished_at)).scalar_one()
        assert as_utc(raw) == finished
        assert next(store.results(e.id)).finished_at == finished

        done = zoned.finish_execution(e.id, ExecutionStatus.SUCCEEDED)
        assert_utc(done.finished_at)
        assert store.get_execution(e.id).finished_at == done.finished_at


# --- two stores on one database (the server and the CLI) --------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from ics_service.store import Store
    from ics_service.types import ItemResult, ItemStatus, ModelRef, utcnow

    url, execution_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(url)

    def batch(start):
        now = utcnow()
        results = [
            ItemResult(execution_id=execution_id, item_id=str(s), uri=f"u{s}",
                       status=ItemStatus.SUCCEEDED, threshold=0.94,
                       model=ModelRef("m", "1"), started_at=now, finished_at=now)
            for s in range(start, start + 100)
        ]
        store.record_results(execution_id, results)
        store.append_events(execution_id, [("MapIterationSucceeded", s, None)
                                           for s in range(start, start + 100)])

    batch(0)
    print("first batch", flush=True)
    sys.stdin.readline()
    for start in range(100, n, 100):
        batch(start)
    store.close()
    print("done", flush=True)
    """
)


def test_two_stores_on_one_database_at_once(store_url: str, store_backend: str) -> None:
    n = 3000
    with opened(store_url) as server:
        if store_backend == "sqlite":
            with server.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        e = new_execution(server)
        server.add_items(e.id, uris(n))
        # The CLI, in its own process, records results while the server reads and writes.
        cli = subprocess.Popen(
            [sys.executable, "-c", WRITER, store_url, e.id, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert cli.stdout is not None and cli.stdin is not None
            assert cli.stdout.readline().strip() == "first batch"
            # The CLI's store is open and has written; the server reads and writes meanwhile.
            assert server.counts(e.id) == Counts(total=n, succeeded=100)
            server.append_events(e.id, [("ServerSawProgress", None, {"done": 100})])
            cli.stdin.write("go\n")
            cli.stdin.flush()
            done_seen = [100]
            while cli.poll() is None:
                done_seen.append(server.counts(e.id).done)
                list(server.results(e.id, status=ItemStatus.SUCCEEDED, limit=50))
                server.list_executions()
                server.append_events(e.id, [("ServerPolled", None, None)])
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        assert cli.returncode == 0, err
        assert out.strip() == "done"
        assert done_seen == sorted(done_seen)
        assert server.counts(e.id) == Counts(total=n, succeeded=n)
        assert server.get_execution(e.id).counts == Counts(total=n, succeeded=n)
        assert [int(r.item_id) for r in server.results(e.id)] == list(range(n))
        types = [h.type for h in server.history(e.id)]
        assert types.count("MapIterationSucceeded") == n
        assert "ServerSawProgress" in types


# --- a large execution ------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def captured_sql(store: Store) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and parameters) the store sends while the block runs."""
    seen: list[tuple[str, Any]] = []

    def capture(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)


def assert_indexed(store: Store, backend: str, statement: str, parameters: Any) -> None:
    """The query reads ics_items through an index and never sorts more than a page of rows.

    On SQLite: an index, walked in seq order (no temporary sort). PostgreSQL may sort the
    few rows an index scan returns when it expects few (its planner's choice); running the
    plan (EXPLAIN ANALYZE) shows whether that stays a page's worth, as it must.
    """
    with store.engine.connect() as conn:
        if backend == "sqlite":
            steps = [
                str(row[-1])
                for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            ]
            text_plan = "\n".join(steps)
            assert any(
                "ics_items USING" in step and ("INDEX" in step or "PRIMARY KEY" in step)
                for step in steps
            ), (statement, text_plan)
            assert "TEMP B-TREE" not in text_plan, (statement, text_plan)
        else:
            raw: Any = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
            ).scalar()
            plan: list[dict[str, Any]] = raw if isinstance(raw, list) else json.loads(raw)
            nodes: list[dict[str, Any]] = []

            def walk(node: dict[str, Any]) -> None:
                nodes.append(node)
                for child in node.get("Plans", []):
                    walk(child)

            walk(plan[0]["Plan"])
            on_items = [nd["Node Type"] for nd in nodes if nd.get("Relation Name") == "ics_items"]
            assert on_items, (statement, nodes)
            assert all("Index" in kind for kind in on_items), (statement, nodes)
            for node in nodes:
                if "Sort" in node["Node Type"]:
                    sorted_rows = sum(child["Actual Rows"] for child in node["Plans"])
                    assert sorted_rows <= 1000, (statement, nodes)


@pytest.mark.slow
def test_40k_items_keep_memory_flat_and_queries_indexed(store: Store, store_backend: str) -> None:
    n = 40_000
    e = new_execution(store)
    assert store.add_items(e.id, uris(n)) == n  # a generator, inserted a chunk at a time

    # Pending items: paging peaks at about 0.5 MB of Python allocations; the (seq, uri)
    # pairs of 40k items alone take 9 MB.
    tracemalloc.start()
    try:
        expected = 0
        for item in store.pending_items(e.id):
            assert item.seq == expected
            expected += 1
        assert expected == n
        _, pending_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    for start in range(0, n, 1000):
        store.record_results(e.id, [make_result(e.id, s) for s in range(start, start + 1000)])
    third = Counts(total=n, succeeded=13_334, low_confidence=13_333, failed=13_333)
    assert store.counts(e.id) == third
    assert store.get_execution(e.id).counts == third

    # Results: the resident set, sampled as they stream (tracemalloc would triple the
    # time of this pass). 40k results held at once take over 80 MB.
    gc.collect()
    rss_before = rss_bytes()
    rss_peak = rss_before
    expected = 0
    for r in store.results(e.id):
        assert int(r.item_id) == expected
        expected += 1
        if expected % 1000 == 0:
            rss_peak = max(rss_peak, rss_bytes())
    assert expected == n
    assert sum(1 for _ in store.results(e.id, status=ItemStatus.FAILED)) == third.failed
    assert pending_peak < 2 * 2**20, pending_peak
    assert rss_peak - rss_before < 40 * 2**20, (rss_before, rss_peak)

    # The queries that page through a large execution read an index in order, whatever the
    # planner's statistics say: as they are after the batch (maybe stale), then fresh.
    store.add_items(e.id, uris(5, start=n), start_seq=n)
    with captured_sql(store) as sent:
        assert [i.seq for i in store.pending_items(e.id, page_size=2)] == list(range(n, n + 5))
        assert len(list(store.results(e.id, after_seq=20_000, limit=10))) == 10
        assert len(list(store.results(e.id, status=ItemStatus.FAILED, limit=10))) == 10
    queries = [(s, p) for s, p in sent if "ics_items" in s and s.lstrip().startswith("SELECT")]
    assert len(queries) >= 3, sent
    for statement, parameters in queries:
        assert_indexed(store, store_backend, statement, parameters)
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    for statement, parameters in queries:
        assert_indexed(store, store_backend, statement, parameters)


def test_results_by_label_and_confidence_with_a_histogram(store: Store) -> None:
    """The console's and the API's filters and orders, on the label and confidence columns."""
    e = new_execution(store)
    store.add_items(e.id, uris(30))
    confidences = [round(0.05 + 0.03 * i, 2) for i in range(30)]  # 0.05 .. 0.92, and a FAILED
    results = [
        dataclasses.replace(make_result(e.id, i, ItemStatus.LOW_CONFIDENCE), confidence=c,
                            label="cup" if i % 3 == 0 else "espresso")
        for i, c in enumerate(confidences[:-1])
    ] + [make_result(e.id, 29, ItemStatus.FAILED)]  # fmt: skip
    store.record_results(e.id, results)
    cups = list(store.results(e.id, label="cup", min_confidence=0.2, max_confidence=0.6))
    assert [r.item_id for r in cups] == ["6", "9", "12", "15", "18"]
    seen, after = [], None
    while True:
        page = store.results_by_confidence(e.id, descending=True, after=after, limit=7)
        seen += [r.confidence for r, _ in page]
        if len(page) < 7:
            break
        after = page[-1][1]
    assert seen == sorted(confidences[:-1], reverse=True)  # the FAILED one has none
    first = store.results_by_confidence(e.id, label="espresso", limit=2)
    assert [r.confidence for r, _ in first] == [0.08, 0.11]
    histogram = store.confidence_histogram(e.id, 10)
    assert sum(histogram) == 29
    assert histogram == [sum(1 for c in confidences[:-1] if int(c * 10) == b) for b in range(10)]
    assert store.label_counts(e.id, 1) == [("espresso", 19)]
