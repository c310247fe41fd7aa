"""A bad line is skipped whatever its shape (nested 100,000 deep, not UTF-8, cut), by every
reader of lines, as real `ics` processes; labels and error types that look like TeX are drawn
as text by every chart."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import ics_process
from ics_service import jsonlines
from ics_service.capture.record import capture_record, encode
from ics_service.errors import ExitCode

#: Lines no reader may stop at: deeper than any recursion limit, deep but under it, deep
#: inside a string field's JSON, not UTF-8, cut.
HOSTILE = (
    b"[" * 100_000 + b"\n",
    b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"\n",
    b"[" * 900 + b"]" * 900 + b"\n",
    b'{"status": "SUCCEEDED", "top_k": ' + b"[" * 900 + b"]" * 900 + b"}\n",
    b'{"status": "\xff\xfe"}\n',
    b'{"status": "SUCC\n',
)
#: Labels and error types that mathtext would parse (or fail to).
TEX = ("$\\frac{", "a$b$c", "$\\frac{$", "\\$x$^{2}$", "$$")


def test_the_parser_turns_every_shape_into_bad_line() -> None:
    for line in HOSTILE[:3] + HOSTILE[4:]:
        with pytest.raises(jsonlines.BadLine):
            jsonlines.loads(line)
    with pytest.raises(jsonlines.BadLine, match="nested deeper than 64 levels"):
        jsonlines.loads(HOSTILE[3])
    assert jsonlines.loads(b'{"a": [[1, 2], {"b": null}]}') == {"a": [[1, 2], {"b": None}]}
    assert jsonlines.loads("[" * 64 + "]" * 64) is not None


def result(i: int, label: str, status: str = "SUCCEEDED", error: str | None = None) -> bytes:
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
    doc = {
        "execution_id": "e",
        "item_id": str(i),
        "uri": f"/nowhere/{i}.jpg",
        "status": status,
        "label": None if error else label,
        "label_index": None if error else 0,
        "confidence": None if error else 0.5 + i / 100,
        "top_k": [] if error else [{"label": label, "index": 0, "confidence": 0.5 + i / 100}],
        "threshold": 0.94,
        "model": {"name": "m", "version": "1"},
        "error": {"type": error, "message": "x"} if error else None,
        "finished_at": when.isoformat(),
    }
    return json.dumps(doc).encode() + b"\n"


def drawn_text_rows(path: Path) -> int:
    """Rows of the PNG that hold dark ink (text or axes)."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L"))
    return int((arr < 100).any(axis=1).sum())


def test_report_skips_every_hostile_line_reads_what_follows_and_draws_tex_as_text(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.jsonl"
    good = [result(i, TEX[i % len(TEX)]) for i in range(10)]
    good += [result(10 + i, "", "FAILED", error=t) for i, t in enumerate(TEX)]
    lines = []
    for i, line in enumerate(good):
        lines.append(line)
        if i < len(HOSTILE):
            lines.append(HOSTILE[i])
    results.write_bytes(b"".join(lines))

    out = tmp_path / "report"
    # The file is its own baseline too: the drift chart draws the labels as well.
    done = ics_process(
        "report", str(results), "--out", str(out), "--baseline", str(results), "--json"
    )
    assert done.returncode == ExitCode.OK, done.stderr
    doc = json.loads(done.stdout)
    assert doc["rows"] == len(good), doc
    assert doc["skipped"] == len(HOSTILE), doc
    assert set(doc["failures_by_type"]) == set(TEX)
    # Each skipped line is named by its line number (not JSON: "line N"; JSON but not a
    # result: "record N", which in JSON Lines is the line number too).
    for n in range(2, 2 * len(HOSTILE) + 1, 2):
        assert f"l, line {n}:" in done.stderr or f"l, record {n}:" in done.stderr, n
    assert "nested deeper than 64 levels" in done.stderr
    for chart in ("labels", "failures", "drift", "status", "timeline"):
        assert drawn_text_rows(out / f"{chart}.png") > 20, chart


def capture_line(i: int) -> bytes:
    probs = np.full(1000, 0.5 / 999)
    probs[967] = 0.5
    when = dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
    record = capture_record(
        inference_id=f"e/{i}",
        inference_time=when,
        mode="input_and_output",
        data=b"\xff\xd8 not really a jpeg",
        content_type="image/jpeg",
        probs=probs.tolist(),
    )
    return encode(record)


def test_capture_read_skips_every_hostile_line_and_reads_what_follows(
    ics_home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "capture" / "ics" / "AllTraffic" / "2026" / "01" / "01" / "10"
    folder.mkdir(parents=True)
    lines = []
    for i, bad in enumerate(HOSTILE):
        lines += [capture_line(i), bad]
    # A record whose endpointOutput.data (JSON inside the line) is nested too deep.
    deep_output = json.loads(capture_line(50))
    deep_output["captureData"]["endpointOutput"]["data"] = "[" * 100_000
    lines += [json.dumps(deep_output).encode() + b"\n", capture_line(99)]
    f = folder / "00-00-000-x.jsonl"
    f.write_bytes(b"".join(lines))

    done = ics_process("capture", "read", str(tmp_path / "capture"), "--json")
    assert done.returncode == ExitCode.OK, done.stderr
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["inference_id"] for d in docs] == [f"e/{i}" for i in range(len(HOSTILE))] + ["e/99"]
    assert all(d["label"] == "espresso" for d in docs)
    for n in [*range(2, 2 * len(HOSTILE) + 1, 2), 2 * len(HOSTILE) + 1]:
        assert f"{f}:{n}: not a capture record" in done.stderr, (n, done.stderr)
    assert "endpointOutput.data is not JSON: nested deeper than 64 levels" in done.stderr


def test_a_deep_manifest_line_is_a_usage_error_naming_it(ics_home: Path, tmp_path: Path) -> None:
    """A manifest's bad line ends the command before any work, whatever its shape (a
    manifest's lines are the items: skipping one would lose it)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"uri": "/a.jpg"}\n' + HOSTILE[0])
    done = ics_process("classify", f"@{manifest}", "-o", str(tmp_path / "out.jsonl"))
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "line 2 is not JSON: nested deeper than 64 levels" in done.stderr
