"""The benchmark harness keeps working: every runner on a tiny corpus, no speeds asserted.

The numbers come from `make bench`; this only checks that each runner classifies every
image and that the results table is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.corpus import SIZES, ensure_corpus, make_image  # noqa: E402
from benchmarks.profiling import summarise  # noqa: E402
from benchmarks.report import bound_summary  # noqa: E402

#: Tiny runs: a few images, short bound measurements, no warm-up, no model preparation.
SMOKE_ENV = {
    "BENCH_N": "8",
    "BENCH_N_LARGE": "1",
    "BENCH_REPEATS": "1",
    "BENCH_MEM_N": "16",
    "BENCH_MEM_BASE": "8",
    "BENCH_ONE_IMAGE_RUNS": "1",
    "BENCH_BOUNDS_MIN_S": "0.05",
    "BENCH_AGREE_N": "8",
    "BENCH_WARMUP": "0",
    "BENCH_PREPARE": "0",
    "BENCH_TIMEOUT_S": "120",
}


def test_corpus_is_deterministic_and_varied() -> None:
    a, meta = make_image(7, "small", 3)
    b, _ = make_image(7, "small", 3)
    c, _ = make_image(7, "small", 4)
    d, _ = make_image(8, "small", 3)
    assert a == b
    assert len({a, c, d}) == 3
    assert a[:3] == b"\xff\xd8\xff"
    assert set(meta) >= {"photo", "portrait", "quality"}


def test_corpus_folder_has_exactly_n_images(tmp_path: Path) -> None:
    from PIL import Image

    folder = ensure_corpus(tmp_path, "small", 3, seed=1)
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 3
    with Image.open(files[0]) as im:
        assert sorted(im.size) == sorted(SIZES["small"])
    # A smaller corpus of the same seed is a prefix of the larger one.
    again = ensure_corpus(tmp_path, "small", 2, seed=1)
    assert [p.read_bytes() for p in sorted(again.glob("*.jpg"))] == [
        p.read_bytes() for p in files[:2]
    ]


def test_profile_headline_groups_samples_by_stage_and_thread() -> None:
    raw = "\n".join(
        [
            "thread (1): MainThread;main (cli.py:1);predict (ics_service/models/runtime.py:9) 60",
            "thread (2): ics-decode-0;worker (pipeline.py:1);decode (ics_service/imaging.py:5) 30",
            "thread (2): ics-decode-0;worker (pipeline.py:1);Queue.put (queue.py:140) 10",
        ]
    )
    h = summarise(raw, rate=100)
    assert h.samples == 100
    assert h.by_thread["MainThread"]["inference (onnxruntime)"] == 60
    assert h.by_thread["ics-decode-N"]["decode + preprocess"] == 30
    assert h.by_thread["ics-decode-N"]["waiting"] == 10
    assert any("inference" in line for line in h.lines())


def test_pipelined_bound_is_the_better_schedule() -> None:
    report = {
        "cpus": 2,
        "preprocessor": "x",
        "model": {
            "best_images_per_s": 400.0,
            "one_thread_images_per_s": 250.0,
            "per_core_sessions_images_per_s": 450.0,
            "per_core_sessions_best_batch": 1,
            "best_batch": 8,
            "images_per_s_by_batch": {"1": 350.0, "8": 400.0},
        },
        "decode": {"small": {"ics_ms": 2.0, "plain_ms": 3.0}},
    }
    b = bound_summary([report])["pipelined"]["small"]
    assert b["shared_cores"] == pytest.approx(1 / (1 / 400 + 0.002 / 2))
    assert b["per_core"] == pytest.approx(1 / (1 / 450 + 0.002 / 2))
    assert b["bound"] == max(b["shared_cores"], b["per_core"])


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, str]:
    """An environment whose ICS home holds the session's prepared model."""
    home = tmp_path_factory.mktemp("bench-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICS_", "BENCH_"))}
    out = tmp_path_factory.mktemp("bench-out")
    env.update(SMOKE_ENV, ICS_HOME=str(home), BENCH_OUT=str(out))
    env["BENCH_RESULTS"] = str(out / "RESULTS.md")
    return env


def _run_bench(env: dict[str, str], **knobs: str) -> tuple[str, dict[str, object]]:
    env = {**env, **knobs}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = Path(env["BENCH_OUT"])
    return Path(env["BENCH_RESULTS"]).read_text(), json.loads((out / "results.json").read_text())


def _ok_runs(doc: dict[str, object]) -> set[tuple[str, str]]:
    runs = doc["runs"]
    assert isinstance(runs, list)
    assert all(r["ok"] for r in runs), [r["problem"] for r in runs if not r["ok"]]
    return {(r["runner"], r["size"]) for r in runs}


@pytest.mark.slow
def test_every_runner_but_ray_on_a_tiny_corpus(bench_env: dict[str, str]) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ics,ics-lean,ics-int8,plain,http,bounds",
        BENCH_LARGE_RUNNERS="ics,plain,http",
    )
    assert _ok_runs(doc) >= {
        ("ics", "small"),
        ("ics", "large"),
        ("ics-lean", "small"),
        ("plain", "small"),
        ("plain", "large"),
        ("http", "small"),
        ("http", "large"),
        ("bounds", "-"),
    }
    extra = doc["extra"]
    assert isinstance(extra, dict)
    assert [m["ok"] for m in extra["memory"]] == [True, True]
    assert [m["ok"] for m in extra["one_image"]] == [True]
    for heading in ("## Machine", "## Small photos", "## Large photos", "## Targets", "Bounds"):
        assert heading in table
    assert "pipelined bound" in table
    # INT8 is measured when ICS has the model prepared, and skipped with a note otherwise.
    assert "INT8" in table
    # The report can be written again from the raw results alone.
    results = Path(bench_env["BENCH_RESULTS"])
    results.unlink()
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--rerender"],
        cwd=ROOT,
        env=bench_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert results.read_text() == table


@pytest.mark.slow
def test_ray_data_runner_on_a_tiny_corpus(bench_env: dict[str, str]) -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the Ray Data peer needs the bench extra: pip install -e '.[bench]'")
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ray",
        BENCH_N_LARGE="0",
        BENCH_MEM_N="0",
        BENCH_ONE_IMAGE_RUNS="0",
        BENCH_PROFILE="0",
    )
    assert _ok_runs(doc) == {("ray", "small")}
    assert "Ray Data" in table


@pytest.mark.slow
def test_serving_runners_on_a_tiny_corpus(bench_env: dict[str, str]) -> None:
    if importlib.util.find_spec("litserve") is None:
        pytest.skip("the LitServe peer needs litserve: pip install -e '.[bench]'")
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="serve,litserve",
        BENCH_N_LARGE="0",
        BENCH_MEM_N="0",
        BENCH_ONE_IMAGE_RUNS="0",
        BENCH_PROFILE="0",
    )
    assert _ok_runs(doc) == {("serve", "small"), ("litserve", "small")}
    runs = doc["runs"]
    assert isinstance(runs, list)
    passes = {
        r["runner"]: [(p["clients"], p["ok"], p["errors"]) for p in r["report"]["passes"]]
        for r in runs
    }
    assert passes == {"serve": [(1, 8, 0), (32, 8, 0)], "litserve": [(1, 8, 0), (32, 8, 0)]}
    assert "## HTTP serving" in table
    assert "÷ LitServe" in table


@pytest.mark.slow
def test_capture_runner_beside_the_default_one_on_a_tiny_corpus(
    bench_env: dict[str, str],
) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ics,ics-capture",
        BENCH_N_LARGE="0",
        BENCH_MEM_N="0",
        BENCH_ONE_IMAGE_RUNS="0",
        BENCH_PROFILE="0",
    )
    # ok means every image classified and every one of them captured (run.py's check).
    assert _ok_runs(doc) == {("ics", "small"), ("ics-capture", "small")}
    assert "`ics classify --capture`" in table
    assert "data capture ≤ 10 %" in table
    # The captures are counted, then removed: hundreds of MB in a real run.
    assert not list(Path(bench_env["BENCH_OUT"]).rglob("*-capture"))
