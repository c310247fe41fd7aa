"""Durable executions: retries, tolerated failures, history, cancel, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

import imagefiles as f
from ics_service import sources
from ics_service.cli import main
from ics_service.config import RetryPolicy, Settings, load_settings
from ics_service.engine import ExecutionRunner, final_status
from ics_service.engine.lifecycle import cancel_execution, is_orphaned
from ics_service.engine.retry import delay_seconds
from ics_service.errors import InvalidImage, ModelUnavailable, SourceUnavailable
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.store import Store
from ics_service.types import Counts, ExecutionStatus, ItemStatus, ModelRef

FAST_RETRY = {"interval_seconds": 0.01, "max_attempts": 3, "jitter": "NONE"}


def ics(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


class FlakySource:
    """Serves a real photo, failing the first `failures` reads of each item with `error`."""

    def __init__(self, failures: int, error: type[Exception] = SourceUnavailable) -> None:
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


@pytest.fixture
def make_runner(
    runtime: OnnxRuntime, open_store: Callable[[str], Store]
) -> Callable[..., ExecutionRunner]:
    def make(model: object = None, **overrides: object) -> ExecutionRunner:
        settings = load_settings(None, overrides).settings
        return ExecutionRunner(settings, open_store(settings.store_url), model or runtime)  # type: ignore[arg-type]

    return make


def test_transient_read_errors_are_retried(
    ics_home: Path, flaky: FlakySource, store_url: str, make_runner: Callable[..., ExecutionRunner]
) -> None:
    runner = make_runner(retry={"SerializeImageData": FAST_RETRY}, store=store_url)
    execution, _ = runner.start([f"flaky://photo/{i}.jpg" for i in range(5)])
    finished = runner.run(execution)
    assert finished.status is ExecutionStatus.SUCCEEDED
    results = list(runner.store.results(execution.id))
    assert [r.attempts for r in results] == [3] * 5
    assert all(r.label == "espresso" for r in results)
    assert all(n == 3 for n in flaky.reads.values())
    retried = [e for e in runner.store.history(execution.id) if e.type == "TaskRetried"]
    assert len(retried) == 10
    assert retried[0].details["step"] == "SerializeImageData"
    assert retried[0].details["error"] == "SourceUnavailable"


def test_retries_give_up_after_max_attempts(
    ics_home: Path, flaky: FlakySource, make_runner: Callable[..., ExecutionRunner]
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
    ics_home: Path, flaky: FlakySource, make_runner: Callable[..., ExecutionRunner]
) -> None:
    flaky.error = InvalidImage
    runner = make_runner(retry={"SerializeImageData": FAST_RETRY})
    execution, _ = runner.start(["flaky://photo/a.jpg"])
    runner.run(execution)
    (result,) = runner.store.results(execution.id)
    assert result.error is not None and result.error.type == "InvalidImage"
    assert result.attempts == 1 and flaky.reads["flaky://photo/a.jpg"] == 1


def test_states_all_retries_everything(
    ics_home: Path, flaky: FlakySource, make_runner: Callable[..., ExecutionRunner]
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
    ics_home: Path, runtime: OnnxRuntime, make_runner: Callable[..., ExecutionRunner]
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
    assert all(0 <= delay_seconds(jittered, 3, rng) <= 4 for _ in range(100))


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
    settings = Settings(tolerated_failure_percentage=pct, tolerated_failure_count=cnt)
    counts = Counts(total=100, succeeded=100 - failures, low_confidence=failures // 2)
    counts.failed = failures - counts.low_confidence
    status, error = final_status(counts, settings)
    assert status.value == expected
    if expected == "FAILED":
        assert error is not None and error.type == "States.ExceedToleratedFailureThreshold"


def test_history_records_the_execution(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos), "--json")
    eid = json.loads(res.stdout)["execution_id"]
    events = json.loads(ics("executions", "history", eid, "--json").stdout)
    types = [e["type"] for e in events]
    assert types[0] == "ExecutionStarted" and types[-1] == "ExecutionFailed"
    failed = [e for e in events if e["type"] == "MapIterationFailed"]
    summary = json.loads(ics("executions", "show", eid, "--json").stdout)
    counts = summary["counts"]
    assert len(failed) == counts["LOW_CONFIDENCE"] + counts["FAILED"]
    assert "MapIterationSucceeded" not in types  # per-item detail only with history = full
    assert ics("executions", "history", eid).exit_code == 0

    res = ics("classify", str(photos), "--json", "--tolerated-failure-percentage", "100")
    eid = json.loads(res.stdout)["execution_id"]
    assert [e["type"] for e in json.loads(ics("executions", "history", eid, "--json").stdout)][
        -1
    ] == "ExecutionSucceeded"


def test_full_history(ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICS_HISTORY", "full")
    res = ics("classify", str(photos / "coffee.jpg"), "--json")
    eid = json.loads(res.stdout)["execution_id"]
    types = [e["type"] for e in json.loads(ics("executions", "history", eid, "--json").stdout)]
    assert types == [
        "ExecutionStarted",
        "MapIterationStarted",
        *["TaskStateEntered", "TaskStateExited"] * 3,
        "MapIterationSucceeded",
        "ExecutionSucceeded",
    ]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
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
    make_runner: Callable[..., ExecutionRunner],
    open_store: Callable[[str], Store],
) -> None:
    folder = _slow_folder(tmp_path / "slow", 400)
    runner = make_runner(batch_size=2, store=store_url)
    execution, _ = runner.start([str(folder)])
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(done=runner.run(execution)))
    thread.start()
    while runner.store.counts(execution.id).done < 5:
        time.sleep(0.05)
    other = open_store(runner.settings.store_url)  # as another process would
    stopped = cancel_execution(other, execution.id, wait_s=20)
    thread.join(timeout=30)
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
    make_runner: Callable[..., ExecutionRunner],
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
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["counts"]["total"] == 6 and summary["counts"]["SUCCEEDED"] == 6
    uris = [r.uri for r in store.results(execution.id)]
    assert sorted(uris) == sorted(str(p) for p in folder.iterdir())

    res = ics("executions", "resume", execution.id)
    assert res.exit_code == 2 and "every item has its result" in res.output

    orphan, _ = store.create_execution(
        params={"sources": []}, model=ModelRef("efficientnet-lite0", "1"), threshold=0.5
    )
    store.claim(orphan.id, f"{os.uname().nodename}:{_dead_pid()}")
    res = ics("executions", "cancel", orphan.id, "--json")
    assert json.loads(res.stdout)["status"] == "ABORTED"


def test_resume_refuses_a_live_execution(
    ics_home: Path, make_runner: Callable[..., ExecutionRunner]
) -> None:
    runner = make_runner()
    execution, _ = runner.store.create_execution(
        params={"sources": []}, model=ModelRef("efficientnet-lite0", "1"), threshold=0.5
    )
    runner.store.claim(execution.id, f"{os.uname().nodename}:{os.getpid()}")
    res = ics("executions", "resume", execution.id)
    assert res.exit_code == 2 and "still running" in res.output


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
    _corpus(folder, 2000)
    out = tmp_path / "results.jsonl"
    ics_bin = Path(sys.executable).parent / "ics"
    proc = subprocess.Popen(
        [str(ics_bin), "classify", str(folder), "-o", str(out), "--name", "big", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = Store(load_settings(None, {}).settings.store_url)
    deadline = time.monotonic() + 120
    execution = None
    while time.monotonic() < deadline:
        execution = store.find_by_name("big")
        if execution is not None and store.counts(execution.id).done >= 400:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert execution is not None
    before = {r.item_id: r for r in store.results(execution.id)}
    assert 400 <= len(before) < 2000, "the kill must land midway"
    assert store.get_execution(execution.id).status is ExecutionStatus.RUNNING

    res = subprocess.run(
        [str(ics_bin), "executions", "resume", execution.id, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr  # low-confidence crops fail it, as by default
    assert "Traceback" not in res.stderr
    summary = json.loads(res.stdout)
    assert summary["counts"]["total"] == 2000
    after = list(store.results(execution.id))
    assert len(after) == 2000
    assert sorted(int(r.item_id) for r in after) == list(range(2000))
    for r in after:  # what was recorded before the kill was not classified again
        if r.item_id in before:
            assert r.started_at == before[r.item_id].started_at
    counts = store.counts(execution.id)
    assert counts.done == 2000 and counts.succeeded + counts.low_confidence + counts.failed == 2000
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(int(d["item_id"]) for d in lines) == list(range(2000))
    assert sum(1 for _ in store.pending_items(execution.id)) == 0
    store.close()
