"""The capacity figures: benchmarks/capacity.json is what its committed inputs give, the
docs quote it through the figures check, and the store benchmark runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import capacity, figures, store_writes  # noqa: E402

DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def test_capacity_json_is_what_the_committed_runs_give() -> None:
    committed = json.loads(capacity.OUT.read_text(encoding="utf-8"))
    assert committed == capacity.compute(), (
        "benchmarks/capacity.json is stale: run `python -m benchmarks.capacity` and update "
        "docs/deploy.md's figures"
    )
    results = json.loads(capacity.RESULTS.read_text(encoding="utf-8"))
    assert committed["inputs"]["results"]["run_id"] == results["run_id"]


def test_the_arithmetic_on_a_known_input() -> None:
    results = {
        "run_id": "r",
        "summary": {
            "ics/small": {"cpu_ms_per_image": 10.0, "steady_images_per_s": 150.0, "n": 1},
            "ics/large": {"cpu_ms_per_image": 40.0, "steady_images_per_s": 40.0, "n": 1},
        },
        "runs": [
            {
                "runner": "serve",
                "size": "small",
                "ok": True,
                "report": {
                    "passes": [
                        {"clients": 1, "images_per_s": 50.0},
                        {"clients": 32, "images_per_s": 90.0},
                    ]
                },
            },
            {
                "runner": "serve",
                "size": "small",
                "ok": True,
                "report": {"passes": [{"clients": 32, "images_per_s": 110.0}]},
            },
        ],
    }
    store = {
        "run_id": "s",
        "cells": [
            {"store": "sqlite", "store_version": "3", "mode": "record", "writers": 1,
             "results_per_s": 2000.0},
            {"store": "sqlite", "store_version": "3", "mode": "record", "writers": 4,
             "results_per_s": 1500.0},
            {"store": "sqlite", "store_version": "3", "mode": "append", "writers": 4,
             "results_per_s": 250.0},
        ],
    }  # fmt: skip
    doc = capacity.capacity(results, store)
    small = doc["photos"]["small"]
    assert small["images_per_core_s"] == 100.0 and small["images_per_core_h"] == 360_000
    assert small["job_core_hours"] == 27.8  # 1e7 × 10 ms / 3600 s
    assert small["job_cores_for_target_hours"] == 28
    assert small["job_hours_on"]["64"] == 0.43
    assert small["results_per_s_on"]["16"] == 1600
    assert doc["photos"]["large"]["images_per_core_h"] == 90_000
    assert doc["serve"]["replica_images_per_h"] == 360_000
    sqlite = doc["store"]["sqlite"]
    assert sqlite["record_best_results_per_s"] == 2000.0 and sqlite["record_feeds_cores"] == 20
    assert sqlite["append_feeds_replicas"] == 2
    assert doc["job_results_per_s_in_target_hours"] == 2778


def test_the_docs_capacity_figures_are_checked() -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    assert "<!-- figures: ../benchmarks/capacity.json -->" in text
    committed = figures.committed_figures()

    def check(page: str) -> list[figures.Problem]:
        return figures.check_text(
            page,
            "docs/deploy.md",
            committed,
            lambda rel: figures.json_figures((DEPLOY_DOC.parent / rel).resolve()),
        )

    assert not check(text)
    units = {q.unit for q in figures.quoted_numbers(text)}
    assert {"images/h", "core-hours", "h", "results/s", "cores"} <= units, units
    # A figure changed in the page is caught.
    doc = capacity.compute()
    per_core_h = f"{doc['photos']['small']['images_per_core_h']:,}"
    assert per_core_h in text
    wrong = f"{doc['photos']['small']['images_per_core_h'] + 1000:,}"
    (problem,) = check(text.replace(per_core_h, wrong, 1))
    assert wrong in problem.message and "capacity.json" in problem.message


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("271,903 images an hour", "images/h"),
        ("271,903 images/h", "images/h"),
        ("36.8 core-hours", "core-hours"),
        ("on 64 cores", "cores"),
        ("in 2.3 h", "h"),
        ("in 2 hours", "h"),
        ("1,130 results/s", "results/s"),
    ],
)
def test_the_capacity_units_are_read(text: str, unit: str) -> None:
    (q,) = figures.quoted_numbers(text)
    assert q.unit == unit


def test_a_capacity_throughput_outside_a_block_fails() -> None:
    empty = figures.Figures({}, None)
    for text in ("Each core does 271,903 images an hour.", "SQLite takes 1,130 results/s."):
        (problem,) = figures.check_text(text, "x.md", empty, lambda rel: empty)
        assert "outside a <!-- figures --> block" in problem.message


def test_the_store_benchmark_runs_on_sqlite(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    argv = ["--stores", "sqlite", "--writers", "1,2", "--seconds", "0.3", "--items", "400"]
    assert store_writes.main([*argv, "--out", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    cells = {(c["mode"], c["writers"]): c for c in doc["cells"]}
    assert set(cells) == {("record", 1), ("record", 2), ("append", 1), ("append", 2)}
    for c in cells.values():
        assert c["results"] > 0 and c["results_per_s"] > 0 and c["store"] == "sqlite"
    assert doc["run_id"] and doc["load_before"]["cpus"] >= 1
