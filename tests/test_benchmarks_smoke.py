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
from benchmarks.measure import run_measured  # noqa: E402
from benchmarks.profiling import summarise  # noqa: E402
from benchmarks.report import bound_summary, one_image_summary, render_targets  # noqa: E402
from benchmarks.runners import Bench, Config  # noqa: E402

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
    # Their own tests below turn these on, on tiny corpora.
    "BENCH_SCALING": "0",
    "BENCH_RAY_TUNE_S": "0",
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
            "thread (2): ics-decode-0;worker (pipeline.py:1);"
            "decode (ics_service/imaging/preprocess.py:5) 30",
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


def test_a_tty_run_has_a_terminal_on_stdout_and_stderr(tmp_path: Path) -> None:
    show = (
        "import os, sys\n"
        "print('out', sys.stdout.isatty(), os.get_terminal_size(1).columns, os.environ['TERM'])\n"
        "print('err', sys.stderr.isatty(), file=sys.stderr)\n"
    )
    log = tmp_path / "tty.log"
    m = run_measured(
        [sys.executable, "-c", show], env={**os.environ, "TERM": "dumb"}, log_path=log, tty=True
    )
    assert m.rc == 0, m.stdout
    # Both streams on the one terminal, in the order written; the caller's TERM is kept.
    assert m.stdout.replace("\r\n", "\n") == "out True 120 dumb\nerr True\n"
    assert log.read_bytes().decode() == m.stdout
    assert m.wall_s > 0 and m.cpu_s >= 0
    piped = run_measured([sys.executable, "-c", show], env={**os.environ, "TERM": "dumb"})
    assert piped.rc != 0  # no terminal to measure on a pipe: get_terminal_size raises


def test_one_image_target_is_the_terminal_run_against_the_plain_loop() -> None:
    def runs(*walls: float, ok: bool = True) -> list[dict[str, object]]:
        return [
            {"ok": ok, "problem": "" if ok else "exit 3", "wall_s": w, "cpu_s": w / 2}
            for w in walls
        ]

    b = Bench(cfg=Config(), ics="ics", fp32={}, int8=None, home=Path())
    b.extra["one_image_paths"] = {
        "terminal": runs(0.7, 0.5, 0.62),
        "json": [*runs(0.5, 0.48), *runs(9.0, ok=False)],
        "plain": runs(0.3, 0.31, 0.29),
    }
    one = one_image_summary(b)
    assert one["terminal"]["wall_s"] == 0.62
    assert one["terminal"]["over_plain"] == pytest.approx(0.62 / 0.3)
    # A failed run counts as a failure, not as a time.
    assert one["json"]["wall_s"] == pytest.approx(0.49) and one["json"]["ok"] == 2
    (row,) = [line for line in render_targets(b, {}) if "one image, default output" in line]
    assert "2.07 ×" in row and "**missed**" in row
    b.extra["one_image_paths"]["terminal"] = runs(0.55)
    (row,) = [line for line in render_targets(b, {}) if "one image, default output" in line]
    assert "1.83 ×" in row and "| met |" in row


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


def _bench(env: dict[str, str], *args: str, **knobs: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        env={**env, **knobs},
        capture_output=True,
        text=True,
        timeout=300,
    )


#: Knobs of a run of the small photos only: no large photos, memory, one-image or profile runs.
SMALL_ONLY = {
    "BENCH_N_LARGE": "0",
    "BENCH_MEM_N": "0",
    "BENCH_ONE_IMAGE_RUNS": "0",
    "BENCH_PROFILE": "0",
}


def _run_bench(env: dict[str, str], **knobs: str) -> tuple[str, dict[str, object]]:
    r = _bench(env, **knobs)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = {**env, **knobs}
    table = Path(env["BENCH_RESULTS"]).read_text()
    doc = json.loads(Path(env["BENCH_RESULTS"]).with_name("results.json").read_text())
    # The table and its raw results name the same run.
    assert f"Run `{doc['run_id']}`" in table
    return table, doc


def _settings(doc: dict[str, object], runner: str) -> dict[str, object]:
    summary = doc["summary"]
    assert isinstance(summary, dict)
    settings = summary[f"{runner}/small"]["settings"]
    assert isinstance(settings, dict), runner
    return settings


def _ok_runs(doc: dict[str, object]) -> set[tuple[str, str]]:
    runs = doc["runs"]
    assert isinstance(runs, list)
    assert all(r["ok"] for r in runs), [r["problem"] for r in runs if not r["ok"]]
    return {(r["runner"], r["size"]) for r in runs}


@pytest.mark.slow
def test_every_runner_but_ray_on_a_tiny_corpus(bench_env: dict[str, str]) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ics,ics-lean,ics-int8,plain,plain-ics,http,bounds",
        BENCH_LARGE_RUNNERS="ics,plain,plain-ics,http",
    )
    assert _ok_runs(doc) >= {
        ("ics", "small"),
        ("ics", "large"),
        ("ics-lean", "small"),
        ("plain", "small"),
        ("plain", "large"),
        ("plain-ics", "small"),
        ("plain-ics", "large"),
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
    # Each row shows the settings its runner reported: the plain loop on onnxruntime's
    # default session with its own PIL code or ICS's Preprocessor, ICS with its threads.
    plain, plain_ics = _settings(doc, "plain"), _settings(doc, "plain-ics")
    assert plain["session"] == plain_ics["session"] == "onnxruntime's default InferenceSession"
    assert plain["intra_op_threads"] == "0 (onnxruntime's default)"
    assert plain["preprocess"] == "PIL convert + resize + crop"
    assert plain_ics["preprocess"] == "ics_service.imaging.Preprocessor"
    ics = _settings(doc, "ics")
    assert ics["cpus"] == len(os.sched_getaffinity(0))
    assert ics["spinning"] == "0"
    http = _settings(doc, "http")
    assert http["concurrency"] == 2 and http["intra_op_threads"] == ics["cpus"]
    assert "settings it ran with" in table and "decode threads" in table
    # Analysis is not appended: RESULTS.md is the run's, whole.
    assert "What limits" not in table
    # The raw results are published beside the table as well as kept in the work folder.
    assert json.loads((Path(bench_env["BENCH_OUT"]) / "results.json").read_text()) == doc
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
def test_one_image_on_a_terminal_with_json_and_the_plain_loop(bench_env: dict[str, str]) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ics",
        **{**SMALL_ONLY, "BENCH_ONE_IMAGE_RUNS": "1"},
        BENCH_N="2",
    )
    extra = doc["extra"]
    assert isinstance(extra, dict)
    # One image as a person runs it: on a terminal, with --json, and the plain loop.
    paths = extra["one_image_paths"]
    assert {k: [r["ok"] for r in v] for k, v in paths.items()} == {
        "terminal": [True],
        "json": [True],
        "plain": [True],
    }, paths
    one = doc["one_image"]
    assert isinstance(one, dict) and one["terminal"]["over_plain"] > 0
    assert "## One image, as a person runs it" in table
    assert "one image, default output on a terminal" in table
    terminal = (Path(bench_env["BENCH_OUT"]) / "runs" / "one-terminal-r0.log").read_text()
    assert "classifying" in terminal and "SUCCEEDED" in terminal  # drawn as for a person


@pytest.mark.slow
def test_ray_data_runner_on_a_tiny_corpus(bench_env: dict[str, str]) -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the Ray Data peer needs the bench extra: pip install -e '.[bench]'")
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ray,ray-ics",
        **SMALL_ONLY,
        BENCH_RAY_TUNE_N="8",
        # Spent by the first configuration: the budget ends the tuning pass (each Ray
        # start-up costs about 13 s here; every configuration would take 65 s).
        BENCH_RAY_TUNE_S="1",
    )
    assert _ok_runs(doc) == {("ray", "small"), ("ray-ics", "small")}
    assert "Ray Data" in table
    extra = doc["extra"]
    assert isinstance(extra, dict)
    tried = extra["ray_tuning"]
    cpus = len(os.sched_getaffinity(0))
    # No configuration reserves every CPU for actors (the read tasks would starve).
    assert tried and all(
        t["settings"]["actors"] * t["settings"]["actor_cpus"] < cpus for t in tried
    )
    assert all(t["ok"] for t in tried), [t["problem"] for t in tried]
    assert len(tried) == 1 and "Ray tuning stopped after 1 configuration:" in table
    (best,) = [t for t in tried if t.get("best")]
    assert best["projected_images_per_s"] == max(t["projected_images_per_s"] for t in tried)
    # Both Ray rows run the chosen configuration, as the runner itself reports it.
    for runner, reader in (("ray", "read_images"), ("ray-ics", "read_binary_files")):
        ran = _settings(doc, runner)
        assert {k: ran[k] for k in best["settings"]} == best["settings"]
        assert ran["reader"] == reader
        # Read back from the actor's own session.
        assert ran["intra_op_threads"] == max(1, cpus // best["settings"]["actors"])
    assert "## Ray Data tuning" in table and "**chosen**" in table


@pytest.mark.slow
def test_serving_runners_on_a_tiny_corpus(bench_env: dict[str, str]) -> None:
    if importlib.util.find_spec("litserve") is None:
        pytest.skip("the LitServe peer needs litserve: pip install -e '.[bench]'")
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="serve,serve-grpc,litserve,plain,bounds",
        **SMALL_ONLY,
    )
    serving = {"serve", "serve-grpc", "litserve"}
    assert _ok_runs(doc) == {*((r, "small") for r in (*serving, "plain")), ("bounds", "-")}
    runs = [r for r in doc["runs"] if r["runner"] in serving]  # type: ignore[attr-defined]
    passes = {
        r["runner"]: [(p["clients"], p["ok"], p["errors"]) for p in r["report"]["passes"]]
        for r in runs
    }
    assert passes == {name: [(1, 8, 0), (32, 8, 0)] for name in serving}
    for r in runs:
        for p in r["report"]["passes"]:
            # The server's process tree and the load generator each used some CPU per request.
            assert p["server_cpu_ms_per_request"] > 0
            assert p["client_cpu_ms_per_request"] > 0
    assert "## Serving (HTTP and gRPC)" in table
    assert "`ics serve` (gRPC) ÷ LitServe" in table
    # Issue 19's targets, as ratios of this run, for both protocols.
    for name in ("serve (HTTP)", "serve (gRPC)"):
        for target in (
            "32 clients: ≥ 0.9 × the serving bound | ",
            "32 clients: server CPU per request beyond model and decode ≤ LitServe's",
            "32 clients: p99 ≤ 1.5 × the median | ",
            "one client: ≥ 0.9 × the plain loop's per-image rate (steady) | ",
        ):
            row = next(line for line in table.splitlines() if f"| {name}, {target}" in line)
            assert "not measured" not in row, row
    assert "p99 ≤ 300 ms" not in table and "1.3 × LitServe" not in table


@pytest.mark.slow
def test_soak_runner_for_a_few_seconds(bench_env: dict[str, str]) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="soak",
        **SMALL_ONLY,
        BENCH_SOAK_S="3",
        BENCH_SOAK_HOSTILE="10",
    )
    assert _ok_runs(doc) == {("soak", "small")}
    runs = doc["runs"]
    assert isinstance(runs, list) and len(runs) == 1  # once, not once a round
    soak = runs[0]["report"]["soak"]
    for phase in ("calm", "hostile"):
        assert soak[phase]["ok"] > 0 and soak[phase]["errors"] == 0, soak[phase]
        assert soak[phase]["peak_rss_mb"] > 0
    kinds = soak["hostile"]["hostile"]["kinds"]
    assert set(kinds) == {
        "slow-headers",
        "slow-body",
        "fake-signature",
        "random-method",
        "huge-length",
    }
    assert all(k["attempts"] > 0 for k in kinds.values()), kinds
    # Refused, every one: no hostile request was answered 2xx.
    assert not any(s.startswith("2") for k in kinds.values() for s in k["answers"]), kinds
    # Where the CPU went in each phase, the hostile generator's own included.
    for phase in ("calm", "hostile"):
        cpu = soak[phase]["cpu"]
        assert cpu["server_s"] > 0 and cpu["clients_s"] > 0 and cpu["wall_s"] > 0, cpu
        assert cpu["server_ms_per_request"] > 0, cpu
    assert soak["calm"]["cpu"]["hostile_s"] == 0
    assert soak["hostile"]["cpu"]["hostile_s"] > 0
    bound = soak["bound"]
    assert 0 < bound["rate_ratio"] <= 1, bound
    assert bound["measured_over_bound"] == pytest.approx(
        soak["rate_ratio"] / bound["rate_ratio"], rel=1e-3
    )
    assert "## Soak: `ics serve` beside hostile clients" in table
    assert "| phase | wall s | server s | of which its event loop s |" in table
    assert 0 < bound["idle_machine_rate_ratio"] <= 1, bound
    assert "the machine allows" in table
    assert "soak: ordinary clients' rate beside 10 hostile ≥ 0.9 × alone" in table
    assert "soak: no errors seen by ordinary clients" in table
    # Not a row of the tables of rates: its images/s is not a classify rate.
    assert "ics serve` soak" not in table.split("## Soak")[0]


@pytest.mark.slow
def test_capture_runner_beside_the_default_one_on_a_tiny_corpus(
    bench_env: dict[str, str],
) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ics,ics-capture",
        **SMALL_ONLY,
    )
    # ok means every image classified and every one of them captured (run.py's check).
    assert _ok_runs(doc) == {("ics", "small"), ("ics-capture", "small")}
    assert "`ics classify --capture`" in table
    assert "data capture ≤ 10 %" in table
    # The captures are counted, then removed: hundreds of MB in a real run.
    assert not list(Path(bench_env["BENCH_OUT"]).rglob("*-capture"))


@pytest.mark.slow
def test_remote_model_runner_beside_the_local_one_on_a_tiny_corpus(
    bench_env: dict[str, str],
) -> None:
    table, doc = _run_bench(bench_env, BENCH_RUNNERS="ics,ics-sagemaker", **SMALL_ONLY)
    # ok: `ics classify --model sagemaker:...` classified every image through `ics serve`.
    assert _ok_runs(doc) == {("ics", "small"), ("ics-sagemaker", "small")}
    assert "`ics classify --model sagemaker:…`" in table
    assert "remote model: `sagemaker:` to a local `ics serve`" in table
    # The server's store and the labels file are the run's own: gone with it.
    assert not list((Path(bench_env["BENCH_OUT"]) / "runs").glob("ics-sagemaker*-server.db*"))


@pytest.mark.slow
def test_scaling_tables_against_corpus_size_and_pinned_cores(bench_env: dict[str, str]) -> None:
    table, doc = _run_bench(
        bench_env,
        BENCH_RUNNERS="ics,plain",
        **SMALL_ONLY,
        BENCH_SCALING="1",
        BENCH_SCALING_N="4,8",
        BENCH_SCALING_CORES_N="6",
    )
    every = len(os.sched_getaffinity(0))
    runs = doc["runs"]
    assert isinstance(runs, list)
    sizes = {(r["runner"], r["size"], r["n"], r["cores"]) for r in runs if r["ok"]}
    for runner in ("ics", "plain"):
        for n in (4, 8):
            assert (runner, f"scale-n{n}-c{every}", n, every) in sizes
        for c in {1, min(2, every), every}:
            assert (runner, f"scale-n6-c{c}", 6, c) in sizes
    # A one-core run is pinned to one CPU, process tree and all; ICS sizes itself to it.
    one = [r for r in runs if r["size"] == "scale-n6-c1"]
    assert one and all(len(r["pinned"]) == 1 for r in one)
    assert _settings_of(doc, "ics/scale-n6-c1")["cpus"] == 1
    # ICS's threads keep the pin: never more than the one core's worth of CPU time.
    summary = doc["summary"]
    assert isinstance(summary, dict)
    assert summary["ics/scale-n6-c1"]["cores_used"] <= 1.05
    assert "## Scaling with work" in table
    if every > 1:
        cores_table = table.split("## Scaling with cores")[1].split("\n## ")[0]
        assert "| cores used |" in cores_table


def _settings_of(doc: dict[str, object], key: str) -> dict[str, object]:
    summary = doc["summary"]
    assert isinstance(summary, dict)
    settings = summary[key]["settings"]
    assert isinstance(settings, dict)
    return settings


@pytest.mark.slow
def test_a_busy_machine_marks_every_row_and_require_quiet_refuses_to_publish(
    bench_env: dict[str, str], tmp_path: Path
) -> None:
    quick = {"BENCH_RUNNERS": "plain", **SMALL_ONLY}
    # Thresholds no machine meets, then thresholds every machine meets: the rule, not the
    # moment's load, decides.
    quiet = {"BENCH_BUSY_LOAD": "1000", "BENCH_BUSY_OTHERS": "1000"}
    busy = {"BENCH_BUSY_LOAD": "1000", "BENCH_BUSY_OTHERS": "-1"}

    table, doc = _run_bench(bench_env, **quick, **quiet)
    assert "Quiet machine" in table and "**busy**" not in table
    assert doc["quiet"] == {
        "busy": False,
        "reasons": [],
        "busy_load_per_core": 1000.0,
        "busy_others_cores": 1000.0,
    }

    table, doc = _run_bench(bench_env, **quick, **busy)
    assert "**Taken on a busy machine**" in table
    assert "· **busy**" in table
    quiet_doc = doc["quiet"]
    assert isinstance(quiet_doc, dict) and quiet_doc["busy"] is True
    assert "other processes used more than -1 cores" in quiet_doc["reasons"][0]
    extra = doc["extra"]
    assert isinstance(extra, dict)
    (round_,) = extra["rounds"]
    assert len(round_["before"]["load"]) == 3 and round_["before"]["cpus"] >= 1

    results = tmp_path / "RESULTS.md"
    refused = _bench(bench_env, "--require-quiet", **quick, **busy, BENCH_RESULTS=str(results))
    assert refused.returncode != 0
    assert "the machine was busy" in refused.stderr and "not written" in refused.stderr
    assert not results.exists() and not (tmp_path / "results.json").exists()
    raw = json.loads((Path(bench_env["BENCH_OUT"]) / "results.json").read_text())
    assert raw["quiet"]["busy"] is True

    published = _bench(bench_env, "--require-quiet", **quick, **quiet, BENCH_RESULTS=str(results))
    assert published.returncode == 0, published.stderr[-3000:]
    assert results.exists() and (tmp_path / "results.json").exists()


def test_other_processes_cpu_is_measured_apart_from_the_runs_own() -> None:
    spin = [
        sys.executable,
        "-c",
        "import time\nend = time.time() + 30\nwhile time.time() < end: pass",
    ]
    other = subprocess.Popen(spin)
    try:
        m = run_measured([sys.executable, "-c", "import time; time.sleep(1.5)"], timeout_s=60)
    finally:
        other.kill()
        other.wait(timeout=10)
    # The run itself slept: the spinning process outside its tree is the "others".
    assert m.cpu_s < 0.5
    assert m.others_cores is not None and m.others_cores > 0.3
    # A spinning run's own CPU counts as its own (spinning by CPU time, so that other work
    # on a shared machine cannot make it use less).
    own = run_measured(
        [sys.executable, "-c", "import time\nwhile time.process_time() < 1.0: pass"],
        timeout_s=60,
    )
    assert own.rc == 0 and own.cpu_s >= 1.0
    assert own.others_cores is not None
