"""Durable executions: retries, tolerated failures, history, cancel, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
from PIL import Image

import imagefiles as f
from cli import ICS_BIN, ics, ics_process
from ics_service import sources
from ics_service.config import RetryPolicy, Settings, load_settings
from ics_service.engine import ExecutionRunner, final_status
from ics_service.engine.lifecycle import cancel_execution, is_orphaned
from ics_service.errors import (
    ExitCode,
    InvalidImage,
    ItemError,
    ModelUnavailable,
    SourceUnavailable,
    UsageError,
)
from ics_service.models.runtime import ModelRuntime, OnnxRuntime
from ics_service.policies import delay_seconds
from ics_service.samples import load_photo
from ics_service.store import Store
from ics_service.types import Counts, Execution, ExecutionStatus, ItemStatus, ModelRef

FAST_RETRY = {"interval_seconds": 0.01, "max_attempts": 3, "jitter": "NONE"}


class FlakySource:
    """Serves a real photo, failing the first `failures` reads of each item with `error`."""

    def __init__(self, failures: int, error: type[ItemError] = SourceUnavailable) -> None:
        self.failures = failures
        self.error = error
        self.reads: Counter[str] = Counter()
        self.data = f.jpeg()
        self.lock = threading.Lock()

    def list(self, spec: str) -> Iterator[str]:
        yield spec

    def read(self, uri: str, max_bytes: int) -> bytes:
        with self.lock:
            self.reads[uri] += 1
            n = self.reads[uri]
        if n <= self.failures:
            raise self.error(f"injected failure {n} reading {uri}")
        return self.data


@pytest.fixture
def flaky() -> Iterator[FlakySource]:
    source = FlakySource(failures=2)
    sources.register("flaky", source)
    yield source
    sources.unregister("flaky")


@pytest.fixture
def open_store() -> Iterator[Callable[[str], Store]]:
    """Opens stores that are closed after the test (PostgreSQL connections included)."""
    opened: list[Store] = []

    def open_(url: str) -> Store:
        opened.append(Store(url))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


class MakeRunner(Protocol):
    """`make_runner(model=None, **settings)`: a runner on the settings' store."""

    def __call__(
        self, model: ModelRuntime | None = None, **overrides: object
    ) -> ExecutionRunner: ...


@pytest.fixture
def make_runner(runtime: OnnxRuntime, open_store: Callable[[str], Store]) -> MakeRunner:
    def make(model: ModelRuntime | None = None, **overrides: object) -> ExecutionRunner:
        settings = load_settings(None, overrides).settings
        return ExecutionRunner(settings, open_store(settings.store_url), model or runtime)

    return make


def test_transient_read_errors_are_retried(
    ics_home: Path, flaky: FlakySource, store_url: str, make_runner: MakeRunner
) -> None:
    runner = make_runner(retry={"SerializeImageData": FAST_RETRY}, store=store_url)
    execution, _ = runner.start([f"flaky://photo/{i}.jpg" for i in range(5)])
    finished = runner.run(execution)
    assert finished.status is ExecutionStatus.SUCCEEDED
    results = list(runner.store.results(execution.id))
    assert [r.attempts for r in results] == [3] * 5
    assert all(r.label == "espresso" for r in results)
    assert flaky.reads == {f"flaky://photo/{i}.jpg": 3 for i in range(5)}
    retried = [e for e in runner.store.history(execution.id) if e.type == "TaskRetried"]
    assert len(retried) == 10
    assert retried[0].details["step"] == "SerializeImageData"
    assert retried[0].details["error"] == "SourceUnavailable"


def test_retries_give_up_after_max_attempts(
    ics_home: Path, flaky: FlakySource, make_runner: MakeRunner
) -> None:
    flaky.failures = 10
    runner = make_runner(retry={"SerializeImageData": FAST_RETRY})
    execution, _ = runner.start(["flaky://photo/a.jpg"])
    runner.run(execution)
    (result,) = runner.store.results(execution.id)
    assert result.status is ItemStatus.FAILED
    assert result.error is not None and result.error.type == "SourceUnavailable"
    assert result.attempts == 4  # the first attempt and 3 retries
    assert flaky.reads["flaky://photo/a.jpg"] == 4


def test_deterministic_errors_are_not_retried(
    ics_home: Path, flaky: FlakySource, make_runner: MakeRunner
) -> None:
    flaky.error = InvalidImage
    runner = make_runner(retry={"SerializeImageData": FAST_RETRY})
    execution, _ = runner.start(["flaky://photo/a.jpg"])
    runner.run(execution)
    (result,) = runner.store.results(execution.id)
    assert result.error is not None and result.error.type == "InvalidImage"
    assert result.attempts == 1 and flaky.reads["flaky://photo/a.jpg"] == 1


def test_states_all_retries_everything(
    ics_home: Path, flaky: FlakySource, make_runner: MakeRunner
) -> None:
    flaky.error = InvalidImage
    policy = {**FAST_RETRY, "error_equals": ["States.ALL"]}
    runner = make_runner(retry={"SerializeImageData": policy})
    execution, _ = runner.start(["flaky://photo/a.jpg"])
    runner.run(execution)
    (result,) = runner.store.results(execution.id)
    assert result.status is ItemStatus.SUCCEEDED and result.attempts == 3


class FlakyModel:
    """The real model behind an endpoint that is unavailable for its first call."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.card = inner.card
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            raise ModelUnavailable("endpoint returned 503")
        return self.inner.predict(batch)


def test_transient_inference_errors_are_retried(
    ics_home: Path, runtime: OnnxRuntime, make_runner: MakeRunner
) -> None:
    model = FlakyModel(runtime)
    runner = make_runner(model, retry={"ClassifyImage": FAST_RETRY})
    photo = ics_home / "coffee.jpg"
    photo.write_bytes(f.jpeg())
    execution, _ = runner.start([str(photo)])
    runner.run(execution)
    (result,) = runner.store.results(execution.id)
    assert result.status is ItemStatus.SUCCEEDED and result.attempts == 2
    assert model.calls == 2


def test_backoff_delays() -> None:
    policy = RetryPolicy(interval_seconds=1, backoff_rate=2, max_delay_seconds=5, jitter="NONE")
    rng = random.Random(0)
    assert [delay_seconds(policy, n, rng) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    jittered = RetryPolicy(interval_seconds=1, backoff_rate=2, jitter="FULL")
    delays = [delay_seconds(jittered, 3, rng) for _ in range(100)]
    assert all(0 <= d <= 4 for d in delays)
    assert len(set(delays)) > 1, "full jitter must spread the delays"


@pytest.mark.parametrize(
    ("pct", "cnt", "failures", "expected"),
    [
        (None, None, 0, "SUCCEEDED"),
        (None, None, 1, "FAILED"),
        (10.0, None, 10, "SUCCEEDED"),  # exactly 10 %: not exceeded
        (10.0, None, 11, "FAILED"),
        (None, 5, 5, "SUCCEEDED"),
        (None, 5, 6, "FAILED"),
        (50.0, 5, 6, "FAILED"),  # exceeding either fails it
        (5.0, 50, 6, "FAILED"),
        (0.0, None, 1, "FAILED"),
        (100.0, None, 100, "SUCCEEDED"),
    ],
)
def test_tolerated_failures(
    pct: float | None, cnt: int | None, failures: int, expected: str
) -> None:
    flagging = Settings(tolerated_failure_percentage=pct, tolerated_failure_count=cnt)
    strict = flagging.model_copy(update={"low_confidence": "fail"})
    counts = Counts(total=100, succeeded=100 - failures, low_confidence=failures // 2)
    counts.failed = failures - counts.low_confidence
    status, error = final_status(counts, strict)
    assert status.value == expected
    if expected == "FAILED":
        assert error is not None and error.type == "States.ExceedToleratedFailureThreshold"
    else:
        assert error is None
    # By default LOW_CONFIDENCE items are flagged: only FAILED ones count.
    assert flagging.low_confidence == "flag"
    only_low = Counts(total=100, succeeded=100 - failures, low_confidence=failures)
    assert final_status(only_low, flagging) == (ExecutionStatus.SUCCEEDED, None)
    only_failed = Counts(total=100, succeeded=100 - failures, failed=failures)
    status, error = final_status(only_failed, flagging)
    assert status.value == expected
    assert error is None or error.message.startswith(f"{failures} of 100 items FAILED")


def test_history_records_the_execution(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos), "--json", "--low-confidence", "fail")
    assert res.exit_code == ExitCode.FAILED, res.output
    eid = json.loads(res.stdout)["execution_id"]
    events = _history(eid)
    types = [e["type"] for e in events]
    assert types[0] == "ExecutionStarted" and types[-1] == "ExecutionFailed"
    failed = [e for e in events if e["type"] == "MapIterationFailed"]
    res = ics("executions", "show", eid, "--json")
    assert res.exit_code == ExitCode.OK, res.output
    counts = json.loads(res.stdout)["counts"]
    assert failed, "a FAILED execution has failed or low-confidence items"
    assert len(failed) == counts["LOW_CONFIDENCE"] + counts["FAILED"]
    assert "MapIterationSucceeded" not in types  # per-item detail only with history = full
    res = ics("executions", "history", eid)
    assert res.exit_code == ExitCode.OK, res.output
    assert "ExecutionFailed" in res.stdout

    res = ics("classify", str(photos), "--json")  # low-confidence items only flagged
    assert res.exit_code == ExitCode.OK, res.output
    eid = json.loads(res.stdout)["execution_id"]
    assert _history(eid)[-1]["type"] == "ExecutionSucceeded"


def _history(execution_id: str) -> list[dict[str, Any]]:
    res = ics("executions", "history", execution_id, "--json")
    assert res.exit_code == ExitCode.OK, res.output
    events: list[dict[str, Any]] = json.loads(res.stdout)
    return events


def test_full_history(ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICS_HISTORY", "full")
    res = ics("classify", str(photos / "coffee.jpg"), "--json")
    assert res.exit_code == ExitCode.OK, res.output
    eid = json.loads(res.stdout)["execution_id"]
    types = [e["type"] for e in _history(eid)]
    assert types == [
        "ExecutionStarted",
        "MapIterationStarted",
        *["TaskStateEntered", "TaskStateExited"] * 3,
        "MapIterationSucceeded",
        "ExecutionSucceeded",
    ]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=30)
    return proc.pid


def _slow_folder(folder: Path, n: int, size: tuple[int, int] = (1600, 1200)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = f.big_jpeg(size)
    for i in range(n):
        (folder / f"{i:04d}.jpg").write_bytes(data)
    return folder


def test_cancel_stops_a_running_execution(
    ics_home: Path,
    tmp_path: Path,
    store_url: str,
    make_runner: MakeRunner,
    open_store: Callable[[str], Store],
) -> None:
    folder = _slow_folder(tmp_path / "slow", 400)
    runner = make_runner(batch_size=2, store=store_url)
    execution, _ = runner.start([str(folder)])
    box: dict[str, Execution] = {}
    # `teardown` only ends the run if the test fails before the cancel stops it.
    teardown = threading.Event()
    thread = threading.Thread(target=lambda: box.update(done=runner.run(execution, stop=teardown)))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and thread.is_alive():
            done = runner.store.counts(execution.id).done
            if done >= 5:
                break
            time.sleep(0.05)
        assert done >= 5, f"5 items not done within 60 s (done {done})"
        other = open_store(runner.settings.store_url)  # as another process would
        stopped = cancel_execution(other, execution.id, wait_s=20)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the run did not end after the cancel"
    finally:
        teardown.set()
        thread.join(timeout=30)
    assert "done" in box, "the run raised instead of returning the execution"
    assert box["done"].status is ExecutionStatus.ABORTED
    assert stopped.status is ExecutionStatus.ABORTED
    assert stopped.error is not None and "cancelled" in stopped.error.message
    done = other.counts(execution.id).done
    assert 5 <= done < 400 and len(list(other.results(execution.id))) == done
    assert [e.type for e in other.history(execution.id)][-1] == "ExecutionAborted"


def test_cancel_and_resume_an_orphaned_execution(
    ics_home: Path,
    tmp_path: Path,
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    make_runner: MakeRunner,
) -> None:
    monkeypatch.setenv("ICS_STORE", store_url)  # the CLI below uses it too
    folder = _slow_folder(tmp_path / "few", 6, (640, 480))
    runner = make_runner()
    store = runner.store
    execution, _ = store.create_execution(
        params={"sources": [str(folder)], "threshold": 0.5},
        model=ModelRef("efficientnet-lite0", "1"),
        threshold=0.5,
    )
    # A process that died while listing: 2 of the 6 items registered.
    store.claim(execution.id, f"{os.uname().nodename}:{_dead_pid()}")
    store.add_items(execution.id, sorted(str(p) for p in folder.iterdir())[:2])
    assert is_orphaned(store.get_execution(execution.id))

    res = ics("executions", "resume", execution.id, "--json")
    assert res.exit_code == ExitCode.OK, res.output
    summary = json.loads(res.stdout)
    assert summary["counts"]["total"] == 6 and summary["counts"]["SUCCEEDED"] == 6
    uris = [r.uri for r in store.results(execution.id)]
    assert sorted(uris) == sorted(str(p) for p in folder.iterdir())

    res = ics("executions", "resume", execution.id)
    assert res.exit_code == ExitCode.USAGE, res.output
    assert f"Error: execution {execution.id} is SUCCEEDED: every item has its result" in res.output

    orphan, _ = store.create_execution(
        params={"sources": []}, model=ModelRef("efficientnet-lite0", "1"), threshold=0.5
    )
    store.claim(orphan.id, f"{os.uname().nodename}:{_dead_pid()}")
    res = ics("executions", "cancel", orphan.id, "--json")
    assert res.exit_code == ExitCode.OK, res.output
    assert json.loads(res.stdout)["status"] == "ABORTED"


def test_resume_refuses_a_live_execution(ics_home: Path, make_runner: MakeRunner) -> None:
    runner = make_runner()
    execution, _ = runner.store.create_execution(
        params={"sources": []}, model=ModelRef("efficientnet-lite0", "1"), threshold=0.5
    )
    runner.store.claim(execution.id, f"{os.uname().nodename}:{os.getpid()}")
    res = ics("executions", "resume", execution.id)
    assert res.exit_code == ExitCode.USAGE, res.output
    assert f"Error: execution {execution.id} is still running (in " in res.output


def test_two_processes_resuming_one_orphan_at_once_take_it_once(
    ics_home: Path, store_url: str, make_runner: MakeRunner
) -> None:
    # Two runners on their own stores, as two servers (or a server and `ics executions
    # resume`) on one database would be.
    runners = [make_runner(store=store_url) for _ in range(2)]
    store = runners[0].store
    execution, _ = store.create_execution(
        params={"sources": []}, model=ModelRef("efficientnet-lite0", "1"), threshold=0.5
    )
    store.claim(execution.id, f"{os.uname().nodename}:{_dead_pid()}")
    store.add_items(execution.id, [f"file:///photos/{i}.jpg" for i in range(3)])
    store.mark_listed(execution.id)
    assert is_orphaned(store.get_execution(execution.id))

    # Both have read the orphan and decided to resume it before either claims it.
    barrier = threading.Barrier(2, timeout=30)

    def meet() -> threading.Event:
        barrier.wait()
        return threading.Event()

    outcomes: list[Execution | Exception] = [RuntimeError("not run")] * 2

    def resume(i: int) -> None:
        try:
            outcomes[i] = runners[i].prepare_resume(execution.id, cooperate=meet)
        except Exception as e:
            outcomes[i] = e

    threads = [threading.Thread(target=resume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    resumed = [o for o in outcomes if isinstance(o, Execution)]
    refused = [o for o in outcomes if not isinstance(o, Execution)]
    assert len(resumed) == 1 and len(refused) == 1, outcomes
    assert isinstance(refused[0], UsageError), refused
    assert f"execution {execution.id} is still running (in " in str(refused[0])
    now = store.get_execution(execution.id)
    assert now.status is ExecutionStatus.RUNNING and now.owner == runners[0].owner
    assert not is_orphaned(now)
    events = [e.type for e in store.history(execution.id)]
    assert events.count("ExecutionResumed") == 1, events


def _corpus(folder: Path, n: int) -> None:
    """n distinct small JPEGs cut from the real photos."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    photos = [load_photo(name) for name in ("coffee", "chelsea", "astronaut", "rocket")]
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
        crop = Image.fromarray(arr[y : y + 2 * h // 3, x : x + 2 * w // 3]).resize((256, 192))
        crop.save(folder / f"{i:05d}.jpg", quality=85)


@pytest.mark.slow
def test_kill_9_midway_then_resume(ics_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    _corpus(folder, 1000)
    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen(
        # The strict rule, recorded with the execution: the resume below applies it too.
        [
            str(ICS_BIN),
            "classify",
            str(folder),
            "-o",
            str(out),
            "--name",
            "big",
            "--json",
            "--low-confidence",
            "fail",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = Store(load_settings(None, {}).settings.store_url)
    try:
        deadline = time.monotonic() + 120
        execution = None
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            execution = store.find_by_name("big")
            done = 0 if execution is None else store.counts(execution.id).done
            if done >= 300:
                break
            time.sleep(0.05)
        assert execution is not None and done >= 300, (
            f"300 items not done within 120 s (done {done}, exit code {proc.poll()})"
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        before = {r.item_id: r for r in store.results(execution.id)}
        assert 300 <= len(before) < 1000, "the kill must land midway"
        assert store.get_execution(execution.id).status is ExecutionStatus.RUNNING

        res = ics_process("executions", "resume", execution.id, "--json", timeout=300)
        assert res.returncode == ExitCode.FAILED, res.stderr  # low-confidence crops fail it
        assert "Traceback" not in res.stderr
        summary = json.loads(res.stdout)
        assert summary["status"] == "FAILED"
        assert summary["counts"]["total"] == 1000
        after = list(store.results(execution.id))
        assert len(after) == 1000
        assert sorted(int(r.item_id) for r in after) == list(range(1000))
        # What was recorded before the kill was not classified again.
        kept = [r for r in after if r.item_id in before]
        assert len(kept) == len(before)
        assert all(r.started_at == before[r.item_id].started_at for r in kept)
        counts = store.counts(execution.id)
        assert counts.total == counts.done == 1000
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(int(d["item_id"]) for d in lines) == list(range(1000))
        assert sum(1 for _ in store.pending_items(execution.id)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        store.close()
