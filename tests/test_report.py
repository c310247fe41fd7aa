"""`ics report` and `ics show` on real results: every chart decodes, is drawn, is on the page;
drift (PSI) against a baseline; 100,000 rows in bounded memory; clear errors."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
import shutil
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

import imagefiles as f
from awsserver import REGION, AwsServer
from cli import ics, ics_process
from ics_service.config import load_settings
from ics_service.errors import ExitCode
from ics_service.imaging import Limits, Preprocessor
from ics_service.models import get_card
from ics_service.models.runtime import OnnxRuntime
from ics_service.outputs import ResultsWriter
from ics_service.report import collect, open_rows, psi, render
from ics_service.report.drift import EPSILON, compare
from ics_service.report.pictures import PLACEHOLDER
from ics_service.report.rows import ReportRow
from ics_service.report.stats import Stats
from ics_service.store import Store
from ics_service.types import ErrorInfo, ItemResult, ItemStatus, ModelRef, Prediction

CHARTS = ("status", "confidence", "timeline", "labels", "lowest", "failures")
#: The charts' threshold line colour (charts.THRESHOLD_COLOUR, #c62828).
THRESHOLD_RGB = (0xC6, 0x28, 0x28)
PHOTO_MODEL = "efficientnet-lite0"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG", path
        return np.asarray(img.convert("RGB"))


def assert_drawn(path: Path) -> np.ndarray:
    """The PNG decodes and is not blank: it varies, and its middle band (the plot area, with
    no title and no axis labels below) has several colours."""
    arr = pixels(path)
    h, w = arr.shape[:2]
    assert h >= 100 and w >= 200, (path.name, arr.shape)
    assert arr.std() > 5, f"{path.name} is blank"
    middle = arr[h // 8 : h - h // 8].reshape(-1, 3)
    assert len(np.unique(middle, axis=0)) > 2, f"{path.name} has nothing drawn in its middle"
    return arr


def has_colour(arr: np.ndarray, rgb: tuple[int, int, int], at_least: int = 20) -> bool:
    return int(np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1).sum()) >= at_least


def assert_report(out: Path, charts: tuple[str, ...] = CHARTS) -> str:
    page = (out / "index.html").read_text()
    for name in charts:
        assert_drawn(out / f"{name}.png")
        assert f'src="{name}.png"' in page, name
    return page


@pytest.fixture
def mixed(tmp_path: Path, photos: Path) -> Path:
    """The real photos plus broken files, so that results have failures too."""
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "truncated.jpg").write_bytes(f.truncated_jpeg())
    (folder / "text.png").write_bytes(b"not an image at all")
    (folder / "photo.heic").write_bytes(f.HEIC_HEAD)
    return folder


def classify(folder: Path, out: Path, *extra: str) -> dict[str, Any]:
    res = ics("classify", str(folder), "-o", str(out), "--json", *extra)
    assert res.exit_code == ExitCode.FAILED, res.output  # the broken files fail it
    summary: dict[str, Any] = json.loads(res.stdout)
    return summary


def report(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    res = ics("report", *args, "--json")
    doc = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
    return res.exit_code, doc, res.output


# --- every chart from real results ----------------------------------------------------------


def test_report_of_real_results_draws_every_chart(ics_home: Path, mixed: Path) -> None:
    results = ics_home / "results.jsonl"
    classify(mixed, results)
    rows = read_jsonl(results)
    code, doc, output = report(str(results), "--out", str(ics_home / "report"))
    assert code == ExitCode.OK, output
    assert doc is not None
    out = ics_home / "report"
    page = assert_report(out)

    statuses = Counter(r["status"] for r in rows)
    assert doc["rows"] == len(rows) and doc["skipped"] == 0
    assert doc["statuses"] == dict(statuses)
    assert statuses["FAILED"] == 3 and statuses["LOW_CONFIDENCE"] > 0
    errors = Counter(r["error"]["type"] for r in rows if r["error"])
    assert doc["failures_by_type"] == dict(errors)
    confident = [r["confidence"] for r in rows if r["confidence"] is not None]
    assert doc["mean_confidence"] == pytest.approx(sum(confident) / len(confident), abs=1e-4)
    assert doc["threshold"] == rows[0]["threshold"]
    for status, n in statuses.items():
        assert f"<td>{status}</td><td>{n}</td>" in page
    # The threshold is drawn as a line on the histogram and on the time series.
    assert has_colour(pixels(out / "confidence.png"), THRESHOLD_RGB)
    assert has_colour(pixels(out / "timeline.png"), THRESHOLD_RGB)
    assert has_colour(pixels(out / "failures.png"), THRESHOLD_RGB, at_least=1000)
    # The contact sheet holds the photos themselves: far more colours than any chart.
    sheet = pixels(out / "lowest.png").reshape(-1, 3)
    assert len(np.unique(sheet, axis=0)) > 5000


def test_report_reads_csv_and_parquet_results_like_jsonl(ics_home: Path, mixed: Path) -> None:
    results = ics_home / "results.jsonl"
    summary = classify(mixed, results)
    store = Store(load_settings().settings.store_url)
    try:
        stored = list(store.results(summary["execution_id"]))
    finally:
        store.close()
    docs = []
    for suffix in ("jsonl", "csv", "parquet"):
        path = ics_home / f"again.{suffix}"
        writer = ResultsWriter(str(path))
        writer.write(stored)
        writer.close()
        code, doc, output = report(str(path), "--out", str(ics_home / suffix))
        assert code == ExitCode.OK, output
        assert doc is not None
        assert_report(ics_home / suffix)
        docs.append({k: doc[k] for k in ("rows", "statuses", "failures_by_type", "first")})
        docs[-1]["mean"] = doc["mean_confidence"]
    assert docs[0] == docs[1] == docs[2]
    assert docs[0]["rows"] == len(read_jsonl(results))


@pytest.mark.slow
def test_report_of_an_execution_id(store_url: str, ics_home: Path, mixed: Path) -> None:
    summary = classify(mixed, ics_home / "results.jsonl", "--store", store_url)
    execution_id = summary["execution_id"]
    out = ics_home / "report"
    # A unique prefix of the id is enough, as for `ics executions show`.
    code, doc, output = report(execution_id[:-2], "--out", str(out), "--store", store_url)
    assert code == ExitCode.OK, output
    assert doc is not None
    assert doc["source"] == f"execution {execution_id}"
    counts = summary["counts"]
    assert doc["rows"] == counts["total"]
    assert doc["statuses"] == {s: counts[s] for s in ("SUCCEEDED", "LOW_CONFIDENCE", "FAILED")}
    assert_report(out)
    code, _, output = report("20990101-000000-000000", "--out", str(out), "--store", store_url)
    assert code == ExitCode.USAGE
    assert "no execution '20990101-000000-000000'" in output


# --- SageMaker capture records ---------------------------------------------------------------


def capture_record(image: bytes, probs: list[float], when: dt.datetime, n: int) -> str:
    return json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": "image/jpeg",
                    "mode": "INPUT",
                    "data": base64.b64encode(image).decode(),
                    "encoding": "BASE64",
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": json.dumps(probs),
                    "encoding": "JSON",
                },
            },
            "eventMetadata": {
                "eventId": f"event-{n}",
                "inferenceId": f"capture-{n}",
                "inferenceTime": when.isoformat().replace("+00:00", "Z"),
            },
            "eventVersion": "0",
        }
    )


def test_report_of_a_capture_folder(ics_home: Path, photos: Path, runtime: OnnxRuntime) -> None:
    card = get_card(PHOTO_MODEL)
    pre = Preprocessor(card, Limits())
    folder = ics_home / "capture" / "ics" / "AllTraffic" / "2026" / "11" / "29" / "10"
    folder.mkdir(parents=True)
    when = dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC)
    expected: Counter[str] = Counter()
    lines = []
    for n, photo in enumerate(sorted(photos.glob("*.jpg"))):
        data = photo.read_bytes()
        probs = runtime.predict(pre(data)[0][None])[0]
        expected[card.labels[int(np.argmax(probs))]] += 1
        lines.append(capture_record(data, probs.tolist(), when + dt.timedelta(seconds=n), n))
    # A record whose image is not base64 still counts; one that is not JSON is skipped.
    lines.append(
        capture_record(b"", [1.0] + [0.0] * 999, when, 99).replace('"data": ""', '"data": "!!"')
    )
    lines.append("{not json")
    (folder / "records.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (folder / "more.jsonl").write_text("\n".join(lines[5:]) + "\n")

    out = ics_home / "report"
    code, doc, output = report(str(ics_home / "capture"), "--out", str(out))
    assert code == ExitCode.OK, output
    assert doc is not None
    assert doc["rows"] == len(lines) - 1 and doc["skipped"] == 1
    assert doc["threshold"] == 0.94
    assert_report(out)
    expected[card.labels[0]] += 1
    rows = list(open_rows(str(ics_home / "capture"), load_settings().settings).rows)
    assert Counter(r.label for r in rows) == expected
    assert all(r.time is not None and r.time.year == 2026 for r in rows)
    assert all(
        r.status == ("SUCCEEDED" if (r.confidence or 0) >= 0.94 else "LOW_CONFIDENCE") for r in rows
    )
    # One .jsonl file of capture records is a source too.
    code, doc, output = report(str(folder / "more.jsonl"), "--out", str(ics_home / "one"))
    assert code == ExitCode.OK, output
    assert doc is not None and doc["rows"] == len(lines) - 6


def test_a_report_over_capture_files_decides_at_the_runs_threshold(
    ics_home: Path, photos: Path
) -> None:
    """A run at --threshold 0.5, captured: its capture's report decides each record at 0.5
    (found in the store), as the run did; a --threshold given to the report wins."""
    capture = ics_home / "capture"
    results = ics_home / "results.jsonl"
    res = ics(
        "classify", str(photos), "--threshold", "0.5", "--capture", str(capture), "-o", str(results)
    )
    assert res.exit_code == ExitCode.OK, res.output
    ran = Counter(json.loads(line)["status"] for line in results.read_text().splitlines())
    assert ran["SUCCEEDED"] and ran["LOW_CONFIDENCE"]  # 0.5 splits these photos
    code, doc, output = report(str(capture), "--out", str(ics_home / "r1"))
    assert code == ExitCode.OK, output
    assert doc is not None and doc["threshold"] == 0.5
    assert doc["statuses"] == dict(ran)
    code, doc, output = report(str(capture), "--out", str(ics_home / "r2"), "--threshold", "0.99")
    assert code == ExitCode.OK, output
    assert doc is not None and doc["threshold"] == 0.99
    assert doc["statuses"].get("SUCCEEDED", 0) < ran["SUCCEEDED"]


def test_the_contact_sheet_names_each_tiles_file(ics_home: Path, photos: Path) -> None:
    from ics_service.report.pictures import contact_sheet, tile_name

    pre = Preprocessor(get_card(PHOTO_MODEL), Limits())
    coffee = str(photos / "coffee.jpg")

    def sheet(uri: str) -> Image.Image:
        row = ReportRow(
            status="SUCCEEDED",
            label="espresso",
            confidence=0.9,
            top_k=(("espresso", 0.9),),
            uri=uri,
            fetch=lambda: (photos / "coffee.jpg").read_bytes(),
        )
        path = ics_home / "sheet.png"
        contact_sheet([row], pre, path)
        with Image.open(path) as image:
            return image.convert("RGB")

    assert tile_name(ReportRow(status="SUCCEEDED", uri=coffee)) == "coffee.jpg"
    assert tile_name(ReportRow(status="SUCCEEDED", uri="s3://b/in/x.png")) == "x.png"
    assert tile_name(ReportRow(status="SUCCEEDED", uri="20261207-1/3")) == "20261207-1/3"
    one, other = np.asarray(sheet(coffee)), np.asarray(sheet(str(photos / "zz-other.jpg")))
    differs = np.nonzero((one != other).any(axis=(1, 2)))[0]
    # Only the caption's last line differs: the name, under the image and its labels.
    assert differs.size and differs.min() > 192 + 3 * 19, differs


def test_the_timeline_joins_only_the_points_of_one_run() -> None:
    from ics_service.report.charts import segments

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def at(seconds: float, run: str, row: int) -> tuple[Any, ...]:
        return (row, t0 + dt.timedelta(seconds=seconds), 0.5, "SUCCEEDED", run)

    points = [
        at(0, "a", 0),
        at(0.5, "b", 1),  # another execution at the same time
        at(1, "a", 2),
        at(1.5, "b", 3),
        at(2, "a", 4),
        at(3600, "a", 5),  # an hour later: a gap in run a
        at(3601, "a", 6),
    ]
    assert segments(points, timed=True) == [[0, 2, 4], [5, 6], [1, 3]]
    untimed = [(i, None, 0.5, "SUCCEEDED", run) for i, run in enumerate("aabba")]
    assert segments(untimed, timed=False) == [[0, 1, 4], [2, 3]]


# --- drift --------------------------------------------------------------------------------


def generated_results(path: Path, n: int, *, label: str, confidence: float) -> None:
    """n SUCCEEDED results of one label and confidence (a deliberately shifted baseline)."""
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    writer = ResultsWriter(str(path))
    writer.write(
        [
            ItemResult(
                execution_id="baseline",
                item_id=str(i),
                uri=f"/nowhere/{i}.jpg",
                status=ItemStatus.SUCCEEDED,
                threshold=0.94,
                model=ModelRef(PHOTO_MODEL, "1"),
                started_at=started,
                finished_at=started + dt.timedelta(seconds=i),
                label=label,
                label_index=0,
                confidence=confidence,
                top_k=[Prediction(label, 0, confidence)],
            )
            for i in range(n)
        ]
    )
    writer.close()


@pytest.mark.slow
def test_drift_against_itself_and_a_shifted_baseline(ics_home: Path, mixed: Path) -> None:
    results = ics_home / "results.jsonl"
    classify(mixed, results)
    out = ics_home / "same"
    code, doc, output = report(str(results), "--baseline", str(results), "--out", str(out))
    assert code == ExitCode.OK, output
    assert doc is not None and doc["drift"] is not None
    assert doc["drift"]["psi"] == pytest.approx(0.0, abs=1e-9)
    assert not doc["drift"]["drifted"]
    page = assert_report(out, (*CHARTS, "drift"))
    assert "no drift: PSI confidence 0.000, labels 0.000 (limit 0.2)" in page

    shifted = ics_home / "shifted.jsonl"
    generated_results(shifted, 200, label="espresso", confidence=0.99)
    out = ics_home / "drift"
    # A real process, once: the exit code is the one a script sees.
    proc = ics_process("report", str(results), "--baseline", str(shifted), "--out", str(out))
    assert proc.returncode == ExitCode.DRIFT, proc.stdout + proc.stderr
    assert "DRIFT: PSI confidence" in proc.stdout
    page = assert_report(out, (*CHARTS, "drift"))
    line = re.search(r'<p class="drift">DRIFT: PSI confidence ([\d.]+), labels ([\d.]+)', page)
    assert line is not None
    assert float(line.group(1)) > 0.2 and float(line.group(2)) > 0.2
    # Both distributions are drawn: the baseline's grey and the current blue bars.
    drift_png = pixels(out / "drift.png")
    assert has_colour(drift_png, (0x90, 0xA4, 0xAE), 500)
    assert has_colour(drift_png, (0x15, 0x65, 0xC0), 500)
    # The limit is a setting: raised above the PSI, the same comparison passes.
    code, doc, output = report(
        str(results), "--baseline", str(shifted), "--out", str(out), "--psi-limit", "1000"
    )
    assert code == ExitCode.OK, output
    assert doc is not None and doc["drift"]["limit"] == 1000 and not doc["drift"]["drifted"]


def test_psi_follows_its_formula() -> None:
    assert psi({"a": 5, "b": 5}, {"a": 5, "b": 5}) == 0.0
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi({"a": 50, "b": 50}, {"a": 90, "b": 10}) == pytest.approx(expected)
    # An empty bin counts as EPSILON on both sides of the formula.
    disjoint = 2 * (1 - EPSILON) * math.log(1 / EPSILON)
    assert psi({"a": 3}, {"b": 7}) == pytest.approx(disjoint)
    assert psi({}, {"a": 1}) == 0.0


def _stats_of(labels: list[str], confidences: np.ndarray) -> Stats:
    stats = Stats()
    for label, c in zip(labels, confidences, strict=True):
        stats.add(ReportRow(status="SUCCEEDED", label=label, confidence=float(c)))
    return stats


def test_two_samples_of_one_distribution_over_1000_labels_are_no_drift() -> None:
    rng = np.random.default_rng(7)
    names = [f"label-{i}" for i in range(1000)]
    weights = 1.0 / np.arange(1, 1001)  # Zipf: a few labels common, most rare
    weights /= weights.sum()

    def sample(n: int) -> Stats:
        return _stats_of(list(rng.choice(names, n, p=weights)), rng.beta(5, 2, n))

    for n in (200, 1000):
        drift = compare(sample(n), sample(n), 0.2)
        assert not drift.drifted, (n, drift.line())
    # A real shift of labels still reads as drift: the current source's labels are rare ones.
    shifted = _stats_of(list(rng.choice(names[500:], 500)), rng.beta(5, 2, 500))
    drift = compare(sample(500), shifted, 0.2)
    assert drift.drifted and drift.label_psi > 1.0, drift.line()


def failed_results(path: Path) -> None:
    """A results file (its format from the suffix) of one FAILED item: no row classified."""
    writer = ResultsWriter(str(path))
    now = dt.datetime.now(dt.UTC)
    writer.write(
        [
            ItemResult(
                "x",
                "0",
                "/gone.jpg",
                ItemStatus.FAILED,
                0.94,
                ModelRef("m", "1"),
                now,
                now,
                error=ErrorInfo("SourceNotFound", "gone"),
            )
        ]
    )
    writer.close()


def test_a_source_with_no_classified_rows_is_not_comparable(ics_home: Path) -> None:
    results = ics_home / "results.jsonl"
    generated_results(results, 50, label="espresso", confidence=0.99)
    failed = ics_home / "failed.jsonl"
    failed_results(failed)
    for source, baseline, who in ((failed, results, "SOURCE"), (results, failed, "the baseline")):
        code, doc, output = report(str(source), "--baseline", str(baseline), "--out", "r")
        assert code == ExitCode.DRIFT, output
        assert doc is not None and doc["drift"]["drifted"]
        assert f"DRIFT: not comparable: {who} has no classified rows" in doc["drift"]["line"]
        assert_drawn(ics_home.parent / "r" / "drift.png")


# --- ics show -------------------------------------------------------------------------------


@pytest.mark.slow
def test_show_writes_an_annotated_image(ics_home: Path, photos: Path) -> None:
    coffee = photos / "coffee.jpg"
    target = ics_home / "coffee-shown.png"
    proc = ics_process("show", str(coffee), "--out", str(target), "-k", "3")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert "espresso" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert len(re.findall(r"^│ \d │", proc.stdout, re.M)) == 3
    shown = assert_drawn(target)
    with Image.open(coffee) as original:
        size = original.size
        small = np.asarray(original.convert("RGB").resize((64, 64)))
    assert (shown.shape[1], shown.shape[0]) != size
    assert not np.array_equal(np.asarray(Image.fromarray(shown).resize((64, 64))), small)
    # The confidence bars are drawn in their colour.
    assert has_colour(shown, (21, 101, 192), 1000)

    res = ics("show", str(coffee), "--json", "--out", str(ics_home / "c.png"))
    doc = json.loads(res.stdout)
    assert doc["label"] == "espresso" and doc["status"] == "SUCCEEDED"
    assert len(doc["top_k"]) == 5 and doc["top_k"][0]["confidence"] == doc["confidence"]


def test_show_and_report_read_s3_with_the_storage_settings(
    aws: AwsServer, ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name=REGION)
    s3.create_bucket(Bucket="shots")
    s3.put_object(Bucket="shots", Key="coffee.jpg", Body=(photos / "coffee.jpg").read_bytes())
    # Only the storage setting knows the server: the AWS default would be the real one.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage = json.dumps({"s3": {"endpoint_url": aws.url}})
    proc = ics_process(
        "show",
        "s3://shots/coffee.jpg",
        "--json",
        "--out",
        str(ics_home / "c.png"),
        env={"ICS_STORAGE": storage},
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert json.loads(proc.stdout)["label"] == "espresso"
    # The report's contact sheet reads the result's image from S3 too: no placeholder.
    results = ics_home / "results.jsonl"
    generated_results(results, 1, label="espresso", confidence=0.5)
    results.write_text(results.read_text().replace("/nowhere/0.jpg", "s3://shots/coffee.jpg"))
    proc = ics_process(
        "report", str(results), "--out", str(ics_home / "r"), env={"ICS_STORAGE": storage}
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert not has_colour(pixels(ics_home / "r" / "lowest.png"), PLACEHOLDER, 1000)


def test_show_of_a_broken_image_is_one_line(ics_home: Path) -> None:
    broken = ics_home / "broken.jpg"
    broken.write_bytes(f.truncated_jpeg())
    res = ics("show", str(broken))
    assert res.exit_code == ExitCode.FAILED
    assert res.output.count("\n") == 1 and "FAILED, InvalidImage" in res.output
    assert not list(ics_home.parent.glob("*.annotated.png"))


# --- bounded memory --------------------------------------------------------------------------


def many_results(path: Path, n: int) -> None:
    """n varied result records (every status, 1,000 labels, failures) written as they go."""
    labels = get_card(PHOTO_MODEL).labels
    rng = np.random.default_rng(7)
    started = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    with path.open("w") as out:
        for i in range(n):
            finished = started + dt.timedelta(seconds=i)
            r = ItemResult(
                execution_id="big",
                item_id=str(i),
                uri=f"/nowhere/{i}.jpg",
                status=ItemStatus.FAILED,
                threshold=0.94,
                model=ModelRef(PHOTO_MODEL, "1"),
                started_at=finished,
                finished_at=finished,
            )
            if i % 50 == 0:
                r.error = ErrorInfo("SourceNotFound", "no such file")
            else:
                conf = float(rng.beta(5, 1))
                r.status = ItemStatus.SUCCEEDED if conf >= 0.94 else ItemStatus.LOW_CONFIDENCE
                idx = rng.integers(0, len(labels), 5)
                r.top_k = [Prediction(labels[j], int(j), conf / (k + 1)) for k, j in enumerate(idx)]
                r.label, r.label_index, r.confidence = labels[idx[0]], int(idx[0]), conf
            out.write(json.dumps(r.to_dict()) + "\n")


@pytest.mark.slow
def test_40000_rows_render_in_bounded_memory(tmp_path: Path, ics_home: Path) -> None:
    n = 40_000
    path = tmp_path / "big.jsonl"
    many_results(path, n)
    settings = load_settings().settings
    tracemalloc.start()
    try:
        stream = open_rows(str(path), settings)
        stats = collect(stream, 24)
        _, read_peak = tracemalloc.get_traced_memory()
        summary = render(stream, stats, tmp_path / "report", settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["rows"] == n and summary["statuses"]["FAILED"] == n // 50
    assert_report(tmp_path / "report")
    # Holding the rows would take more than the file's 28 MB of text; streaming keeps only
    # counters, a 5,000-point sample and the 24 lowest rows (about 1.5 MB measured at
    # 100,000 rows), and drawing adds matplotlib's figures (about 25 MB).
    size = path.stat().st_size
    assert size > 20_000_000
    assert read_peak < 10_000_000, f"reading {n:,} rows peaked at {read_peak:,} bytes"
    assert peak < 60_000_000, f"the report of {n:,} rows peaked at {peak:,} bytes"
    # Every image of the contact sheet is missing: placeholders, not a crash.
    assert len(stats.lowest()) == 24


# --- errors ---------------------------------------------------------------------------------


def test_clear_errors_for_a_missing_source_or_an_unwritable_out(ics_home: Path) -> None:
    res = ics("report", "missing.jsonl", "--out", "report")
    assert res.exit_code == ExitCode.USAGE
    assert "SOURCE missing.jsonl does not exist" in res.output
    assert res.output.count("\n") == 1
    a_file = ics_home / "a-file"
    a_file.write_text("x")
    results = ics_home / "results.jsonl"
    generated_results(results, 3, label="espresso", confidence=0.99)
    for out in (a_file, a_file / "report"):
        res = ics("report", str(results), "--out", str(out))
        assert res.exit_code == ExitCode.USAGE, res.output
        assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
        assert str(out) in res.output
    res = ics("report", str(results), "--out", "r", "--baseline", "gone/results.csv")
    assert res.exit_code == ExitCode.USAGE
    assert "SOURCE gone/results.csv does not exist" in res.output
    # A folder without capture records, such as the photos themselves.
    pictures = ics_home / "pictures"
    pictures.mkdir()
    (pictures / "a.jpg").write_bytes(f.truncated_jpeg())
    res = ics("report", str(pictures), "--out", "r")
    assert res.exit_code == ExitCode.USAGE
    assert f"no .jsonl capture files under {pictures}" in res.output
    # A bare word is taken for an execution id, and the message says so.
    ics("classify", str(a_file), "-o", str(ics_home / "one.jsonl"))
    res = ics("report", "typo", "--out", "r")
    assert res.exit_code == ExitCode.USAGE
    assert "SOURCE typo is no file or folder, so it was taken for an execution id" in res.output
    assert "no execution 'typo'" in res.output


def test_bad_records_are_skipped_and_empty_charts_say_so(ics_home: Path) -> None:
    results = ics_home / "results.jsonl"
    generated_results(results, 3, label="espresso", confidence=0.99)
    with results.open("a") as out:
        out.write("{broken\n")
        out.write(json.dumps({"status": "SOMETHING"}) + "\n")
    code, doc, output = report(str(results), "--out", "report")
    assert code == ExitCode.OK, output
    assert doc is not None and doc["rows"] == 3 and doc["skipped"] == 2
    page = assert_report(ics_home.parent / "report")
    assert "Records skipped (unreadable)" in page
    # --threshold draws another line than the one the results were decided with.
    code, doc, output = report(str(results), "--out", "report", "-t", "0.5")
    assert code == ExitCode.OK and doc is not None and doc["threshold"] == 0.5, output
    # Only failures: no confidences, labels, time series or images, and each chart says so.
    only_failures = ics_home / "failed.csv"
    failed_results(only_failures)
    code, doc, output = report(str(only_failures), "--out", "empty")
    assert code == ExitCode.OK, output
    assert_report(ics_home.parent / "empty")


def test_a_non_finite_confidence_skips_its_row_not_the_report(ics_home: Path) -> None:
    results = ics_home / "results.jsonl"
    generated_results(results, 3, label="espresso", confidence=0.99)
    good = read_jsonl(results)[0]
    with results.open("a") as out:
        for field, value in (("confidence", "NaN"), ("confidence", "Infinity")):
            out.write(json.dumps(good).replace('"confidence": 0.99', f'"{field}": {value}', 1))
            out.write("\n")
    code, doc, output = report(str(results), "--out", "report")
    assert code == ExitCode.OK, output
    assert doc is not None and doc["rows"] == 3 and doc["skipped"] == 2
    assert_report(ics_home.parent / "report")


def test_progress_bar_on_request(ics_home: Path) -> None:
    results = ics_home / "results.jsonl"
    generated_results(results, 2500, label="espresso", confidence=0.99)
    res = ics("report", str(results), "--out", "report", "--progress")
    assert res.exit_code == ExitCode.OK, res.output
    assert "reading" in res.stderr and "2,500 rows" in res.stderr


def test_ics_starts_without_matplotlib() -> None:
    """matplotlib is imported by the report only: `ics` itself does not pay for it."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ics_service.cli import main\n"
        "assert CliRunner().invoke(main, ['report', '--help']).exit_code == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
