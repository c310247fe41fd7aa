"""The execution store, on both backends: SQLite (a file) and PostgreSQL (a real server).

Every test takes `store_url` (tests/store_backends.py), so the same test runs on both.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url

from ics_service.errors import ExecutionNotFound, StoreError
from ics_service.store import Store, schema
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
        assert store.schema_version() == schema.LATEST
        assert [v for v, _ in version_rows(store)] == [v for v, _ in schema.MIGRATIONS]
        insp = inspect(store.engine)
        assert {"ics_schema_version", "ics_executions", "ics_items", "ics_events"} <= set(
            insp.get_table_names()
        )
        assert {"ix_ics_items_status", "ix_ics_items_pending", "ix_ics_items_done"} <= {
            i["name"] for i in insp.get_indexes("ics_items")
        }
        assert "ix_ics_events_execution" in {i["name"] for i in insp.get_indexes("ics_events")}


def test_reopening_a_store_does_not_migrate_again(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(store_url) as store:
        e = new_execution(store, name="kept")
        store.add_items(e.id, uris(3))
        applied = version_rows(store)

    def must_not_run(conn: Any) -> None:
        raise AssertionError("a migration ran again on an up-to-date store")

    monkeypatch.setattr(schema, "MIGRATIONS", [(v, must_not_run) for v, _ in schema.MIGRATIONS])
    for _ in range(2):
        with opened(store_url) as store:
            assert store.schema_version() == schema.LATEST
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

    newer = schema.LATEST + 1
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, (newer, add_note)])
    monkeypatch.setattr(schema, "LATEST", newer)

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
    newer = schema.LATEST + 1
    shipped = list(schema.MIGRATIONS)

    def half_done(conn: Any) -> None:
        conn.execute(text("ALTER TABLE ics_executions ADD COLUMN note VARCHAR(64)"))
        raise RuntimeError("power cut in the middle of a migration")

    def whole(conn: Any) -> None:
        conn.execute(text("ALTER TABLE ics_executions ADD COLUMN note VARCHAR(64)"))

    monkeypatch.setattr(schema, "LATEST", newer)
    monkeypatch.setattr(schema, "MIGRATIONS", [*shipped, (newer, half_done)])
    with pytest.raises(RuntimeError, match="power cut"):
        Store(store_url)
    gc.collect()  # a leaked connection would warn (warnings are errors) here

    monkeypatch.setattr(schema, "MIGRATIONS", shipped)
    monkeypatch.setattr(schema, "LATEST", shipped[-1][0])
    with opened(store_url) as store:
        assert store.schema_version() == shipped[-1][0]
        assert "note" not in {
            c["name"] for c in inspect(store.engine).get_columns("ics_executions")
        }

    # The same migration, fixed, then applies cleanly: no wipe, no manual repair.
    monkeypatch.setattr(schema, "LATEST", newer)
    monkeypatch.setattr(schema, "MIGRATIONS", [*shipped, (newer, whole)])
    with opened(store_url) as store:
        assert store.schema_version() == newer
        assert store.get_execution(e.id).id == e.id


def test_refuses_a_store_with_a_newer_schema(store_url: str) -> None:
    newer = schema.LATEST + 1
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
        assert versions == [schema.LATEST] * 4
        with opened(url) as store:
            assert [v for v, _ in version_rows(store)] == [v for v, _ in schema.MIGRATIONS]


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


def test_execution_prefix_lookup(store: Store) -> None:
    a = new_execution(store, execution_id="20260101-120000-aaaaaa")
    b = new_execution(store, execution_id="20260101-120000-abbbbb")
    assert store.get_execution("20260101-120000-aaaaaa").id == a.id
    assert store.get_execution("20260101-120000-aa").id == a.id
    assert store.get_execution("20260101-120000-ab").id == b.id
    for not_one in [
        "20260101-120000-a",  # ambiguous
        "20260101-120000-c",  # no such execution
        "20260101_120000-aa",  # LIKE wildcards are plain characters
        "%-aa",
        "20260101-120000-AA",  # case matters, on SQLite as on PostgreSQL
        "",
    ]:
        with pytest.raises(ExecutionNotFound):
            store.get_execution(not_one)


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
def test_100k_items_keep_memory_flat_and_queries_indexed(store: Store, store_backend: str) -> None:
    n = 100_000
    e = new_execution(store)
    assert store.add_items(e.id, uris(n)) == n  # a generator, inserted a chunk at a time

    # Pending items: paging peaks at about 0.5 MB of Python allocations; the (seq, uri)
    # pairs of 100k items alone take 23 MB.
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
    third = Counts(total=n, succeeded=33_334, low_confidence=33_333, failed=33_333)
    assert store.counts(e.id) == third
    assert store.get_execution(e.id).counts == third

    # Results: the resident set, sampled as they stream (tracemalloc would triple the
    # time of this pass). 100k results held at once take over 200 MB.
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
    assert pending_peak < 10 * 2**20, pending_peak
    assert rss_peak - rss_before < 50 * 2**20, (rss_before, rss_peak)

    # The queries that page through a large execution read an index in order, whatever the
    # planner's statistics say: as they are after the batch (maybe stale), then fresh.
    store.add_items(e.id, uris(5, start=n), start_seq=n)
    with captured_sql(store) as sent:
        assert [i.seq for i in store.pending_items(e.id, page_size=2)] == list(range(n, n + 5))
        assert len(list(store.results(e.id, after_seq=50_000, limit=10))) == 10
        assert len(list(store.results(e.id, status=ItemStatus.FAILED, limit=10))) == 10
    queries = [(s, p) for s, p in sent if "ics_items" in s and s.lstrip().startswith("SELECT")]
    assert len(queries) >= 3, sent
    for statement, parameters in queries:
        assert_indexed(store, store_backend, statement, parameters)
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    for statement, parameters in queries:
        assert_indexed(store, store_backend, statement, parameters)
