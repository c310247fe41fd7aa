"""`ics watch`: new files classified in micro-batches, each exactly once, across restarts
and `kill -9`; files still being written are read only when complete; polling, by choice
and when filesystem events cannot be had. Real files, the real model, real processes."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cli import ICS_BIN, ics
from ics_service.config import Settings
from ics_service.engine import watch as watch_module
from ics_service.engine.execution import ExecutionRunner, execution_params
from ics_service.engine.feeds import FolderFeed, feed_for
from ics_service.engine.lifecycle import record_end
from ics_service.engine.watch import Watcher, default_name
from ics_service.errors import EnvironmentUnavailable, ExitCode, StoreError
from ics_service.models.runtime import OnnxRuntime
from ics_service.store import Store
from ics_service.store.schema import executions, items, watchers
from ics_service.store.watched import Seen, WatchState
from ics_service.types import ErrorInfo, Execution, ExecutionStatus, ModelRef
from receivers import webhook_receiver
from serving import serve_process

#: Most seconds a test waits for the watcher to get somewhere.
DEADLINE_S = 120.0


def watch_items(store_url: str, watcher: str) -> list[dict[str, Any]]:
    """Every item of the watcher's micro-batch executions: uri, status, result, execution."""
    store = opened(store_url)
    if store is None:
        return []
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(items.c.uri, items.c.status, items.c.result, executions.c.name)
                .join(executions, executions.c.id == items.c.execution_id)
                .where(executions.c.name.like(f"watch-{watcher}-%"))
            ).all()
    finally:
        store.close()
    return [
        {
            "uri": r.uri,
            "status": r.status,
            "result": None if r.result is None else json.loads(r.result),
            "execution": r.name,
        }
        for r in rows
    ]


def all_classified(store_url: str, watcher: str, n: int) -> bool:
    """Whether the watcher has registered exactly n items and each has its result, read in
    one query: two reads could see the earlier batch finished, then a new batch's pending
    items."""
    found = watch_items(store_url, watcher)
    return len(found) == n and all(i["status"] for i in found)


def batch_executions(store_url: str, watcher: str) -> list[Execution]:
    store = opened(store_url)
    if store is None:
        return []
    try:
        return [
            e
            for e in store.list_executions(limit=10_000)
            if (e.name or "").startswith(f"watch-{watcher}-")
        ]
    finally:
        store.close()


def opened(store_url: str) -> Store | None:
    """The watcher's store, or None while the watcher has not created it yet."""
    try:
        return Store(store_url, create=False)
    except StoreError:
        return None


def wait_for(what: str, check: Any, deadline_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {deadline_s} s"
        time.sleep(0.1)


def copies(photos: Path, folder: Path, n: int, start: int = 0) -> list[Path]:
    """n distinct image files in folder: hard links to the photos under new names."""
    originals = sorted(photos.iterdir())
    made = []
    for i in range(start, start + n):
        src = originals[i % len(originals)]
        dst = folder / f"{i:04d}-{src.name}"
        os.link(src, dst)
        made.append(dst)
    return made


def watch_process(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(ICS_BIN), "watch", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            # A background job of a non-interactive shell starts with SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


# --- the state in the store -------------------------------------------------------------


def test_the_watch_state_registers_each_object_once(store_url: str) -> None:
    store = Store(store_url)
    try:
        state = WatchState(store, "w")
        model = ModelRef("m", "1")

        def register(*uris: str) -> Execution | None:
            return state.register(
                [Seen(u, "v1") for u in uris],
                params={"sources": ["/in"]},
                model=model,
                threshold=0.5,
                owner="test:1",
            )

        first = register("/in/a.jpg", "/in/b.jpg", "/in/a.jpg")
        assert first is not None
        assert first.name == "watch-w-1"
        assert first.status is ExecutionStatus.RUNNING and first.items_listed
        assert first.counts.total == 2
        assert [i.uri for i in store.pending_items(first.id)] == ["/in/a.jpg", "/in/b.jpg"]
        assert [e.type for e in store.history(first.id)] == ["ExecutionStarted"]

        # Nothing new: no execution, and the batch number is not used up.
        assert register("/in/b.jpg", "/in/a.jpg") is None
        second = register("/in/b.jpg", "/in/c.jpg")
        assert second is not None and second.name == "watch-w-2"
        assert [i.uri for i in store.pending_items(second.id)] == ["/in/c.jpg"]
        assert state.known([Seen("/in/a.jpg", "v1"), Seen("/in/a.jpg", "v2")]) == {
            Seen("/in/a.jpg", "v1")
        }
        assert state.executions_of([Seen("/in/c.jpg", "v1"), Seen("/in/a.jpg", "v1")]) == sorted(
            [first.id, second.id]
        )
        # Another watcher has a state of its own.
        other = WatchState(store, "w-x").register(
            [Seen("/in/a.jpg", "v1")], params={}, model=model, threshold=0.5, owner="test:1"
        )
        assert other is not None and other.name == "watch-w-x-1"
        assert [e.name for e in state.unfinished()] == ["watch-w-1", "watch-w-2"]

        # Threads registering overlapping objects at once: each object once in all.
        uris = [f"/in/{i:03d}.jpg" for i in range(60)]
        made: list[Execution | None] = []

        def racer(k: int) -> None:
            own = Store(store_url)
            try:
                made.append(
                    WatchState(own, "race").register(
                        [Seen(u, "v1") for u in uris[k * 10 : k * 10 + 40]],
                        params={},
                        model=model,
                        threshold=0.5,
                        owner="test:1",
                    )
                )
            finally:
                own.close()

        threads = [threading.Thread(target=racer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        registered = [i.uri for e in made if e is not None for i in store.pending_items(e.id)]
        assert sorted(registered) == uris
        assert sorted(e.name or "" for e in made if e is not None) == [
            f"watch-race-{n}" for n in range(1, len([e for e in made if e]) + 1)
        ]
    finally:
        store.close()


# --- the command ----------------------------------------------------------------------


def test_once_classifies_what_is_there_and_never_again(
    ics_home: Path, photos: Path, inbox: Path
) -> None:
    for p in sorted(photos.iterdir()):
        shutil.copy(p, inbox / p.name)
    (inbox / ".partial.jpg").write_bytes(b"hidden files are not watched")
    args = ["watch", str(inbox), "--once", "--settle", "0", "--max-items", "4", "--json"]
    args += ["--threshold", "0.2", "--tolerated-failure-percentage", "100"]

    res = ics(*args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    n = len(list(photos.iterdir()))
    assert [doc["counts"]["total"] for doc in lines] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    name = default_name([str(inbox)])
    assert [doc["name"] for doc in lines] == [f"watch-{name}-{i + 1}" for i in range(len(lines))]
    assert all(doc["status"] == "SUCCEEDED" and not doc["resumed"] for doc in lines)
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    found = watch_items(store_url, name)
    assert sorted(i["uri"] for i in found) == sorted(str(inbox / p.name) for p in photos.iterdir())
    coffee = next(i["result"] for i in found if i["uri"].endswith("coffee.jpg"))
    assert coffee["label"] == "espresso"
    # Each micro-batch has its results file, as `ics classify` writes one.
    for doc in lines:
        assert len(Path(doc["results"]).read_text().splitlines()) == doc["counts"]["total"]

    again = ics(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout == ""
    assert len(watch_items(store_url, name)) == n

    # A new file, and one replaced with new content: those two only.
    shutil.copy(photos / "camera.jpg", inbox / "new-camera.jpg")
    shutil.copy(photos / "camera.jpg", inbox / "coffee.jpg")
    os.utime(inbox / "coffee.jpg", (time.time() - 10, time.time() - 10))
    third = ics(*args)
    assert third.exit_code == 0, third.output
    (doc,) = [json.loads(line) for line in third.stdout.splitlines()]
    assert doc["counts"]["total"] == 2
    latest = [i for i in watch_items(store_url, name) if i["execution"] == doc["name"]]
    assert sorted(Path(i["uri"]).name for i in latest) == ["coffee.jpg", "new-camera.jpg"]
    camera = next(i["result"]["label"] for i in found if i["uri"].endswith("/camera.jpg"))
    assert {i["result"]["label"] for i in latest} == {camera}


def test_bad_sources_and_names_are_usage_errors(ics_home: Path, tmp_path: Path) -> None:
    res = ics("watch", str(tmp_path / "missing"), "--once")
    assert res.exit_code == 2
    assert "cannot watch" in res.output and "does not exist" in res.output
    (tmp_path / "f.jpg").write_bytes(b"x")
    res = ics("watch", str(tmp_path / "f.jpg"), "--once")
    assert res.exit_code == 2 and "is not a folder" in res.output
    res = ics("watch", "gs://bucket/prefix/", "--once")
    assert res.exit_code == 2 and "only local folders" in res.output
    res = ics("watch", str(tmp_path), "--name", "no spaces", "--once")
    assert res.exit_code == 2 and "bad watcher name" in res.output
    res = ics("watch", str(tmp_path), "--max-items", "0", "--once")
    assert res.exit_code == 2 and "--max-items" in res.output


@pytest.mark.slow
def test_files_added_while_it_runs_are_classified_once(
    ics_home: Path, photos: Path, inbox: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    copies(photos, inbox, 3)
    log = tmp_path / "watch.log"
    proc = watch_process(
        str(inbox), "--name", "live", "--settle", "0.3", "--max-wait", "0.5", "--json", log=log
    )
    try:
        wait_for("first batch", lambda: len(watch_items(store_url, "live")) == 3)
        added = copies(photos, inbox, 5, start=3)
        (inbox / "sub").mkdir()
        added += copies(photos, inbox / "sub", 4, start=8)
        wait_for("every file classified", lambda: all_classified(store_url, "live", 12))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    found = watch_items(store_url, "live")
    counts = Counter(i["uri"] for i in found)
    assert set(counts.values()) == {1}
    assert {str(p) for p in added} <= set(counts)
    out = log.read_text()
    assert "stopped between micro-batches" in out
    batches = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sum(b["counts"]["total"] for b in batches) == 12


@pytest.mark.slow
def test_a_kill_9_in_the_middle_misses_none_and_repeats_none(
    ics_home: Path, photos: Path, inbox: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    first = copies(photos, inbox, 400)
    log = tmp_path / "watch.log"
    args = ["--name", "crash", "--settle", "0", "--max-items", "100", "--polling"]
    proc = watch_process(str(inbox), *args, "--poll-interval", "0.2", log=log)
    try:

        def results_in_a_running_batch() -> bool:
            running = {
                e.name for e in batch_executions(store_url, "crash") if not e.status.finished
            }
            return any(
                i["status"] and i["execution"] in running for i in watch_items(store_url, "crash")
            )

        wait_for("results in a running micro-batch", results_in_a_running_batch)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    before = watch_items(store_url, "crash")
    assert 0 < sum(1 for i in before if i["status"]) < len(first)
    # While it was down, more files arrived.
    later = copies(photos, inbox, 50, start=400)

    res = subprocess.run(
        [str(ICS_BIN), "watch", str(inbox), *args, "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode in (0, 1), res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert any(doc["resumed"] for doc in lines), res.stdout
    found = watch_items(store_url, "crash")
    counts = Counter(i["uri"] for i in found)
    assert sorted(counts) == sorted(str(p) for p in first + later)
    assert set(counts.values()) == {1}, [u for u, n in counts.items() if n > 1]
    assert all(i["status"] for i in found)
    assert all(e.status.finished for e in batch_executions(store_url, "crash"))


def test_watch_batches_flag_low_confidence_items_and_fail_only_when_asked(
    ics_home: Path, photos: Path, inbox: Path
) -> None:
    """A real `ics watch --once` and a real receiver: micro-batches whose only findings are
    LOW_CONFIDENCE items SUCCEED and send no execution_failed alert; with
    `--low-confidence fail` they FAIL, alert it, and the exit status says so."""
    for p in sorted(photos.iterdir()):
        shutil.copy(p, inbox / p.name)
    for rule in ("flag", "fail"):
        with webhook_receiver() as receiver:
            args = [str(ICS_BIN), "watch", str(inbox), "--once", "--settle", "0", "--json"]
            args += ["--name", rule, "--notify", receiver.url, "--low-confidence", rule]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
            lines = [json.loads(line) for line in proc.stdout.splitlines()]
            low = sum(doc["counts"]["LOW_CONFIDENCE"] for doc in lines)
            failed = [doc for doc in lines if doc["status"] == "FAILED"]
            docs = receiver.wait_for(low + len(failed))
            time.sleep(0.5)  # and nothing more
            kinds = Counter(d["kind"] for d in receiver.docs())
        assert low > 0 and sum(doc["counts"]["FAILED"] for doc in lines) == 0, lines
        assert len(docs) == low + len(failed)
        if rule == "flag":
            assert proc.returncode == 0, proc.stderr
            assert {doc["status"] for doc in lines} == {"SUCCEEDED"}
            assert kinds == {"low_confidence": low}
        else:
            assert proc.returncode == 1, proc.stderr
            assert failed and all(doc["counts"]["LOW_CONFIDENCE"] for doc in failed)
            assert kinds == {"low_confidence": low, "execution_failed": len(failed)}


# --- completeness and polling, in process ----------------------------------------------


@pytest.fixture
def runner(ics_home: Path, runtime: OnnxRuntime) -> Iterator[ExecutionRunner]:
    settings = Settings(
        home=ics_home,
        threshold=0.2,
        tolerated_failure_percentage=100.0,
        watch_settle_s=1.0,
        watch_max_wait_s=0.2,
        watch_poll_interval_s=0.2,
    )
    store = Store(settings.store_url)
    try:
        yield ExecutionRunner(settings, store, runtime)
    finally:
        store.close()


def running(watcher: Watcher) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def test_a_file_written_slowly_is_read_only_when_complete(
    runner: ExecutionRunner, photos: Path, inbox: Path
) -> None:
    data = (photos / "coffee.jpg").read_bytes()
    feed = feed_for(str(inbox), settle_s=1.0, poll_s=0.2, polling=False)
    watcher = Watcher(runner, "slow", [feed])
    stop, thread = running(watcher)
    try:
        target = inbox / "coffee-slow.jpg"
        chunks = 12
        step = len(data) // chunks + 1
        with target.open("wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i : i + step])
                f.flush()
                time.sleep(0.3)  # 3.6 s in all: many settle checks see it half-written
        wait_for("the slow file's result", lambda: watcher.executions)
    finally:
        stop.set()
        thread.join(DEADLINE_S)
    found = watch_items(runner.settings.store_url, "slow")
    assert len(found) == 1
    result = found[0]["result"]
    assert result["status"] == "SUCCEEDED", result
    assert result["label"] == "espresso"
    assert result["image"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_polling_finds_files_added_while_it_runs(
    runner: ExecutionRunner, photos: Path, inbox: Path
) -> None:
    feed = feed_for(str(inbox), settle_s=0.0, poll_s=0.2, polling=True)
    watcher = Watcher(runner, "polled", [feed])
    stop, thread = running(watcher)
    try:
        made = copies(photos, inbox, 3)
        wait_for("3 results", lambda: sum(e.counts.total for e in watcher.executions) == 3)
        assert isinstance(feed, FolderFeed) and feed.polling
        made += copies(photos, inbox, 2, start=3)
        wait_for("5 results", lambda: sum(e.counts.total for e in watcher.executions) == 5)
    finally:
        stop.set()
        thread.join(DEADLINE_S)
    assert not thread.is_alive()
    found = watch_items(runner.settings.store_url, "polled")
    assert sorted(i["uri"] for i in found) == sorted(str(p) for p in made)


def test_without_filesystem_events_it_falls_back_to_polling(
    runner: ExecutionRunner, photos: Path, inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    feed = FolderFeed(str(inbox), settle_s=0.0, poll_s=0.2, polling=False)
    # No file descriptor left: inotify cannot start, as when its instance limit is reached.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        feed.start(lambda: None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert feed.polling
    assert "cannot watch" in caplog.text and "listing it every 0.2 s instead" in caplog.text
    watcher = Watcher(runner, "fallback", [feed])
    stop, thread = running(watcher)
    try:
        made = copies(photos, inbox, 2)
        wait_for("2 results", lambda: sum(e.counts.total for e in watcher.executions) == 2)
    finally:
        stop.set()
        thread.join(DEADLINE_S)
    found = watch_items(runner.settings.store_url, "fallback")
    assert sorted(i["uri"] for i in found) == sorted(str(p) for p in made)


# --- recovery: what a restart must finish, and what it must leave ------------------------


def left_batch(runner: ExecutionRunner, watcher: str, uris: list[str], **params: Any) -> Execution:
    """A micro-batch registered as `ics watch` registers one, left for a restart."""
    s = runner.settings
    execution = WatchState(runner.store, watcher).register(
        [Seen(u, "v1") for u in uris],
        params=execution_params(s, ["/in"], watcher=watcher, **params),
        model=runner.model_ref,
        threshold=s.threshold,
        owner=runner.owner,
    )
    assert execution is not None
    return execution


class FullDisk:
    """A results sink whose disk is full."""

    def write(self, results: Any) -> None:
        raise EnvironmentUnavailable("No space left on device")

    def close(self) -> None:
        pass


def test_a_batch_failed_by_a_full_disk_is_finished_by_the_next_start(
    runner: ExecutionRunner, photos: Path, inbox: Path
) -> None:
    # Results recorded one at a time: the first write fails with most items still to run.
    one_by_one = runner.settings.model_copy(update={"batch_size": 1})
    runner = ExecutionRunner(one_by_one, runner.store, runner.runtime)
    made = copies(photos, inbox, 12)
    feed = feed_for(str(inbox), settle_s=0.0, poll_s=0.2, polling=True)
    failing = Watcher(runner, "disk", [feed], sinks=lambda _e: [FullDisk()])
    with pytest.raises(EnvironmentUnavailable):
        failing.run(threading.Event(), once=True)
    (left,) = batch_executions(runner.settings.store_url, "disk")
    assert left.status is ExecutionStatus.FAILED
    assert [i.uri for i in runner.store.pending_items(left.id)]

    feed = feed_for(str(inbox), settle_s=0.0, poll_s=0.2, polling=True)
    ran = Watcher(runner, "disk", [feed]).run(threading.Event(), once=True)
    assert [e.id for e in ran] == [left.id]
    found = watch_items(runner.settings.store_url, "disk")
    assert sorted(i["uri"] for i in found) == sorted(str(p) for p in made)
    assert all(i["status"] for i in found)


def test_a_batch_left_running_by_a_process_with_the_same_pid_is_resumed(
    runner: ExecutionRunner, photos: Path
) -> None:
    # A container restarted: same host name, same PID (1), heartbeat seconds old.
    left = left_batch(runner, "samepid", [str(photos / "coffee.jpg")])
    ran = Watcher(runner, "samepid", []).run(threading.Event(), once=True)
    assert [e.id for e in ran] == [left.id]
    assert ran[0].status is ExecutionStatus.SUCCEEDED
    assert "ExecutionResumed" in [e.type for e in runner.store.history(left.id)]


def test_a_batch_of_a_watcher_that_dies_later_is_resumed_while_it_runs(
    runner: ExecutionRunner, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another watcher of this name runs a batch, alive when this one starts.
    other = subprocess.Popen(["sleep", "60"])
    try:
        left = left_batch(runner, "two", [str(photos / "coffee.jpg")])
        runner.store.take_over(
            left.id,
            f"{socket.gethostname()}:{other.pid}",
            expected_owner=left.owner,
            expected_heartbeat=left.heartbeat_at,
        )
        monkeypatch.setattr(watch_module, "STALE_AFTER_SECONDS", 0.5)  # how often it looks
        watcher = Watcher(runner, "two", [])
        stop, thread = running(watcher)
        try:
            time.sleep(1.0)
            assert not watcher.executions  # being run by the other one
            other.kill()
            other.wait(30)
            # Within a few looks, however long the watcher's own rescan interval is.
            wait_for("the dead watcher's batch", lambda: watcher.executions, deadline_s=10)
        finally:
            stop.set()
            thread.join(DEADLINE_S)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert [e.id for e in watcher.executions] == [left.id]
    assert watcher.executions[0].status is ExecutionStatus.SUCCEEDED


def test_a_cancelled_batch_stays_cancelled(runner: ExecutionRunner, photos: Path) -> None:
    left = left_batch(runner, "cancelled", [str(photos / "coffee.jpg")])
    runner.store.request_cancel(left.id)
    record_end(runner.store, left.id, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "x"))
    # And one whose process died before it saw the cancel: ended, not run.
    dead = subprocess.Popen(["true"])
    dead.wait()
    died = left_batch(runner, "cancelled", [str(photos / "camera.jpg")])
    runner.store.take_over(
        died.id,
        f"{socket.gethostname()}:{dead.pid}",
        expected_owner=died.owner,
        expected_heartbeat=died.heartbeat_at,
    )
    runner.store.request_cancel(died.id)
    assert Watcher(runner, "cancelled", []).run(threading.Event(), once=True) == []
    for execution_id in (left.id, died.id):
        after = runner.store.get_execution(execution_id)
        assert after.status is ExecutionStatus.ABORTED
        assert after.counts.done == 0


def test_a_resumed_batch_runs_with_the_settings_it_was_started_with(
    runner: ExecutionRunner, photos: Path
) -> None:
    strict = runner.settings.model_copy(update={"threshold": 0.999})
    started = ExecutionRunner(strict, runner.store, runner.runtime)
    left = left_batch(started, "recorded", [str(photos / "coffee.jpg")])
    record_end(runner.store, left.id, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "x"))
    (done,) = Watcher(runner, "recorded", []).run(threading.Event(), once=True)
    assert done.id == left.id
    (result,) = runner.store.results(left.id)
    assert result.threshold == 0.999
    assert result.status.value == "LOW_CONFIDENCE"  # espresso at 0.96 < 0.999


class SlowDisk:
    """A results sink that takes `seconds` over its first write."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def write(self, results: Any) -> None:
        time.sleep(self.seconds)
        self.seconds = 0.0

    def close(self) -> None:
        pass


def test_files_left_over_from_a_full_batch_wait_no_longer_than_max_wait(
    runner: ExecutionRunner, photos: Path, inbox: Path
) -> None:
    settings = runner.settings.model_copy(update={"watch_max_items": 2, "watch_max_wait_s": 2.0})
    runner = ExecutionRunner(settings, runner.store, runner.runtime)
    copies(photos, inbox, 3)
    feed = feed_for(str(inbox), settle_s=0.0, poll_s=0.2, polling=True)
    slow = SlowDisk(3.0)  # the first batch ends after the leftover file's --max-wait
    watcher = Watcher(runner, "leftover", [feed], sinks=lambda _e: [slow])
    stop, thread = running(watcher)
    try:
        wait_for("2 batches", lambda: len(watcher.executions) == 2)
    finally:
        stop.set()
        thread.join(DEADLINE_S)
    first, second = watcher.executions
    assert [first.counts.total, second.counts.total] == [2, 1]
    assert first.finished_at is not None
    # Not another --max-wait after the first batch: it was due while that one ran.
    assert (second.started_at - first.finished_at).total_seconds() < 1.5


def test_an_execution_named_like_a_batch_neither_blocks_the_watcher_nor_can_be_made(
    runner: ExecutionRunner, ics_home: Path, photos: Path
) -> None:
    # Made before `watch-` was reserved: the watcher goes on to the next number.
    runner.store.create_execution(
        params={"sources": []}, model=runner.model_ref, threshold=0.5, name="watch-taken-1"
    )
    batch = left_batch(runner, "taken", [str(photos / "coffee.jpg")])
    assert batch.name == "watch-taken-2"
    res = ics("classify", str(photos), "--name", "watch-taken-3")
    assert res.exit_code == 2
    assert "kept for the micro-batches" in res.output


def test_default_names_do_not_depend_on_how_a_prefix_is_written() -> None:
    names = {default_name([s]) for s in ["s3://photos/in", "s3://photos/in/", "S3://photos/in/"]}
    assert len(names) == 1
    assert default_name(["s3://photos/in2"]) not in names


@pytest.mark.slow
def test_a_batch_cancelled_by_request_is_no_interrupt_and_stays_cancelled(
    ics_home: Path, photos: Path, inbox: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    copies(photos, inbox, 600)
    log = tmp_path / "watch.log"
    args = ["--name", "cancel", "--settle", "0", "--max-items", "600", "--once", "--json"]
    proc = watch_process(str(inbox), *args, log=log)
    try:

        def a_running_batch() -> Execution | None:
            return next(
                (e for e in batch_executions(store_url, "cancel") if not e.status.finished), None
            )

        batch = wait_for("a running micro-batch", a_running_batch)
        store = Store(store_url, create=False)
        try:
            store.request_cancel(batch.id)  # as `ics executions cancel` does
        finally:
            store.close()
        code = proc.wait(DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()  # no signal stopped it: not 130
    (cancelled,) = batch_executions(store_url, "cancel")
    assert cancelled.status is ExecutionStatus.ABORTED
    assert cancelled.counts.done < cancelled.counts.total

    res = ics("watch", str(inbox), *args)
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # not resumed: it was cancelled
    (after,) = batch_executions(store_url, "cancel")
    assert after.status is ExecutionStatus.ABORTED


@pytest.mark.slow
def test_two_watchers_of_one_name_classify_each_file_once(
    ics_home: Path, photos: Path, inbox: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    made = copies(photos, inbox, 300)
    args = ["--name", "pair", "--settle", "0", "--max-items", "50", "--once", "--polling"]
    args += ["--tolerated-failure-percentage", "100"]
    procs = [watch_process(str(inbox), *args, log=tmp_path / f"watch-{n}.log") for n in range(2)]
    try:
        codes = [p.wait(300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], [(tmp_path / f"watch-{n}.log").read_text() for n in range(2)]
    found = watch_items(store_url, "pair")
    counts = Counter(i["uri"] for i in found)
    assert sorted(counts) == sorted(str(p) for p in made)
    assert set(counts.values()) == {1}
    assert all(i["status"] for i in found)


def test_batches_start_while_a_huge_first_poll_is_still_looked_up(
    runner: ExecutionRunner, photos: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "_LOOKUP_SLICE", 2)  # 6 files: 3 slices of lookups
    settings = runner.settings.model_copy(update={"watch_max_items": 2})
    runner = ExecutionRunner(settings, runner.store, runner.runtime)
    copies(photos, inbox, 6)
    feed = feed_for(str(inbox), settle_s=0.0, poll_s=0.2, polling=True)
    order: list[str] = []
    watcher = Watcher(runner, "slices", [feed], on_batch=lambda _e, _r: order.append("batch"))
    looked_up = watcher.state.known

    def known(objects: Any) -> set[Seen]:
        order.append("lookup")
        return looked_up(objects)

    monkeypatch.setattr(watcher.state, "known", known)
    watcher.run(threading.Event(), once=True)
    assert order == ["lookup", "batch"] * 3


def test_watch_captures_and_alerts_like_classify(ics_home: Path, photos: Path, inbox: Path) -> None:
    """--capture and --notify work on the micro-batches as on `ics classify`."""
    from ics_service.capture.reader import iter_records

    for p in sorted(photos.iterdir()):
        shutil.copy(p, inbox / p.name)
    (inbox / "broken.jpg").write_bytes(b"not a jpeg")
    alerts = ics_home / "alerts.jsonl"
    capture = ics_home / "capture"
    res = ics(
        "watch", str(inbox), "--once", "--settle", "0", "--json",
        "--tolerated-failure-percentage", "100",
        "--capture", str(capture), "--notify", f"file://{alerts}",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    classified = sum(d["counts"]["total"] - d["counts"]["FAILED"] for d in docs)
    assert len(list(iter_records(capture))) == classified == len(list(photos.iterdir()))
    kinds = [json.loads(line)["kind"] for line in alerts.read_text().splitlines()]
    assert kinds.count("item_failed") == 1
    assert kinds.count("low_confidence") == sum(d["counts"]["LOW_CONFIDENCE"] for d in docs)


# --- ics watch forget -------------------------------------------------------------------------


def watched_rows(store_url: str, watcher: str) -> int:
    store = Store(store_url, create=False)
    try:
        return WatchState(store, watcher).count()
    finally:
        store.close()


def watcher_owner(store_url: str, watcher: str) -> str | None:
    """The process the store says runs the watcher."""
    store = Store(store_url, create=False)
    try:
        with store.engine.connect() as conn:
            owner = conn.execute(
                select(watchers.c.owner).where(watchers.c.name == watcher)
            ).scalar()
        return None if owner is None else str(owner)
    finally:
        store.close()


def forget(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ICS_BIN), "watch", "forget", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_watch_forget_resets_a_stopped_watcher_and_refuses_a_running_one(
    ics_home: Path, photos: Path, inbox: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    copies(photos, inbox, 3)
    once = [str(ICS_BIN), "watch", str(inbox), "--name", "w", "--settle", "0", "--once"]
    done = subprocess.run(once, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert watched_rows(store_url, "w") == 3

    # Without a terminal, only --yes confirms.
    res = forget("w")
    assert res.returncode == ExitCode.USAGE, res.stderr
    assert "deletes what it registered (3 files): confirm with --yes" in res.stderr
    assert watched_rows(store_url, "w") == 3

    # A running watcher of that name: refused, whatever the confirmation.
    log = tmp_path / "watch.log"
    proc = watch_process(str(inbox), "--name", "w", "--settle", "0", log=log)
    try:
        wait_for("the watcher to start", lambda: watcher_owner(store_url, "w"))
        res = forget("w", "--yes")
        assert res.returncode == ExitCode.USAGE, res.stderr
        assert f"watcher w is running (in {socket.gethostname()}:{proc.pid})" in res.stderr
        assert watched_rows(store_url, "w") == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert watcher_owner(store_url, "w") is None  # it recorded that it stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Stopped: forgotten, and the next start classifies the files again.
    res = forget("w", "--yes")
    assert res.returncode == 0, res.stderr
    assert "watcher w: forgot 3 registered files" in res.stdout
    assert watched_rows(store_url, "w") == 0
    done = subprocess.run(once, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert watched_rows(store_url, "w") == 3
    assert len(watch_items(store_url, "w")) == 6  # two micro-batches of the same 3 files
    assert {e.name for e in batch_executions(store_url, "w")} == {"watch-w-1", "watch-w-2"}

    # A watcher killed with SIGKILL recorded no stop: its process is gone, so it is no
    # longer running, and forget goes ahead.
    proc = watch_process(str(inbox), "--name", "w", "--settle", "0", log=log)
    try:
        wait_for("the watcher to start", lambda: watcher_owner(store_url, "w"))
        assert forget("w", "--yes").returncode == ExitCode.USAGE
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = forget("w", "--yes")
    assert res.returncode == 0, res.stderr
    assert watched_rows(store_url, "w") == 0
    # Nothing registered: nothing to do, and an unknown name is no error.
    res = forget("nobody-ran-this", "--yes")
    assert res.returncode == 0 and "has registered nothing" in res.stdout


@pytest.mark.slow
def test_watch_forget_refuses_the_s3_events_watcher_of_a_running_server(
    ics_home: Path,
) -> None:
    with serve_process(env={**os.environ, "ICS_HOME": str(ics_home)}) as served:
        res = forget("s3-events", "--yes")
        assert res.returncode == ExitCode.USAGE, res.stderr
        assert f"watcher s3-events is running (in {socket.gethostname()}:" in res.stderr
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0, served.output()
    res = forget("s3-events", "--yes")
    assert res.returncode == 0 and "has registered nothing" in res.stdout, res.stderr


def test_a_batch_of_a_model_since_removed_is_left_and_the_watcher_goes_on(
    runner: ExecutionRunner, photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = runner.settings.model_copy(update={"model": "since-removed"})
    left = left_batch(ExecutionRunner(gone, runner.store, runner.runtime), "removed",
                      [str(photos / "coffee.jpg")])  # fmt: skip
    record_end(runner.store, left.id, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "x"))
    with caplog.at_level("WARNING"):
        assert Watcher(runner, "removed", []).run(threading.Event(), once=True) == []
    assert "cannot resume" in caplog.text and "unknown model 'since-removed'" in caplog.text
    assert runner.store.get_execution(left.id).status is ExecutionStatus.ABORTED
