"""Data capture: real runs captured in SageMaker Model Monitor's format, read back."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import http.server
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import boto3
import httpx
import jsonschema
import numpy as np
import pytest

from awsserver import REGION, AwsServer
from cli import ics, ics_process
from ics_service import sources
from ics_service.capture import CaptureWriter, capture_files, is_sampled, iter_records
from ics_service.capture.record import capture_record, encode
from ics_service.capture.sink import CaptureSink
from ics_service.config import Settings
from ics_service.engine import ExecutionRunner
from ics_service.errors import EnvironmentUnavailable, OutputError
from ics_service.imaging import Limits, Preprocessor
from ics_service.models.runtime import OnnxRuntime
from ics_service.outputs import ResultsWriter
from ics_service.server.app import create_app
from ics_service.sources import storage
from ics_service.sources.remote import FsspecSource
from ics_service.store import Store
from ics_service.types import Captured, ItemResult, ItemStatus, ModelRef
from imagefiles import linked_copies
from receivers import serve_http
from serving import client_of, serve_process


def schema_validator() -> jsonschema.protocols.Validator:
    """The JSON Schema of SageMaker's capture record, as shipped in the package."""
    text = resources.files("ics_service.capture").joinpath("schema.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def raw_records(dest: Path) -> list[dict[str, Any]]:
    """Every line of every complete capture file under dest, as JSON."""
    lines = []
    for f in sorted(dest.rglob("*.jsonl")):
        lines += [json.loads(line) for line in f.read_text().splitlines()]
    return lines


def results_by_item(home: Path) -> dict[str, dict[str, Any]]:
    (results,) = (home / "results").glob("*.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return {f"{r['execution_id']}/{r['item_id']}": r for r in rows}


def classify(*args: str) -> None:
    res = ics("classify", *args, "--tolerated-failure-percentage", "100", "--no-progress")
    assert res.exit_code == 0, res.output


# --- the sampling decision ------------------------------------------------------------


def test_sampling_30_percent_of_2000_ids_is_30_plus_or_minus_5() -> None:
    ids = [f"20261129-120000-abcdef/{i}" for i in range(2000)]
    chosen = [i for i in ids if is_sampled(i, 30)]
    assert 0.25 <= len(chosen) / len(ids) <= 0.35
    # The same ids are chosen again (a resume), and a bigger sample contains a smaller one.
    assert chosen == [i for i in ids if is_sampled(i, 30)]
    assert set(chosen) <= {i for i in ids if is_sampled(i, 60)}
    assert all(is_sampled(i, 100) for i in ids)
    assert not any(is_sampled(i, 0) for i in ids)


# --- a real run -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_captured_run_matches_the_schema_and_round_trips_images_and_probabilities(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    (photos_copy := tmp_path / "in").mkdir()
    for p in photos.glob("*.jpg"):
        (photos_copy / p.name).write_bytes(p.read_bytes())
    (photos_copy / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    classify(str(photos_copy), "--capture", str(dest))

    # The layout: DEST/ics/AllTraffic/yyyy/mm/dd/hh/MM-SS-mmm-WRITER-UUID.jsonl, nothing
    # hidden left; WRITER is this host and process (no replica_id is set).
    files = capture_files(dest)
    assert files
    for f in files:
        rel = f.relative_to(dest).parts
        assert rel[:2] == ("ics", "AllTraffic")
        dt.datetime.strptime("/".join(rel[2:6]), "%Y/%m/%d/%H")
        assert re.fullmatch(r"\d\d-\d\d-\d{3}-[\w.-]+_\d+-[0-9a-f]{32}\.jsonl", f.name), f.name
    assert not [p for p in dest.rglob(".*") if p.is_file()]

    validator = schema_validator()
    raw = raw_records(dest)
    for doc in raw:
        validator.validate(doc)
    by_item = results_by_item(ics_home)
    classified = {k for k, r in by_item.items() if r["status"] != "FAILED"}
    assert len(classified) == len(list(photos.glob("*.jpg")))
    # One record per classified item: the broken image has no output to capture.
    assert sorted(r["eventMetadata"]["inferenceId"] for r in raw) == sorted(classified)
    assert len({r["eventMetadata"]["eventId"] for r in raw}) == len(raw)

    preprocess = Preprocessor(runtime.card, Limits())
    records = list(iter_records(dest))
    assert [r.inference_time for r in records] == sorted(r.inference_time for r in records)
    for record in records:
        result = by_item[record.inference_id]
        original = Path(result["uri"]).read_bytes()
        data = record.input_bytes
        assert data is not None
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(original).hexdigest()
        assert record.content_type == "image/jpeg"
        tensor, _ = preprocess(original)
        expected = runtime.predict(tensor[None])[0]
        assert record.probabilities is not None
        np.testing.assert_allclose(record.probabilities, expected, atol=1e-5)
        assert int(np.argmax(record.probabilities)) == result["label_index"]
        finished = dt.datetime.fromisoformat(result["finished_at"])
        assert abs((record.inference_time - finished).total_seconds()) < 0.002


@pytest.mark.parametrize(
    ("mode", "halves"),
    [
        ("input", {"endpointInput"}),
        ("output", {"endpointOutput"}),
        ("input_and_output", {"endpointInput", "endpointOutput"}),
    ],
)
def test_modes_leave_out_the_half_not_captured(
    ics_home: Path, photos: Path, tmp_path: Path, mode: str, halves: set[str]
) -> None:
    dest = tmp_path / "capture"
    classify(
        str(photos / "coffee.jpg"),
        "--capture",
        str(dest),
        "--capture-mode",
        mode,
        "--capture-endpoint",
        "shop-1",
        "--capture-variant",
        "Blue",
    )
    (record,) = raw_records(dest / "shop-1" / "Blue")
    schema_validator().validate(record)
    assert set(record["captureData"]) == halves
    (read,) = iter_records(dest)
    assert (read.input_bytes is not None) == ("endpointInput" in halves)
    assert (read.probabilities is not None) == ("endpointOutput" in halves)
    if read.probabilities is not None:
        assert read.probabilities.index(max(read.probabilities)) == 967  # espresso


@pytest.mark.slow
def test_a_real_run_at_30_percent_captures_exactly_the_sampled_items(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    n = 300
    listing = tmp_path / "list.txt"
    # Names of their own: a run classifies each file once, however often it is listed.
    copies = linked_copies([photos / "coffee.jpg"] * n, tmp_path / "copies")
    listing.write_text("".join(f"{p}\n" for p in copies))
    dest = tmp_path / "capture"
    classify(f"@{listing}", "--capture", str(dest), "--capture-sampling", "30")
    by_item = results_by_item(ics_home)
    assert len(by_item) == n
    captured = sorted(r.inference_id for r in iter_records(dest))
    assert captured == sorted(i for i in by_item if is_sampled(i, 30))
    assert 0.20 <= len(captured) / n <= 0.40


@pytest.mark.slow
def test_a_run_capturing_many_times_its_queue_ends_and_captures_every_item(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    # The queue holds a quarter of the photos' bytes; the run pushes eight queues' worth
    # through it. An item's room must be taken once and freed once, or the queue fills with
    # leaked room and the run waits for ever.
    jpgs = linked_copies(sorted(photos.glob("*.jpg")) * 2, tmp_path / "copies")
    total = sum(p.stat().st_size for p in jpgs)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in jpgs))
    dest = tmp_path / "capture"
    done = ics_process(
        "classify",
        f"@{listing}",
        "--capture",
        str(dest),
        "--tolerated-failure-percentage",
        "100",
        "--no-progress",
        env={"ICS_CAPTURE_QUEUE_MB": f"{total / 8 / 2**20:.6f}"},
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    by_item = results_by_item(ics_home)
    assert len(by_item) == len(jpgs)
    assert sorted(r.inference_id for r in iter_records(dest)) == sorted(by_item)


def test_a_resume_captures_the_items_it_runs_with_the_same_sampling(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    settings = Settings(home=ics_home)
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, _ = runner.start([str(photos)])
        # Stopped before its run: ABORTED with nothing classified (and nothing listed yet,
        # as `run` registers the items while it classifies them).
        runner.abandon(execution.id, KeyboardInterrupt())
    finally:
        store.close()
    dest = tmp_path / "capture"
    res = ics(
        "executions",
        "resume",
        execution.id,
        "--capture",
        str(dest),
        "--capture-sampling",
        "50",
        "--no-progress",
    )
    assert res.exit_code in (0, 1), res.output
    store = Store(settings.store_url)
    try:
        total = store.get_execution(execution.id).counts.total
    finally:
        store.close()
    ids = [f"{execution.id}/{i}" for i in range(total)]
    assert len(ids) == len(list(photos.glob("*.jpg")))
    captured = sorted(r.inference_id for r in iter_records(dest))
    assert captured == sorted(i for i in ids if is_sampled(i, 50))


class _FailsToClose:
    """A sink (a results upload, say) that fails as the run ends."""

    def write(self, results: Sequence[ItemResult]) -> None:
        pass

    def close(self) -> None:
        raise EnvironmentUnavailable("results upload failed")


def test_a_sink_failing_to_close_still_publishes_the_capture(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    settings = Settings(home=ics_home, capture=str(dest))
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, _ = runner.start([str(photos / "coffee.jpg")])
        threads = {t.name for t in threading.enumerate()}
        with pytest.raises(EnvironmentUnavailable, match="results upload failed"):
            runner.run(execution, sinks=[_FailsToClose()])
    finally:
        store.close()
    (record,) = iter_records(dest)
    assert record.inference_id == f"{execution.id}/0"
    assert not list(dest.rglob("*.part"))
    assert "ics-capture" not in {t.name for t in threading.enumerate()} - threads


def test_a_writer_that_never_captured_holds_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    writer = CaptureWriter(tmp_path)
    assert threading.active_count() == before
    writer.close()
    assert capture_files(tmp_path) == []


def test_no_capture_writes_nothing_and_keeps_results_unchanged(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    classify(str(photos / "coffee.jpg"))
    (plain,) = results_by_item(ics_home).values()
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    # Without --capture: the store and the results file, and not one capture record.
    assert not [p for p in new if p.suffix == ".jsonl" and p.parent.name != "results"]
    assert not [p for p in new if p.name.endswith(".part")]
    for f in (ics_home / "results").glob("*.jsonl"):
        f.unlink()
    classify(str(photos / "coffee.jpg"), "--capture", str(tmp_path / "capture"))
    (captured,) = results_by_item(ics_home).values()
    assert len(list(iter_records(tmp_path / "capture"))) == 1
    # Capturing leaves the result rows as they were: the same fields, the same decision.
    assert set(captured) == set(plain)
    for key in ("uri", "status", "label", "label_index", "confidence", "top_k", "threshold"):
        assert captured[key] == plain[key], key


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--capture", "{file}"], "cannot be written"),
        (["--capture", "s3://key:hunter2@bucket/prefix"], "capture URL holds credentials"),
        (["--capture", "gs://bucket/prefix"], "local folder or to s3://BUCKET/PREFIX"),
        (["--capture", "{dir}", "--capture-endpoint", "../up"], "capture_endpoint"),
        (["--capture", "{dir}", "--capture-sampling", "101"], "capture_sampling"),
    ],
)
def test_bad_capture_settings_are_usage_errors_before_any_work(
    ics_home: Path, photos: Path, tmp_path: Path, flags: list[str], says: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    args = [f.format(file=a_file, dir=tmp_path / "cap") for f in flags]
    res = ics("classify", str(photos / "coffee.jpg"), *args)
    assert res.exit_code == 2, res.output
    assert says in res.output
    assert "Traceback" not in res.output
    assert "hunter2" not in res.output
    assert not (ics_home / "ics.db").exists()


def test_capture_to_s3_uploads_each_complete_file_and_keeps_none_here(
    aws: AwsServer, ics_home: Path, photos: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name=REGION)
    s3.create_bucket(Bucket="captures")
    classify(
        str(photos / "coffee.jpg"), str(photos / "camera.jpg"), "--capture", "s3://captures/run"
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="captures")["Contents"]]
    (key,) = keys  # one file, and no probe left behind
    parts = key.split("/")
    assert parts[:3] == ["run", "ics", "AllTraffic"] and len(parts) == 8
    dt.datetime.strptime("/".join(parts[3:7]), "%Y/%m/%d/%H")
    body = s3.get_object(Bucket="captures", Key=key)["Body"].read().decode()
    records = [json.loads(line) for line in body.splitlines()]
    validator = schema_validator()
    for record in records:
        validator.validate(record)
    assert sorted(r["eventMetadata"]["inferenceId"] for r in records) == sorted(
        results_by_item(ics_home)
    )
    # Uploaded, so deleted from the spool.
    assert not [p for p in (ics_home / "capture-spool").rglob("*") if p.is_file()]
    # A bucket that does not exist is refused before any work.
    res = ics("classify", str(photos / "coffee.jpg"), "--capture", "s3://no-such-bucket/x")
    assert res.exit_code == 2, res.output
    assert "bucket 'no-such-bucket' does not exist" in res.output


def test_a_failed_upload_keeps_the_file_and_says_where(
    aws: AwsServer, photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = CaptureWriter(tmp_path, upload_to="s3://missing-bucket/run")
    writer.submit("e/0", dt.datetime.now(dt.UTC), _captured(photos / "coffee.jpg"))
    writer.close()
    (kept,) = capture_files(tmp_path)
    assert [r.inference_id for r in iter_records(kept)] == ["e/0"]
    assert f"{kept} could not be uploaded to s3://missing-bucket/run/" in caplog.text
    assert "it stays there" in caplog.text


# --- the writer -----------------------------------------------------------------------


def _captured(photo: Path) -> Captured:
    return Captured(photo.read_bytes(), "image/jpeg", np.linspace(0, 1, 1000, dtype=np.float32))


def test_files_rotate_by_size_and_by_hour(photos: Path, tmp_path: Path) -> None:
    item = _captured(photos / "coffee.jpg")
    line_bytes = len(base64.b64encode(item.data)) + 1000 * 10
    writer = CaptureWriter(tmp_path, max_file_bytes=3 * line_bytes, max_file_seconds=3600)
    ten = dt.datetime(2026, 11, 29, 10, 59, 58, tzinfo=dt.UTC)
    for i in range(7):
        writer.submit(f"e/{i}", ten + dt.timedelta(milliseconds=i), item)
    for i in range(7, 9):
        writer.submit(f"e/{i}", ten + dt.timedelta(seconds=5), item)
    writer.close()
    assert writer.error is None
    hours = {f.parent.relative_to(tmp_path).as_posix(): f for f in capture_files(tmp_path)}
    assert set(hours) == {"2026/11/29/10", "2026/11/29/11"}
    ten_files = sorted((tmp_path / "2026/11/29/10").glob("*.jsonl"))
    assert len(ten_files) >= 3  # 7 records, at most 3 of this size a file
    for f in ten_files:
        assert f.name.startswith("59-58-00")
        assert f.stat().st_size <= 3 * line_bytes
    assert [r.inference_id for r in iter_records(tmp_path)] == [f"e/{i}" for i in range(9)]


def test_a_full_queue_makes_the_caller_wait(photos: Path, tmp_path: Path) -> None:
    item = _captured(photos / "coffee.jpg")
    size = len(item.data) + 8 * len(item.probs)
    writer = CaptureWriter(tmp_path, max_pending_bytes=3 * size)
    for i in range(40):  # queued far faster than records are encoded and written
        writer.submit(f"e/{i}", dt.datetime.now(dt.UTC), item)
    writer.close()
    assert size < writer.high_water <= 3 * size
    assert len(list(iter_records(tmp_path))) == 40


def test_a_stopping_run_does_not_wait_for_room(photos: Path, tmp_path: Path) -> None:
    item = _captured(photos / "coffee.jpg")
    writer = CaptureWriter(tmp_path, max_pending_bytes=len(item.data))
    try:
        assert writer.reserve(item)  # one item always fits
        stop = threading.Event()
        stop.set()
        assert not writer.reserve(item, stop)  # full, and the run stopping: no wait
        writer.submit("e/0", dt.datetime.now(dt.UTC), item, reserved=True)
    finally:
        writer.close()
    assert [r.inference_id for r in iter_records(tmp_path)] == ["e/0"]


def _result_of(item_id: str, captured: Captured) -> ItemResult:
    return ItemResult(
        execution_id="e",
        item_id=item_id,
        uri="coffee.jpg",
        status=ItemStatus.SUCCEEDED,
        threshold=0.5,
        model=ModelRef("m", "1"),
        started_at=dt.datetime.now(dt.UTC),
        finished_at=dt.datetime.now(dt.UTC),
        captured=captured,
    )


def test_the_sink_frees_the_room_the_run_took(photos: Path, tmp_path: Path) -> None:
    captured = _captured(photos / "coffee.jpg")
    writer = CaptureWriter(tmp_path, max_pending_bytes=2 * len(captured.data))
    sink = CaptureSink(writer)
    stop = threading.Event()

    def run() -> None:  # ten times what the queue holds, reserved as the pipeline does
        for i in range(20):
            if writer.reserve_all([captured], stop):
                sink.write([_result_of(str(i), captured)])

    # On a thread, with a deadline: room taken twice and freed once makes it wait for ever.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    stop.set()
    assert not thread.is_alive(), "the sink's items did not free their room within 20 s"
    sink.close()
    assert len(list(iter_records(tmp_path))) == 20


def test_a_write_error_stops_capture_and_fails_the_sink(
    photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    captured = _captured(photos / "coffee.jpg")
    sink = CaptureSink(CaptureWriter(blocker / "capture", max_pending_bytes=len(captured.data)))
    assert sink.writer.reserve(captured)
    sink.write([_result_of("0", captured)])  # queued: the error comes from the writer's thread
    with pytest.raises(EnvironmentUnavailable, match=r"data capture to .* failed"):
        sink.close()
    assert isinstance(sink.writer.error, OSError)
    assert "data capture to" in caplog.text


_FULL_DISK = """
import datetime as dt, resource, signal, sys
from pathlib import Path
import numpy as np
from ics_service.capture import CaptureWriter
from ics_service.types import Captured

data = Path(sys.argv[2]).read_bytes()
# A disk that fills part-way through the third record: the write is cut there (EFBIG).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
writer = CaptureWriter(Path(sys.argv[1]), max_file_seconds=3600)
for i in range(5):
    item = Captured(data, "image/jpeg", np.zeros(10, np.float32))
    writer.submit(f"e/{i}", dt.datetime.now(dt.UTC), item)
writer.close()
print(type(writer.error).__name__)
"""


def test_a_failed_write_publishes_complete_lines_only(photos: Path, tmp_path: Path) -> None:
    photo = photos / "coffee.jpg"
    line_bytes = len(base64.b64encode(photo.read_bytes()))
    dest = tmp_path / "capture"
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK)
    done = subprocess.run(
        [sys.executable, str(script), str(dest), str(photo), str(2 * line_bytes + 5000)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OSError", done.stderr
    assert "data capture to" in done.stderr
    (f,) = capture_files(dest)
    lines = f.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a complete line
    assert [json.loads(line)["eventMetadata"]["inferenceId"] for line in lines[:-1]] == [
        "e/0",
        "e/1",
    ]
    assert not list(dest.rglob("*.part"))


def test_a_reader_never_sees_a_file_being_written(photos: Path, tmp_path: Path) -> None:
    writer = CaptureWriter(tmp_path, max_file_seconds=3600)
    try:
        for i in range(5):
            writer.submit(f"e/{i}", dt.datetime.now(dt.UTC), _captured(photos / "coffee.jpg"))
        deadline = time.monotonic() + 10
        while writer.written < 5:
            assert time.monotonic() < deadline, "the writer wrote nothing in 10 s"
            time.sleep(0.01)
        # Written, but still in its hidden in-progress file: not a capture file yet.
        assert [p.name.startswith(".") for p in tmp_path.rglob("*.part")] == [True]
        assert capture_files(tmp_path) == []
        assert list(iter_records(tmp_path)) == []
    finally:
        writer.close()
    assert len(list(iter_records(tmp_path))) == 5
    assert not list(tmp_path.rglob("*.part"))


def test_an_open_file_is_published_after_max_file_seconds(photos: Path, tmp_path: Path) -> None:
    writer = CaptureWriter(tmp_path, max_file_seconds=0.3)
    try:
        writer.submit("e/0", dt.datetime.now(dt.UTC), _captured(photos / "coffee.jpg"))
        deadline = time.monotonic() + 10
        while not capture_files(tmp_path):
            assert time.monotonic() < deadline, "not published within 10 s"
            time.sleep(0.05)
        # Published while the writer is still open: what a crash can lose is bounded in time.
        assert [r.inference_id for r in iter_records(tmp_path)] == ["e/0"]
    finally:
        writer.close()


def test_the_reader_skips_a_cut_line_with_a_warning(
    photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = CaptureWriter(tmp_path)
    for i in range(2):
        writer.submit(f"e/{i}", dt.datetime.now(dt.UTC), _captured(photos / "coffee.jpg"))
    writer.close()
    (f,) = capture_files(tmp_path)
    text = f.read_text()
    f.write_text(text + text.splitlines()[0][:100] + "\n")
    with caplog.at_level(logging.WARNING):
        assert [r.inference_id for r in iter_records(f)] == ["e/0", "e/1"]
    assert f"{f}:3: not a capture record" in caplog.text


@pytest.mark.slow
def test_40000_records_over_2000_files_stream_with_few_files_open(tmp_path: Path) -> None:
    # Two writers (variants) rotating every 20 records through one hour: their files
    # interleave in time, and the reader merges them in order.
    hour = dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC)
    per_file, files_per_variant = 20, 1000
    for v, variant in enumerate(("A", "B")):
        folder = tmp_path / "ics" / variant / "2026/11/29/10"
        folder.mkdir(parents=True)
        for k in range(files_per_variant):
            lines = []
            for j in range(per_file):
                n = 2 * (k * per_file + j) + v
                when = hour + dt.timedelta(milliseconds=45 * n)
                record = capture_record(
                    inference_id=f"e/{n}",
                    inference_time=when,
                    mode="output",
                    data=b"",
                    content_type="image/jpeg",
                    probs=[0.5, 0.25, 0.25],
                )
                lines.append(encode(record))
                if j == 0:
                    name = f"{when:%M-%S}-{when.microsecond // 1000:03d}-{v}{k:04d}.jsonl"
            (folder / name).write_bytes(b"".join(lines))
    total = 2 * per_file * files_per_variant

    fds = Path("/proc/self/fd")
    open_before = len(list(fds.iterdir()))
    most_open = 0
    tracemalloc.start()
    try:
        count = 0
        last = None
        for read in iter_records(tmp_path):
            assert read.inference_id == f"e/{count}"
            assert last is None or read.inference_time >= last
            last = read.inference_time
            count += 1
            if count % 1000 == 0:
                most_open = max(most_open, len(list(fds.iterdir())) - open_before)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == total
    assert most_open <= 4, f"{most_open} files open at once"
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# --- ics capture read and ground-truth ------------------------------------------------


def test_capture_read_prints_rows_and_saves_the_images_back(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    classify(str(photos / "coffee.jpg"), str(photos / "camera.jpg"), "--capture", str(dest))
    by_item = results_by_item(ics_home)

    table = ics("capture", "read", str(dest))
    assert table.exit_code == 0, table.output
    for inference_id, row in by_item.items():
        assert inference_id in table.output
        assert row["label"] in table.output

    out = tmp_path / "images"
    res = ics("capture", "read", str(dest), "--json", "--save-images", str(out))
    assert res.exit_code == 0, res.output
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert {d["inference_id"] for d in docs} == set(by_item)
    for d in docs:
        row = by_item[d["inference_id"]]
        assert d["label"] == row["label"]
        assert d["confidence"] == pytest.approx(row["confidence"], abs=1e-6)
        saved = out / (d["inference_id"].replace("/", "_") + ".jpg")
        original = Path(row["uri"]).read_bytes()
        assert saved.read_bytes() == original
        assert d["image"]["sha256"] == hashlib.sha256(original).hexdigest()


def test_bad_records_are_skipped_one_by_one_and_names_never_collide(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    classify(str(photos / "coffee.jpg"), "--capture", str(dest))
    (f,) = capture_files(dest)
    good = json.loads(f.read_text())
    not_base64 = json.loads(json.dumps(good))
    not_base64["captureData"]["endpointInput"]["data"] = "!!"
    not_text = json.loads(json.dumps(good))
    not_text["captureData"]["endpointInput"]["data"] = 5
    nan = json.loads(json.dumps(good))
    nan["captureData"]["endpointOutput"]["data"] = "[NaN, 1.0]"
    # The same item captured twice (another endpoint's copy): two records, one name.
    f.write_text("".join(json.dumps(r) + "\n" for r in (good, not_base64, not_text, nan, good)))

    table = ics("capture", "read", str(dest))
    assert table.exit_code == 0, table.output
    # The table decodes no image: the record whose data is not base64 is listed too.
    assert "3 records" in table.stderr
    assert f"{f}:3: not a capture record" in table.stderr
    assert f"{f}:4: not a capture record" in table.stderr

    out = tmp_path / "images"
    res = ics("capture", "read", str(dest), "--json", "--save-images", str(out))
    assert res.exit_code == 0, res.output
    assert f"{f}:2: endpointInput.data is not base64" in res.stderr
    assert "2 records, 1 skipped, 2 images written" in res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(docs) == 2 and docs[0]["label"] == "espresso"
    assert docs[0]["top_k"][0]["index"] == 967
    assert len(docs[0]["top_k"]) == 5
    original = (photos / "coffee.jpg").read_bytes()
    saved = sorted(out.iterdir())
    assert len(saved) == 2 and all(p.read_bytes() == original for p in saved)
    # Again into the same folder: nothing is overwritten, and each refusal is said.
    res = ics("capture", "read", str(dest), "--save-images", str(out))
    assert res.exit_code == 0, res.output
    assert res.stderr.count("already exists; image not written") == 2


def test_ground_truth_records_from_a_csv(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("item_id,label\nexec-1/0,espresso\nexec-1/1\nexec-1/2,tabby\n")
    out = tmp_path / "gt"
    res = ics("capture", "ground-truth", str(labels), "--out", str(out))
    assert res.exit_code == 1, res.output
    assert f"{labels}:3: expected 2 columns" in res.output
    (f,) = out.rglob("*.jsonl")
    assert len(f.relative_to(out).parts) == 5  # yyyy/mm/dd/hh/FILE
    assert [json.loads(line) for line in f.read_text().splitlines()] == [
        {
            "groundTruthData": {"data": "espresso", "encoding": "CSV"},
            "eventMetadata": {"eventId": "exec-1/0"},
            "eventVersion": "0",
        },
        {
            "groundTruthData": {"data": "tabby", "encoding": "CSV"},
            "eventMetadata": {"eventId": "exec-1/2"},
            "eventVersion": "0",
        },
    ]
    assert not [p for p in out.rglob(".*") if p.is_file()]


# --- real time ------------------------------------------------------------------------


def test_sagemaker_invocations_are_captured_as_answered(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    settings = Settings(home=ics_home, capture=str(dest))
    body = (photos / "coffee.jpg").read_bytes()

    async def go() -> list[float]:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            r = await client.post(
                "/invocations", content=body, headers={"Content-Type": "image/jpeg"}
            )
            assert r.status_code == 200, r.text
            answer: list[float] = r.json()
            return answer

    answer = asyncio.run(go())
    (raw,) = raw_records(dest)
    schema_validator().validate(raw)
    assert json.loads(raw["captureData"]["endpointOutput"]["data"]) == answer
    (record,) = iter_records(dest)
    assert record.input_bytes == body
    assert record.inference_id.startswith("2")  # the day's real-time execution id / item
    assert record.inference_id.endswith("/0")


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_serving_never_waits_for_the_capture_and_counts_what_it_drops(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    body = (photos / "coffee.jpg").read_bytes()
    # Room for one image at a time: concurrent requests find the queue full.
    settings = Settings(home=ics_home, capture=str(dest), capture_queue_mb=len(body) / 2**20)
    n = 12

    def invoke(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.post("/invocations", content=body, headers={"Content-Type": "image/jpeg"})

    async def concurrent() -> str:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            answers = await asyncio.gather(*(invoke(client) for _ in range(n)))
            assert [r.status_code for r in answers] == [200] * n
            return (await client.get("/metrics")).text

    async def disk_gone() -> str:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            # The folder goes away: the writer fails; the requests are still answered.
            root = dest / "ics" / "AllTraffic"
            shutil.rmtree(root)
            root.write_text("not a folder")
            deadline = time.monotonic() + 20
            while True:
                r = await invoke(client)
                assert r.status_code == 200, r.text
                text = (await client.get("/metrics")).text
                if _metric(text, 'ics_capture_dropped_total{reason="writer_failed"}'):
                    return text
                assert time.monotonic() < deadline, "no writer failure counted within 20 s"
                await asyncio.sleep(0.05)

    full = asyncio.run(concurrent())
    captured = len(list(iter_records(dest)))
    dropped = _metric(full, 'ics_capture_dropped_total{reason="queue_full"}')
    assert captured + dropped == n
    assert captured >= 1
    failed = asyncio.run(disk_gone())
    assert _metric(failed, "ics_capture_failed ") == 1.0


@pytest.mark.slow
def test_ics_serve_captures_real_time_requests(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "capture"
    bodies = [(photos / n).read_bytes() for n in ("coffee.jpg", "camera.jpg")]
    with serve_process("--capture", str(dest), "--capture-sampling", "100") as served:
        for body in bodies:
            r = httpx.post(f"{served.url}/v1/classify", content=body, timeout=30)
            assert r.status_code == 200, r.text
    assert served.proc.returncode == 0, served.output()
    records = list(iter_records(dest))
    assert sorted(r.input_bytes or b"" for r in records) == sorted(bodies)
    assert all(r.probabilities is not None for r in records)


def test_ics_serve_refuses_a_capture_folder_it_cannot_write(ics_home: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    res = ics_process("serve", "--port", "0", "--capture", str(a_file))
    assert res.returncode == 2, res.stderr
    assert "cannot be written" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_schema_refuses_what_sagemaker_would_not_write() -> None:
    validator = schema_validator()
    good = {
        "captureData": {
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "data": "[0.5, 0.5]",
                "encoding": "JSON",
            }
        },
        "eventMetadata": {
            "eventId": "0b6bd9b8-8f7b-4a51-9d8c-2f3a4f6c1e27",
            "inferenceId": "e/0",
            "inferenceTime": "2026-11-29T18:20:01.123Z",
        },
        "eventVersion": "0",
    }
    validator.validate(good)
    no_version = {k: v for k, v in good.items() if k != "eventVersion"}
    wrong_mode = json.loads(json.dumps(good).replace('"OUTPUT"', '"INPUT"'))
    local_time = json.loads(json.dumps(good).replace(".123Z", ".123+01:00"))
    nothing = {**good, "captureData": {}}
    for bad in (no_version, wrong_mode, local_time, nothing):
        assert not validator.is_valid(bad), bad


class _FlakyFront(http.server.BaseHTTPRequestHandler):
    """In front of the moto server: answers the first `failures` PUTs of a capture file with
    S3's 500 InternalError (transient), and passes every other request on to moto."""

    protocol_version = "HTTP/1.1"  # so that a client's Expect: 100-continue is answered
    upstream = ""
    failures = 0
    refused: ClassVar[list[str]] = []

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.command == "PUT" and ".ics-probe-" not in self.path and _FlakyFront.failures:
            _FlakyFront.failures -= 1
            _FlakyFront.refused.append(self.path)
            error = (
                b"<Error><Code>InternalError</Code>"
                b"<Message>We encountered an internal error.</Message></Error>"
            )
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "expect")}
        r = httpx.request(
            self.command, _FlakyFront.upstream + self.path, headers=headers, content=body
        )
        self.send_response(r.status_code)
        for key, value in r.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_front(aws: AwsServer) -> Iterator[str]:
    _FlakyFront.upstream, _FlakyFront.failures, _FlakyFront.refused = aws.url, 0, []
    with serve_http(_FlakyFront) as url:
        yield url


def test_a_capture_upload_that_fails_transiently_is_retried_and_then_lands(
    aws: AwsServer, flaky_front: str, photos: Path, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name=REGION)
    s3.create_bucket(Bucket="captures")
    previous = sources.source_for("s3://captures/x")
    # No retries inside botocore: the retry seen is ICS's own.
    options = {"endpoint_url": flaky_front, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    sources.register("s3", FsspecSource("s3", options))
    try:
        _FlakyFront.failures = 1
        writer = CaptureWriter(tmp_path, upload_to="s3://captures/run")
        writer.submit("e/0", dt.datetime.now(dt.UTC), _captured(photos / "coffee.jpg"))
        writer.close()
    finally:
        sources.register("s3", previous)
    assert len(_FlakyFront.refused) == 1 and _FlakyFront.failures == 0
    (key,) = [o["Key"] for o in s3.list_objects_v2(Bucket="captures")["Contents"]]
    assert _FlakyFront.refused[0].endswith(key)
    body = s3.get_object(Bucket="captures", Key=key)["Body"].read().decode()
    assert [json.loads(line)["eventMetadata"]["inferenceId"] for line in body.splitlines()] == [
        "e/0"
    ]
    # Uploaded, so not kept here.
    assert capture_files(tmp_path) == []


def test_an_upload_told_to_stop_does_not_retry(
    aws: AwsServer, flaky_front: str, tmp_path: Path
) -> None:
    boto3.client("s3", endpoint_url=aws.url, region_name=REGION).create_bucket(Bucket="captures")
    previous = sources.source_for("s3://captures/x")
    options = {"endpoint_url": flaky_front, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    sources.register("s3", FsspecSource("s3", options))
    local = tmp_path / "f.jsonl"
    local.write_text("{}\n")
    stop = threading.Event()
    stop.set()
    try:
        _FlakyFront.failures = 3
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            storage.upload(str(local), "s3://captures/run/f.jsonl", "capture files", stop=stop)
    finally:
        sources.register("s3", previous)
    assert storage.is_transient(caught.value)
    # One attempt, and none of the waits (1 + 2 + 4 s) before the retries.
    assert len(_FlakyFront.refused) == 1 and time.monotonic() - started < 5.0


@pytest.mark.parametrize("output", ["capture", "results"])
def test_the_upload_at_close_of_a_stopping_run_is_tried_once(
    aws: AwsServer, flaky_front: str, photos: Path, tmp_path: Path, output: str
) -> None:
    """The run's stop event reaches the uploads of capture files and of a results file: a
    transient failure keeps the file here at once instead of waiting 1 + 2 + 4 s."""
    boto3.client("s3", endpoint_url=aws.url, region_name=REGION).create_bucket(Bucket="captures")
    previous = sources.source_for("s3://captures/x")
    options = {"endpoint_url": flaky_front, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    sources.register("s3", FsspecSource("s3", options))
    stop = threading.Event()
    try:
        _FlakyFront.failures = 3
        if output == "capture":
            writer = CaptureWriter(tmp_path, upload_to="s3://captures/run", stop=stop)
            writer.submit("e/0", dt.datetime.now(dt.UTC), _captured(photos / "coffee.jpg"))
            stop.set()
            started = time.monotonic()
            writer.close()
            kept = capture_files(tmp_path)
        else:
            results = ResultsWriter("s3://captures/run/results.jsonl", stop=stop)
            stop.set()
            started = time.monotonic()
            with pytest.raises(OutputError, match="the results are kept in"):
                results.close()
            kept = [Path(results.path)]
        took = time.monotonic() - started
    finally:
        sources.register("s3", previous)
    assert len(_FlakyFront.refused) == 1 and took < 5.0, (_FlakyFront.refused, took)
    assert len(kept) == 1 and kept[0].exists()
    kept[0].unlink()
