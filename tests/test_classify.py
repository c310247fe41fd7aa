"""`ics classify` end to end: results, formats, statuses, exit codes, the store."""

from __future__ import annotations

import csv
import json
import math
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import imagefiles as f
from cli import ICS_BIN, ics, ics_process
from ics_service.config import load_settings
from ics_service.engine import ExecutionRunner
from ics_service.errors import ExitCode
from ics_service.models.runtime import OnnxRuntime
from ics_service.store import Store
from ics_service.types import ExecutionStatus, ItemResult, ItemStatus
from records import RESULT_FIELDS

ITEM_STATUSES = {s.value for s in ItemStatus}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def mixed(tmp_path: Path, photos: Path) -> Path:
    """Real photos plus one of every broken kind."""
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(f.truncated_jpeg())
    (folder / "text.png").write_bytes(b"not an image at all")
    (folder / "big.png").write_bytes(f.png_bomb())
    (folder / "photo.heic").write_bytes(f.HEIC_HEAD)
    return folder


def test_classify_folder_writes_one_result_per_item(ics_home: Path, mixed: Path) -> None:
    out = ics_home / "out.jsonl"
    res = ics("classify", str(mixed), str(mixed / "missing.jpg"), "-o", str(out), "--json")
    # Failed items fail it by default (a crash fails in `ics` itself).
    assert res.exit_code == ExitCode.FAILED, res.output
    summary = json.loads(res.stdout)
    rows = read_jsonl(out)
    n_photos = len(list(mixed.glob("*.jpg"))) - 2  # empty.jpg and truncated.jpg
    assert len(rows) == n_photos + 6 == summary["counts"]["total"]
    assert {r["item_id"] for r in rows} == {str(i) for i in range(len(rows))}
    for r in rows:
        assert set(r) >= RESULT_FIELDS
        assert r["execution_id"] == summary["execution_id"]
        assert r["model"] == {"name": "efficientnet-lite0", "version": "1"}
    by_name = {Path(r["uri"]).name: r for r in rows}
    espresso = by_name["coffee.jpg"]
    assert espresso["status"] == "SUCCEEDED" and espresso["label"] == "espresso"
    assert espresso["confidence"] > 0.94 and len(espresso["top_k"]) == 5
    assert espresso["image"]["width"] == 600 and espresso["image"]["format"] == "JPEG"
    assert by_name["chelsea.jpg"]["status"] == "LOW_CONFIDENCE"
    assert 281 <= by_name["chelsea.jpg"]["label_index"] <= 285
    errors = {n: by_name[n]["error"]["type"] for n in by_name if by_name[n]["status"] == "FAILED"}
    assert errors == {
        "empty.jpg": "InvalidImage",
        "truncated.jpg": "InvalidImage",
        "text.png": "InvalidImage",
        "big.png": "ImageTooLarge",
        "photo.heic": "UnsupportedFormat",
        "missing.jpg": "SourceNotFound",
    }
    for n in errors:
        assert by_name[n]["label"] is None and by_name[n]["error"]["message"]
    assert summary["status"] == "FAILED"
    assert summary["error"]["type"] == "States.ExceedToleratedFailureThreshold"
    assert summary["counts"]["FAILED"] == 6
    assert summary["results"] == str(out)


def test_threshold_boundary_is_inclusive(ics_home: Path, photos: Path) -> None:
    coffee = str(photos / "coffee.jpg")
    first = ics("classify", coffee, "-o", "-")
    assert first.exit_code == ExitCode.OK, first.output
    confidence = json.loads(first.stdout.splitlines()[0])["confidence"]
    at = ics("classify", coffee, "-o", "-", "--threshold", repr(confidence))
    assert at.exit_code == ExitCode.OK, at.output
    assert json.loads(at.stdout.splitlines()[0])["status"] == "SUCCEEDED"
    above = ("--threshold", repr(math.nextafter(confidence, 1)))
    res = ics("classify", coffee, "-o", "-", *above)
    assert res.exit_code == ExitCode.OK, res.output  # flagged, not failed
    assert json.loads(res.stdout.splitlines()[0])["status"] == "LOW_CONFIDENCE"
    res = ics("classify", coffee, "-o", "-", *above, "--low-confidence", "fail")
    assert res.exit_code == ExitCode.FAILED, res.output
    assert json.loads(res.stdout.splitlines()[0])["status"] == "LOW_CONFIDENCE"


def test_exit_codes_and_tolerated_failures(ics_home: Path, photos: Path) -> None:
    ok, failed = ExitCode.OK, ExitCode.FAILED
    assert ics("classify", str(photos / "coffee.jpg")).exit_code == ok
    # Some photos are LOW_CONFIDENCE: flagged by default, failures with --low-confidence fail.
    assert ics("classify", str(photos)).exit_code == ok
    strict = ("classify", str(photos), "--low-confidence", "fail")
    assert ics(*strict).exit_code == failed
    assert ics(*strict, "--tolerated-failure-percentage", "100").exit_code == ok
    assert ics(*strict, "--tolerated-failure-count", "1").exit_code == failed
    assert ics(*strict, "--tolerated-failure-count", "100").exit_code == ok
    assert ics(*strict, "--threshold", "0").exit_code == ok
    res = ics("classify", str(photos), "--low-confidence", "strict")
    assert res.exit_code == ExitCode.USAGE, res.output
    empty = ics_home / "empty"
    empty.mkdir()
    res = ics("classify", str(empty))
    assert res.exit_code == ExitCode.USAGE, res.output
    assert f"Error: no images found in {empty}" in res.output
    res = ics("classify")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "Error: Missing argument 'SOURCES...'." in res.output
    res = ics("classify", str(photos), "-o", "results.xlsx")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert ".jsonl, .csv or .parquet" in res.output
    res = ics("classify", str(photos), "--model", "nope")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "Error: unknown model 'nope'" in res.output


def test_csv_and_parquet_outputs(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos), "-o", "r.csv")
    assert res.exit_code == ExitCode.OK, res.output
    with open("r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and len(rows) == len(list(photos.iterdir()))
    coffee = next(r for r in rows if r["uri"].endswith("coffee.jpg"))
    assert coffee["label"] == "espresso" and json.loads(coffee["top_k"])[0]["index"] == 967

    res = ics("classify", str(photos), "-o", "r.parquet")
    assert res.exit_code == ExitCode.OK, res.output
    table = pq.read_table("r.parquet").to_pylist()
    assert len(table) == len(rows)
    assert {r["label"] for r in table} == {r["label"] for r in rows}

    res = ics("classify", str(photos / "coffee.jpg"), "-o", "x.data", "--output-format", "csv")
    assert res.exit_code == ExitCode.OK, res.output
    assert Path("x.data").read_text().startswith("execution_id,")


def test_stdout_output_keeps_summary_off_stdout(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos), "-o", "-")
    assert res.exit_code == ExitCode.OK, res.output
    lines = res.stdout.splitlines()
    assert lines and len(lines) == len(list(photos.iterdir()))
    assert {json.loads(line)["status"] for line in lines} <= ITEM_STATUSES
    assert "execution" in res.stderr


def test_a_reader_that_leaves_stdout_early_fails_nothing(ics_home: Path, photos: Path) -> None:
    """`ics classify -o - | head`: a real pipe whose reader closes it after one line. The
    execution goes on to its true status, every result reaches the store, and the command
    ends quietly with that status (no traceback, no FAILED)."""
    folder = ics_home / "many"
    folder.mkdir()
    originals = sorted(photos.iterdir())
    for i in range(40):
        (folder / f"{i:02d}-{originals[i % len(originals)].name}").write_bytes(
            originals[i % len(originals)].read_bytes()
        )
    # 100 predictions a record: some 400 kB of results, far more than a pipe holds.
    args = [str(ICS_BIN), "classify", str(folder), "-o", "-", "--top-k", "100", "--json"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = json.loads(proc.stdout.readline())
        proc.stdout.close()  # the reader goes away, as `head -1` does
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == ExitCode.OK, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Error" not in err
    summary = json.loads(err)
    assert summary["execution_id"] == first["execution_id"]
    assert summary["status"] == "SUCCEEDED"
    assert 1 <= summary["reader_left_after"] < 40
    store = Store(load_settings(None, {}).settings.store_url)
    try:
        execution = store.get_execution(first["execution_id"])
        recorded = list(store.results(execution.id))
    finally:
        store.close()
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert execution.counts.done == execution.counts.total == 40
    assert sorted(int(r.item_id) for r in recorded) == list(range(40))

    # The same through a shell pipeline, with the text summary: `head` sees the status.
    shell = f"{ICS_BIN} classify {folder} -o - -k 100 | head -n 2; exit ${{PIPESTATUS[0]}}"
    res = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == ExitCode.OK, res.stderr
    assert len(res.stdout.splitlines()) == 2
    assert "stdout's reader left after" in res.stderr and "Traceback" not in res.stderr


def test_overlapping_sources_classify_each_image_once(ics_home: Path, photos: Path) -> None:
    """`a/ a/*.jpg` and other ways to name the same files, in a real process: one item per
    image (its first name kept), and the summary says how many were dropped."""
    a = ics_home / "a"
    shutil.copytree(photos, a / "sub")
    shutil.copy(photos / "coffee.jpg", a / "top.jpg")
    (ics_home / "link").symlink_to(a, target_is_directory=True)
    n = len(list(photos.iterdir())) + 1
    out = ics_home / "out.jsonl"
    named = [
        "a/",
        "a/**/*.jpg",  # every image again
        "./a/../a/top.jpg",
        f"file://{a / 'sub' / 'coffee.jpg'}",
        "link/sub",  # the same folder through a symlink
    ]
    proc = subprocess.run(
        [str(ICS_BIN), "classify", *named, "-o", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ics_home,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["counts"]["total"] == n
    assert summary["duplicates_dropped"] == n + 1 + 1 + (n - 1)
    uris = [r["uri"] for r in read_jsonl(out)]
    assert len(uris) == len(set(uris)) == n
    assert set(uris) == {str(p) for p in a.rglob("*.jpg")}  # as the first SOURCE named them
    text = subprocess.run(
        [str(ICS_BIN), "classify", "a/", "a/top.jpg"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ics_home,
    )
    assert text.returncode == ExitCode.OK, text.stderr
    assert "1 named again by another SOURCE: classified once" in text.stdout
    events = ics("executions", "history", json.loads(proc.stdout)["execution_id"], "--json")
    assert {"duplicates": summary["duplicates_dropped"]} in [
        e["details"] for e in json.loads(events.stdout) if e["type"] == "DuplicatesDropped"
    ]


def test_canonical_uris() -> None:
    from ics_service.sources import canonical_uri

    assert canonical_uri("HTTP://Example.COM:80/a/B.jpg#x") == "http://example.com/a/B.jpg"
    assert canonical_uri("https://example.com:443") == "https://example.com/"
    assert canonical_uri("https://example.com:8443/x?q=1") == "https://example.com:8443/x?q=1"
    assert canonical_uri("S3://bucket/Key.jpg") == "s3://bucket/Key.jpg"
    assert canonical_uri("/tmp/../tmp/x.jpg") == canonical_uri("file:///tmp/x.jpg")


def test_executions_are_recorded_and_listed(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos), "--json", "--name", "nightly", "--low-confidence", "fail")
    assert res.exit_code == ExitCode.FAILED, res.output
    summary = json.loads(res.stdout)
    eid = summary["execution_id"]
    assert Path(summary["results"]).is_file()

    res = ics("executions", "list", "--json")
    assert res.exit_code == ExitCode.OK, res.output
    listed = json.loads(res.stdout)
    assert [e["execution_id"] for e in listed] == [eid]
    assert listed[0]["name"] == "nightly" and listed[0]["status"] == "FAILED"

    res = ics("executions", "show", eid[:15], "--json", "--results")
    assert res.exit_code == ExitCode.OK, res.output
    shown = json.loads(res.stdout)
    assert shown["execution_id"] == eid
    assert len(shown["results"]) == shown["counts"]["total"] == len(list(photos.iterdir()))
    assert shown["params"]["threshold"] == 0.94
    assert shown["params"]["low_confidence"] == "fail"

    text = ics("executions", "show", eid, "--results")
    assert text.exit_code == ExitCode.OK, text.output
    assert "espresso" in text.stdout
    res = ics("executions", "show", "nope")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "Error: no execution 'nope' in " in res.output

    # The name is as good as the id, in every command that takes one; a real process too.
    proc = ics_process("executions", "show", "nightly", "--json")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert json.loads(proc.stdout)["execution_id"] == eid
    history = ics("executions", "history", "nightly", "--json")
    assert history.exit_code == ExitCode.OK, history.output
    assert json.loads(history.stdout)[0]["type"] == "ExecutionStarted"
    cancel = ics("executions", "cancel", "nightly")
    assert cancel.exit_code == ExitCode.OK and f"{eid}: FAILED" in cancel.stdout, cancel.output
    resume = ics("executions", "resume", "nightly")
    assert resume.exit_code == ExitCode.USAGE, resume.output
    assert f"execution {eid} is FAILED: every item has its result" in resume.output
    year = eid[:4]
    res = ics("classify", str(photos / "coffee.jpg"), "--name", year)
    assert res.exit_code == ExitCode.OK, res.output
    res = ics("executions", "show", year)  # a name, and the start of the ids of both
    assert res.exit_code == ExitCode.USAGE, res.output
    assert f"Error: execution '{year}' is ambiguous: it is the name of " in res.output
    assert eid in res.output
    res = ics("classify", str(photos / "coffee.jpg"), "--name", eid.replace(eid[-6:], "abcdef"))
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "has the form of an execution id" in res.output

    again = ics("classify", str(photos), "--json", "--name", "nightly")
    assert again.exit_code == ExitCode.FAILED, again.output  # that execution's outcome
    assert json.loads(again.stdout)["execution_id"] == eid  # a used name returns that one
    assert "already exists" in again.stderr
    res = ics("executions", "list", "--json")
    assert res.exit_code == ExitCode.OK, res.output
    assert len(json.loads(res.stdout)) == 2  # and the one named after the year


def test_json_logs_carry_execution_and_item(ics_home: Path, mixed: Path) -> None:
    res = ics("classify", str(mixed), "--log-format", "json", "--log-level", "INFO", "--json")
    assert res.exit_code == ExitCode.FAILED, res.output
    docs = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert docs and len(docs) == len([ln for ln in res.stderr.splitlines() if ln.strip()])
    eid = json.loads(res.stdout)["execution_id"]
    failed = [d for d in docs if d.get("item_id") is not None]
    assert len(failed) >= 5
    assert all(d["execution_id"] == eid for d in failed)


def test_stopped_execution_keeps_exactly_its_finished_items(
    ics_home: Path, tmp_path: Path, runtime: OnnxRuntime
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    data = f.jpeg()
    for i in range(120):
        (folder / f"{i:03d}.jpg").write_bytes(data)
    settings = load_settings(None, {"batch_size": 4, "decode_workers": 2}).settings
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, _ = runner.start([str(folder)])
        stop = threading.Event()
        seen = 0

        def on_results(results: Sequence[ItemResult]) -> None:
            nonlocal seen
            seen += len(results)
            if seen >= 20:
                stop.set()

        finished = runner.run(execution, on_results=on_results, stop=stop)
        assert finished.status is ExecutionStatus.ABORTED
        recorded = list(store.results(execution.id))
        assert len(recorded) == seen == finished.counts.done
        assert 20 <= seen < 120
        assert len({r.item_id for r in recorded}) == seen
        assert sum(1 for _ in store.pending_items(execution.id)) == 120 - seen
    finally:
        store.close()


@pytest.mark.slow
def test_real_process_sigint_aborts_and_keeps_results(ics_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    data = f.big_jpeg((2000, 1500))
    for i in range(400):
        (folder / f"{i:03d}.jpg").write_bytes(data)
    proc = subprocess.Popen(
        [str(ICS_BIN), "classify", str(folder), "--json", "--batch-size", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = Store(load_settings(None, {}).settings.store_url)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            running = store.list_executions(limit=1)
            done = store.counts(running[0].id).done if running else 0
            if done >= 10:
                break
            time.sleep(0.05)
        assert done >= 10, f"10 items not done within 60 s (done {done}, exit code {proc.poll()})"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.INTERRUPTED, err
        assert "Traceback" not in err
        assert "SIGINT: stopping; finished items are kept" in err
        summary = json.loads(out)
        assert summary["status"] == "ABORTED"
        execution = store.get_execution(summary["execution_id"])
        assert 10 <= execution.counts.done < 400
        assert len(list(store.results(execution.id))) == execution.counts.done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        store.close()


def test_inference_plan() -> None:
    from ics_service.engine.pipeline import plan_inference
    from ics_service.models.runtime import available_cpus

    cpus = available_cpus()
    assert plan_inference(0, 0) == (1, cpus)  # one single-thread batch per core
    assert plan_inference(cpus, 0) == (cpus, 1)
    assert plan_inference(0, 1) == (cpus, 1)
    assert plan_inference(3, 5) == (3, 5)
