"""An execution classifies while its listing is still being registered, and a stop in the
middle of the listing is resumed exactly: every item once, none missed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import imagefiles as f
from ics_service import sources
from ics_service.config import Settings, load_settings
from ics_service.engine import ExecutionRunner
from ics_service.engine.lifecycle import record_end
from ics_service.engine.listing import BackgroundListing
from ics_service.errors import UsageError
from ics_service.models.runtime import OnnxRuntime
from ics_service.server.app import create_app
from ics_service.store import Store
from ics_service.store import store as store_module
from ics_service.types import ErrorInfo, ExecutionStatus, ItemResult, ModelRef
from serving import client_of, finished

#: Items registered in one transaction (the store's chunk, made smaller than its 1,000 here
#: to keep these runs short): the run can start after these.
FIRST_CHUNK = 100


class SlowListing:
    """Lists `total` items: the first chunk at once, then nothing more until the run has
    read some (a listing registered in full first would wait here until its deadline), then
    the rest, slowly while `slow` is set."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.reads = 0
        self.read_before_listed = False
        self.slow = threading.Event()
        self.lock = threading.Lock()
        self.data = f.jpeg()

    def list(self, spec: str) -> Iterator[str]:
        for i in range(self.total):
            if i == FIRST_CHUNK:
                deadline = time.monotonic() + 60
                while self.reads == 0:
                    assert time.monotonic() < deadline, "nothing was read while listing"
                    time.sleep(0.01)
                self.read_before_listed = True
            elif i > FIRST_CHUNK and self.slow.is_set():
                time.sleep(0.05)
            yield f"slowlist://items/{i:05d}.jpg"

    def read(self, uri: str, max_bytes: int) -> bytes:
        with self.lock:
            self.reads += 1
        return self.data


@pytest.fixture
def slow_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowListing]:
    monkeypatch.setattr(store_module, "_INSERT_CHUNK", FIRST_CHUNK)
    source = SlowListing(FIRST_CHUNK + 200)
    sources.register("slowlist", source)
    yield source
    sources.unregister("slowlist")


def runner_on(store: Store, runtime: OnnxRuntime) -> ExecutionRunner:
    settings = load_settings(None, {"threshold": 0.0, "batch_size": 16}).settings
    return ExecutionRunner(settings, store, runtime)


@pytest.mark.slow
def test_classifying_starts_before_the_listing_ends(
    ics_home: Path, runtime: OnnxRuntime, slow_listing: SlowListing
) -> None:
    store = Store(load_settings().settings.store_url)
    try:
        runner = runner_on(store, runtime)
        execution, _ = runner.start(["slowlist://items/"])
        finished = runner.run(execution)
        assert slow_listing.read_before_listed
        assert finished.status is ExecutionStatus.SUCCEEDED, finished.error
        assert finished.items_listed and finished.counts.total == slow_listing.total
        uris = [r.uri for r in store.results(execution.id)]
        assert sorted(uris) == [f"slowlist://items/{i:05d}.jpg" for i in range(slow_listing.total)]
    finally:
        store.close()


@pytest.mark.slow
def test_a_stop_in_the_middle_of_the_listing_is_resumed_exactly(
    ics_home: Path, runtime: OnnxRuntime, slow_listing: SlowListing
) -> None:
    slow_listing.slow.set()
    store = Store(load_settings().settings.store_url)
    try:
        runner = runner_on(store, runtime)
        execution, _ = runner.start(["slowlist://items/"])
        stop = threading.Event()
        seen = 0

        def on_results(results: Sequence[ItemResult]) -> None:
            nonlocal seen
            seen += len(results)
            if seen >= 20:
                stop.set()

        stopped = runner.run(execution, on_results=on_results, stop=stop)
        assert stopped.status is ExecutionStatus.ABORTED
        assert not stopped.items_listed
        assert stopped.error is not None and "while listing the sources" in stopped.error.message
        registered = stopped.counts.total
        assert FIRST_CHUNK <= registered < slow_listing.total
        assert 20 <= stopped.counts.done < registered

        slow_listing.slow.clear()
        resumer = runner_on(store, runtime)  # as `ics executions resume` would
        taken = resumer.prepare_resume(execution.id)
        # The rest is listed by the run, under its heartbeat.
        assert not taken.items_listed and taken.counts.total == registered
        finished = resumer.run(taken)
        assert finished.status is ExecutionStatus.SUCCEEDED, finished.error
        assert finished.items_listed and finished.counts.total == slow_listing.total
        uris = [r.uri for r in store.results(execution.id)]
        assert len(uris) == slow_listing.total  # each item once
        assert sorted(uris) == [f"slowlist://items/{i:05d}.jpg" for i in range(slow_listing.total)]
    finally:
        store.close()


@pytest.mark.slow
def test_a_listing_stopped_midway_with_duplicates_is_resumed_exactly(
    ics_home: Path, runtime: OnnxRuntime, slow_listing: SlowListing
) -> None:
    """The same prefix named twice: the resume's listing drops the duplicates as the first
    one did, registers only what is missing, and each item is classified once."""
    slow_listing.slow.set()
    store = Store(load_settings().settings.store_url)
    try:
        runner = runner_on(store, runtime)
        execution, _ = runner.start(["slowlist://items/", "slowlist://items/"])
        stop = threading.Event()

        def on_results(results: Sequence[ItemResult]) -> None:
            stop.set()

        stopped = runner.run(execution, on_results=on_results, stop=stop)
        assert stopped.status is ExecutionStatus.ABORTED and not stopped.items_listed
        assert runner.duplicates_dropped(execution.id) is None  # its listing did not end
        slow_listing.slow.clear()
        resumer = runner_on(store, runtime)
        finished = resumer.run(resumer.prepare_resume(execution.id))
        assert finished.status is ExecutionStatus.SUCCEEDED, finished.error
        assert finished.counts.total == slow_listing.total
        assert resumer.duplicates_dropped(execution.id) == slow_listing.total
        uris = [r.uri for r in store.results(execution.id)]
        assert sorted(uris) == [f"slowlist://items/{i:05d}.jpg" for i in range(slow_listing.total)]
        dropped = [e for e in store.history(execution.id) if e.type == "DuplicatesDropped"]
        assert [e.details for e in dropped] == [{"duplicates": slow_listing.total}]
    finally:
        store.close()


class Prefix:
    """A prefix whose keys can change between a crash and the resume."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.data = f.jpeg()

    def list(self, spec: str) -> Iterator[str]:
        for key in self.keys:
            yield f"changing://b/{key}.jpg"

    def read(self, uri: str, max_bytes: int) -> bytes:
        return self.data


def test_a_resume_registers_by_key_what_the_crash_left_unregistered(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    prefix = Prefix(["a", "c", "e", "g", "h"])
    sources.register("changing", prefix)
    store = Store(load_settings().settings.store_url)
    try:
        runner = runner_on(store, runtime)
        execution, _ = runner.start(["changing://b/"])
        # The process dies after registering a, c and e, before its listing ends.
        store.add_items(execution.id, [f"changing://b/{k}.jpg" for k in "ace"])
        crash = ErrorInfo("States.Aborted", "killed")
        record_end(store, execution.id, ExecutionStatus.ABORTED, crash)
        prefix.keys = ["a", "b", "e", "g", "h"]  # meanwhile b arrived and c went

        resumer = runner_on(store, runtime)
        finished = resumer.run(resumer.prepare_resume(execution.id))
        assert finished.status is ExecutionStatus.SUCCEEDED, finished.error
        uris = [r.uri for r in store.results(execution.id)]
        # Every registered item once (c was registered before it went), and every key
        # not registered yet (b, g, h): nothing twice, nothing skipped by a shifted count.
        assert sorted(uris) == [f"changing://b/{k}.jpg" for k in "abceg" + "h"]
        assert finished.items_listed and finished.counts.total == 6
    finally:
        store.close()
        sources.unregister("changing")


class Excluded:
    """One kept key, then keys that the selection leaves out, without end."""

    def __init__(self) -> None:
        self.listed = 0

    def list(self, spec: str) -> Iterator[str]:
        yield "excluded://b/keep.jpg"
        while True:
            self.listed += 1
            time.sleep(0.001)
            yield f"excluded://b/{self.listed}.png"

    def read(self, uri: str, max_bytes: int) -> bytes:
        return b""


def test_a_halt_stops_a_listing_between_left_out_keys(ics_home: Path) -> None:
    source = Excluded()
    sources.register("excluded", source)
    store = Store(load_settings().settings.store_url)
    try:
        execution, _ = store.create_execution(
            params={}, model=ModelRef(name="m", version="1"), threshold=0.5
        )
        halt = threading.Event()
        select = sources.Selection(include=["*.jpg"])
        listed = sources.expand_items(["excluded://b/"], select, stopped=halt.is_set)
        listing = BackgroundListing(store, execution.id, listed, halt=halt)
        listing.start()
        deadline = time.monotonic() + 30
        while source.listed < 100:
            assert time.monotonic() < deadline, "the listing did not run"
            time.sleep(0.01)
        listing.stop(10)  # no kept key comes after keep.jpg: only the raw keys can see it
        assert listing.done.is_set() and not listing.complete
        assert [i.uri for i in store.pending_items(execution.id)] == ["excluded://b/keep.jpg"]
    finally:
        store.close()
        sources.unregister("excluded")


def test_a_listing_that_fails_part_way_keeps_the_items_before_it(ics_home: Path) -> None:
    store = Store(load_settings().settings.store_url)
    try:
        execution, _ = store.create_execution(
            params={}, model=ModelRef(name="m", version="1"), threshold=0.5
        )

        def listed() -> Iterator[str]:
            yield "file:///a.jpg"
            yield "file:///b.jpg"
            raise UsageError("manifest m.csv line 4: the uri column is empty")

        with pytest.raises(UsageError, match="line 4"):
            store.add_items(execution.id, listed())
        assert [i.uri for i in store.pending_items(execution.id)] == [
            "file:///a.jpg",
            "file:///b.jpg",
        ]
        assert store.get_execution(execution.id).counts.total == 2
    finally:
        store.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_server_batch_classifies_before_its_listing_ends(
    ics_home: Path, runtime: OnnxRuntime, slow_listing: SlowListing
) -> None:
    settings = Settings(home=ics_home, allowed_sources=["slowlist://items/"], threshold=0.0)
    async with client_of(create_app(settings, runtime=runtime)) as client:
        r = await client.post("/v1/executions", json={"sources": ["slowlist://items/"]})
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        doc = await finished(client, execution_id)
    assert doc["status"] == "SUCCEEDED", doc
    assert slow_listing.read_before_listed  # the first chunk ran while the rest was listed
    assert doc["counts"]["total"] == slow_listing.total, doc
