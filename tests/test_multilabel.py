"""Multi-label models (outputs = "sigmoid"): each label decided against its own threshold,
every label over it recorded, through `ics models add`, `ics classify` (results file and
store) and `ics serve`, as real processes.

The model is a small real network built here with torch and exported to ONNX: each output
is the sigmoid of one colour channel's mean, so a red image is "red", a yellow one "red"
and "green", and a grey one is nothing for certain.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from cli import ics_process
from ics_service.policies import decide
from ics_service.types import ItemResult, ItemStatus, LabelScore
from serving import serve_process

LABELS = ("red", "green", "blue")
SIZE = 32
#: The colour photos, and what the model says of each (about): name -> RGB.
COLOURS = {
    "red": (220, 30, 30),  # red 1.0, green 0.0, blue 0.0
    "yellow": (220, 200, 30),  # red 1.0, green 1.0 (0.9999), blue 0.0
    "grey": (128, 128, 128),  # each 0.51: none reaches 0.6
    "navy": (30, 30, 150),  # blue 0.89: over the default 0.6, under blue's own 0.95
}


def tricolour(folder: Path, *, sigmoid: bool = True) -> Path:
    """The network, exported: (N, 3, SIZE, SIZE) normalised pixels → (N, 3) scores."""
    import torch

    class Tricolour(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.head = torch.nn.Linear(3, 3)
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(3) * 12.0)
                self.head.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.head(self.pool(x).flatten(1))
            return torch.sigmoid(logits) if sigmoid else logits

    path = folder / ("model.onnx" if sigmoid else "logits.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Tricolour().eval(),
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixels"],
            output_names=["scores"],
            dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multilabel")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    photos = folder / "photos"
    photos.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64, 48), rgb).save(photos / f"{name}.png")
    return {
        "onnx": tricolour(folder),
        "logits": tricolour(folder, sigmoid=False),
        "labels": folder / "labels.txt",
        "photos": photos,
    }


@pytest.fixture(scope="module")
def home(model_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ICS home with the model added as `tricolour`: threshold 0.6, blue's own 0.95."""
    home = tmp_path_factory.mktemp("multilabel-home")
    res = ics_process(
        "models", "add", "tricolour", "--onnx", str(model_files["onnx"]),
        "--labels", str(model_files["labels"]), "--size", str(SIZE), "--crop", "1",
        "--outputs", "sigmoid", "--threshold", "0.6", "--label-threshold", "blue=0.95",
        "--home", str(home),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return home


def over(record: dict[str, Any]) -> list[tuple[str, float]]:
    return [(x["label"], x["threshold"]) for x in record["labels"]]


def check_records(records: dict[str, dict[str, Any]]) -> None:
    """What the model must say of each colour photo, read from any of its records."""
    assert set(records) == set(COLOURS)
    red, yellow, grey, navy = (records[n] for n in ("red", "yellow", "grey", "navy"))
    assert (red["status"], red["label"], over(red)) == ("SUCCEEDED", "red", [("red", 0.6)])
    # Both over 0.6, the more confident first; the top label is the more confident one.
    assert yellow["status"] == "SUCCEEDED"
    assert over(yellow) == [("red", 0.6), ("green", 0.6)]
    assert yellow["label"] == "red"
    assert yellow["labels"][0]["confidence"] >= yellow["labels"][1]["confidence"] > 0.99
    # None reaches its threshold: LOW_CONFIDENCE, no label over, the top one named.
    assert (grey["status"], grey["labels"]) == ("LOW_CONFIDENCE", [])
    assert 0.5 < grey["confidence"] < 0.6
    # Blue is at 0.89: over the model's 0.6, under blue's own 0.95.
    assert (navy["status"], navy["label"], navy["labels"]) == ("LOW_CONFIDENCE", "blue", [])
    assert 0.6 < navy["confidence"] < 0.95
    for r in records.values():
        assert r["threshold"] == 0.6
        assert r["top_k"][0]["label"] == r["label"]
        # Independent probabilities: they need not sum to 1.
        assert all(0.0 <= p["confidence"] <= 1.0 for p in r["top_k"])
    assert sum(p["confidence"] for p in yellow["top_k"]) > 1.9


def by_photo(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(r["uri"]).stem: r for r in records}


def test_classify_records_every_label_over_its_threshold(
    home: Path, model_files: dict[str, Path]
) -> None:
    """Through `ics classify`: the JSON Lines results, the CSV results and the store agree."""
    jsonl, table = home / "results.jsonl", home / "results.csv"
    for out in (jsonl, table):
        res = ics_process(
            "classify", str(model_files["photos"]), "--model", "tricolour", "-o", str(out),
            "--home", str(home), "--name", f"run{out.suffix}",
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    check_records(by_photo(records))

    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    parsed = [
        {**row, "labels": json.loads(row["labels"]), "top_k": json.loads(row["top_k"]),
         "confidence": float(row["confidence"]), "threshold": float(row["threshold"])}
        for row in rows
    ]  # fmt: skip
    check_records(by_photo(parsed))

    res = ics_process("executions", "show", "run.jsonl", "--results", "--json", "--home", str(home))
    assert res.returncode == 0, res.stdout + res.stderr
    check_records(by_photo(json.loads(res.stdout)["results"]))


def test_serve_answers_the_labels_over_their_thresholds(
    home: Path, model_files: dict[str, Path]
) -> None:
    with serve_process("--model", "tricolour", "--home", str(home)) as served:
        records = {}
        for name in COLOURS:
            data = (model_files["photos"] / f"{name}.png").read_bytes()
            r = httpx.post(
                f"{served.url}/v1/classify",
                content=data,
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            records[name] = r.json()
    check_records(records)


def test_a_threshold_flag_sets_the_labels_without_their_own(
    home: Path, model_files: dict[str, Path]
) -> None:
    """--threshold 0.5: grey's three labels (0.51) are now over; blue keeps its 0.95."""
    out = home / "half.jsonl"
    res = ics_process(
        "classify", str(model_files["photos"]), "--model", "tricolour", "--threshold", "0.5",
        "-o", str(out), "--home", str(home),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    records = by_photo([json.loads(line) for line in out.read_text().splitlines()])
    grey = records["grey"]
    assert grey["status"] == "SUCCEEDED"
    assert sorted(over(grey)) == [("green", 0.5), ("red", 0.5)]  # blue: 0.51 < 0.95
    assert records["navy"]["status"] == "LOW_CONFIDENCE"


def test_a_report_of_the_capture_decides_as_the_run_did(
    home: Path, model_files: dict[str, Path]
) -> None:
    """Captured probabilities decided again by `ics report` with the labels' own thresholds:
    the same statuses as the run (navy's blue, at 0.89, is not over its 0.95)."""
    capture, out = home / "capture", home / "captured.jsonl"
    res = ics_process(
        "classify", str(model_files["photos"]), "--model", "tricolour", "--capture",
        str(capture), "-o", str(out), "--home", str(home),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    ran = Counter(json.loads(line)["status"] for line in out.read_text().splitlines())
    assert ran == {"SUCCEEDED": 2, "LOW_CONFIDENCE": 2}
    res = ics_process(
        "report", str(capture), "--model", "tricolour", "--out", str(home / "report"),
        "--json", "--home", str(home),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["statuses"] == dict(ran)


def test_a_threshold_for_a_label_the_model_has_not_is_refused(
    model_files: dict[str, Path], tmp_path: Path
) -> None:
    res = ics_process(
        "models", "add", "typo", "--onnx", str(model_files["onnx"]),
        "--labels", str(model_files["labels"]), "--size", str(SIZE), "--crop", "1",
        "--outputs", "sigmoid", "--label-threshold", "bleu=0.9", "--home", str(tmp_path),
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "'bleu'" in res.stderr and "not one of its labels" in res.stderr


def test_logits_given_as_sigmoid_fail_clearly(model_files: dict[str, Path]) -> None:
    """A model whose graph does not end in the sigmoid gives scores that no threshold can be
    read against: its run says so instead of deciding on them."""
    from ics_service.errors import InferenceError
    from ics_service.modelcard import ModelCard
    from ics_service.models.runtime import OnnxRuntime

    card = ModelCard(
        name="bare",
        version="1",
        description="",
        input_size=SIZE,
        crop_pct=1.0,
        outputs="sigmoid",
        labels_path=str(model_files["labels"]),
        model_path=str(model_files["logits"]),
    )
    runtime = OnnxRuntime(card, model_files["logits"])
    batch = np.ones((2, 3, SIZE, SIZE), dtype=np.float32)
    with pytest.raises(InferenceError, match=r"to 12.*outputs = 'sigmoid'.*end in a sigmoid"):
        runtime.predict(batch)


# --- the decision itself ------------------------------------------------------------------


def test_decide_multi_label() -> None:
    probs = np.asarray(
        [[0.9, 0.7, 0.2], [0.55, 0.3, 0.96], [0.1, 0.2, 0.3], [0.625, 0.625, 0.75]],
        dtype=np.float32,
    )
    thresholds = (0.6, 0.6, 0.75)
    d = decide(probs, threshold=0.99, top_k=2, labels=LABELS, label_thresholds=thresholds)
    assert [x.status for x in d] == [
        ItemStatus.SUCCEEDED,
        ItemStatus.SUCCEEDED,
        ItemStatus.LOW_CONFIDENCE,
        ItemStatus.SUCCEEDED,
    ]
    f32 = [float(np.float32(v)) for v in (0.9, 0.7, 0.96)]
    assert d[0].over == [LabelScore("red", 0, f32[0], 0.6), LabelScore("green", 1, f32[1], 0.6)]
    assert (d[0].label, d[0].index) == ("red", 0)
    # Red's 0.55 is under 0.6: blue alone, at 0.96 over its 0.75.
    assert d[1].over == [LabelScore("blue", 2, f32[2], 0.75)]
    assert (d[2].label, d[2].confidence, d[2].over) == ("blue", float(np.float32(0.3)), [])
    # A score equal to its threshold reaches it (0.75 is exact in float32); ties keep the
    # labels' order.
    assert [x.label for x in d[3].over or []] == ["blue", "red", "green"]
    assert [len(x.top_k) for x in d] == [2, 2, 2, 2]
    # Single-label decisions are unchanged: no `over`.
    (single,) = decide(probs[:1], threshold=0.5, top_k=1, labels=LABELS)
    assert single.over is None and single.status is ItemStatus.SUCCEEDED


def test_the_result_record_round_trips_its_labels() -> None:
    import datetime as dt

    from ics_service.outputs import flat_record
    from ics_service.types import ModelRef

    now = dt.datetime(2026, 12, 8, tzinfo=dt.UTC)
    r = ItemResult(
        execution_id="e",
        item_id="1",
        uri="a.png",
        status=ItemStatus.SUCCEEDED,
        threshold=0.6,
        model=ModelRef("tricolour", "1"),
        started_at=now,
        finished_at=now,
        labels=[LabelScore("red", 0, 0.9, 0.6)],
    )
    d = r.to_dict()
    assert d["labels"] == [{"label": "red", "index": 0, "confidence": 0.9, "threshold": 0.6}]
    assert ItemResult.from_dict(d) == r
    assert json.loads(flat_record(r)["labels"]) == d["labels"]
    single = ItemResult.from_dict({**d, "labels": None})
    assert single.labels is None and flat_record(single)["labels"] is None
    # A record written before multi-label results existed reads as single-label.
    old = {k: v for k, v in d.items() if k != "labels"}
    assert ItemResult.from_dict(old).labels is None
