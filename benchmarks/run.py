"""Run every benchmark runner on the same corpus, interleaved, and write the results table.

    python -m benchmarks.run            # or: make bench
    BENCH_N=200 BENCH_N_LARGE=10 BENCH_REPEATS=1 BENCH_MEM_N=2000 make bench   # a quick run

Every knob is a flag and an environment variable (`--help` lists them). Each runner is a
whole process timed from start to exit (benchmarks.measure); runners take turns, and each
round starts the turn at a different runner, so drift of the machine hits all alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import cpus
from .corpus import ensure_corpus, ensure_repeated
from .measure import Measurement, run_measured
from .profiling import py_spy, summarise
from .quiet import load_snapshot
from .report import busy_reasons, write_outputs
from .runners import ROOT, RUNNERS, Bench, Config, Job, Run


def _env(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return type(default)(raw) if not isinstance(default, bool) else raw not in ("0", "no", "")


def parse_args(argv: Sequence[str] | None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(
        description="ICS benchmark harness (issue 4). Each flag also reads BENCH_<NAME>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    knobs: list[tuple[str, Any, str]] = [
        ("n", d.n, "small photos (~500×375) in the corpus"),
        ("n_large", d.n_large, "large photos (~4000×3000) in the corpus; 0 skips them"),
        ("repeats", d.repeats, "rounds of every runner"),
        ("seed", d.seed, "corpus seed"),
        ("mem_n", d.mem_n, "images for the memory run of ICS; 0 skips it"),
        ("mem_base", d.mem_base, "images of the memory run it is compared with"),
        ("runners", ",".join(d.runners), f"comma-separated subset of {','.join(RUNNERS)}"),
        ("large_runners", ",".join(d.large_runners), "runners also timed on the large photos"),
        ("prepare", d.prepare, "run `ics models prepare` for a model that is not prepared"),
        ("model", d.model, "FP32 model"),
        ("int8_model", d.int8_model, "INT8 model (skipped with a note when ICS lacks it)"),
        ("device", d.device, "ICS's device (cpu, cuda[:N], auto: ICS_DEVICE of its runners)"),
        ("http_concurrency", d.http_concurrency, "concurrent requests of the HTTP design"),
        ("ray_actors", d.ray_actors, "Ray actor pool size (when not tuned)"),
        ("ray_actor_cpus", d.ray_actor_cpus, "CPUs reserved by each Ray actor (when not tuned)"),
        ("ray_batch", d.ray_batch, "Ray map_batches batch size (when not tuned)"),
        ("ray_tune_n", d.ray_tune_n, "small photos of each Ray tuning run"),
        ("ray_tune_s", d.ray_tune_s, "time budget of the Ray tuning pass; 0 skips it"),
        ("require_quiet", d.require_quiet, "refuse to write the results file when busy"),
        ("busy_load", d.busy_load, "busy: 1-min load average per core before the first round"),
        ("busy_others", d.busy_others, "busy: cores other processes used during a run"),
        ("scaling", d.scaling, "images/s against corpus size and cores; 0 skips it"),
        ("scaling_n", d.scaling_n, "corpus sizes of the scaling table (small photos)"),
        ("scaling_cores_n", d.scaling_cores_n, "corpus size of the cores table"),
        ("scaling_runners", d.scaling_runners, "runners of the scaling tables"),
        (
            "one_image_runs",
            d.one_image_runs,
            "runs of `ics classify` on one image (each way: terminal, --json, plain loop)",
        ),
        ("bounds_min_s", d.bounds_min_s, "seconds per bound measurement"),
        ("soak_s", d.soak_s, "seconds of each soak phase (ordinary clients alone, beside hostile)"),
        ("soak_hostile", d.soak_hostile, "hostile clients of the soak"),
        ("agree_n", d.agree_n, "images for the INT8/FP32 top-1 agreement"),
        ("warmup", d.warmup, "one untimed pass of every runner on a tiny corpus first"),
        ("profile", d.profile, "py-spy profile of one ICS run"),
        ("timeout_s", d.timeout_s, "limit per runner process"),
        ("out", str(d.out), "work folder (corpora, logs, raw results)"),
        ("results", str(d.results), "Markdown results file"),
    ]
    for name, default, help_text in knobs:
        env = "BENCH_" + name.upper()
        kind: Callable[[str], Any] = (
            (lambda s: s not in ("0", "no", "false", ""))
            if isinstance(default, bool)
            else type(default)
        )
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=_env(env, default),
            help=f"{help_text} (${env})",
            # A yes/no knob also works as a bare flag: --require-quiet.
            nargs="?" if isinstance(default, bool) else None,
            const=True if isinstance(default, bool) else None,
        )
    p.add_argument(
        "--rerender",
        action="store_true",
        help="only write the results file again from OUT/results.json (after editing the "
        "report's template)",
    )
    a = p.parse_args(argv)
    runners = tuple(r.strip() for r in a.runners.split(",") if r.strip())
    large_runners = tuple(r.strip() for r in a.large_runners.split(",") if r.strip())
    unknown = (set(runners) | set(large_runners)) - set(RUNNERS)
    unknown |= set(_names(a.scaling_runners)) - set(RUNNERS)
    if unknown:
        p.error(f"unknown runners {sorted(unknown)}; known: {', '.join(RUNNERS)}")
    try:
        sizes = _sizes(a.scaling_n)
    except ValueError:
        p.error(f"--scaling-n: {a.scaling_n!r} is not a comma-separated list of image counts")
    if any(n < 1 for n in sizes):
        p.error("--scaling-n: every corpus size must be at least 1")
    return Config(
        **{
            f.name: getattr(a, f.name)
            for f in dataclasses.fields(Config)
            if f.name not in ("runners", "large_runners", "large", "out", "results", "rerender")
        },
        rerender=a.rerender,
        runners=runners,
        large_runners=large_runners,
        large=a.n_large > 0,
        out=Path(a.out).resolve(),
        results=Path(a.results).resolve(),
    )


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sizes(text: str) -> list[int]:
    return [int(x) for x in _names(text)]


# --- models ---------------------------------------------------------------------------


def ics_command() -> str:
    here = Path(sys.executable).parent / "ics"
    found = str(here) if here.exists() else shutil.which("ics")
    if not found:
        raise SystemExit("the `ics` command is not installed: pip install -e '.[bench]'")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ICS_* settings, so a user's config does not skew a run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICS_")}
    env.update(extra)
    return env


def model_info(ics: str, name: str, *, prepare: bool, notes: list[str]) -> dict[str, Any] | None:
    """`ics models info NAME --json` in the user's own ICS home; prepares it when asked."""
    r = subprocess.run([ics, "models", "info", name, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        notes.append(f"model `{name}`: not known to this ICS ({_last_line(r.stderr)}); skipped.")
        return None
    info: dict[str, Any] = json.loads(r.stdout)
    if not info.get("prepared") and prepare:
        print(f"preparing {name} (once)...", flush=True)
        p = subprocess.run([ics, "models", "prepare", name], capture_output=True, text=True)
        if p.returncode != 0:
            notes.append(f"model `{name}`: `ics models prepare` failed: {_last_line(p.stderr)}")
            return None
        info = json.loads(
            subprocess.run(
                [ics, "models", "info", name, "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
    if not info.get("prepared"):
        notes.append(f"model `{name}`: not prepared; skipped.")
        return None
    return info


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


# --- the run --------------------------------------------------------------------------


def compile_ics() -> None:
    """Bytecode for ICS's own modules, as an installed package has: with
    PYTHONDONTWRITEBYTECODE set (or an editable install never run yet) every runner process
    would compile them again, which is not what a user's start-up costs."""
    import compileall

    import ics_service

    compileall.compile_dir(Path(ics_service.__file__).parent, quiet=1)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.rerender:
        rerender(cfg)
        return
    started = time.perf_counter()
    started_at = time.gmtime()
    first = load_snapshot()
    compile_ics()
    ics = ics_command()
    notes: list[str] = []
    fp32 = model_info(ics, cfg.model, prepare=cfg.prepare, notes=notes)
    if fp32 is None:
        raise SystemExit("\n".join(notes))
    int8 = None
    if "ics-int8" in cfg.runners or "bounds" in cfg.runners:
        int8 = model_info(ics, cfg.int8_model, prepare=cfg.prepare, notes=notes)
    home = cfg.out / "home"
    home.mkdir(parents=True, exist_ok=True)
    models_link = home / "models"
    models_dir = Path(fp32["path"]).parents[2]
    if models_link.is_symlink() or models_link.exists():
        models_link.unlink()
    models_link.symlink_to(models_dir, target_is_directory=True)

    print(f"corpus: {cfg.n} small, {cfg.n_large} large (seed {cfg.seed})...", flush=True)
    corpus_root = cfg.out / "corpus"
    t0 = time.perf_counter()
    small = ensure_corpus(corpus_root, "small", cfg.n, cfg.seed)
    large = ensure_corpus(corpus_root, "large", cfg.n_large, cfg.seed) if cfg.large else None
    tiny = ensure_corpus(corpus_root, "small", 8, cfg.seed)
    print(f"corpus ready in {time.perf_counter() - t0:.1f} s", flush=True)

    b = Bench(cfg=cfg, ics=ics, fp32=fp32, int8=int8, home=home, notes=notes)
    b.extra["large_folder"] = large
    runners = [r for r in cfg.runners if r != "ics-int8" or int8 is not None]

    jobs: list[Job] = []
    for r in runners:
        if r == "bounds":
            jobs.append(Job(r, "-", small, cfg.n))
            continue
        jobs.append(Job(r, "small", small, cfg.n))
        if large is not None and r in cfg.large_runners:
            jobs.append(Job(r, "large", large, cfg.n_large))
    if cfg.scaling:
        print(f"scaling corpora: {cfg.scaling_n} small photos (generated once)...", flush=True)
        jobs += scaling_jobs(cfg, runners, corpus_root)

    b.extra["settings"] = ics_settings(b, {j.cores for j in jobs if j.runner.startswith("ics")})
    if cfg.warmup:
        print("warm-up (untimed): every runner on 8 small photos", flush=True)
        for r in runners:
            if r not in ("bounds", "soak"):  # the soak runs for a set time, tiny or not
                run_job(b, Job(r, "tiny", tiny, 8), 0, record=False)
    if cfg.ray_tune_s > 0 and {"ray", "ray-ics"} & set(runners):
        b.extra["ray_tuning"] = tune_ray(b, ensure_corpus(corpus_root, "small", cfg.ray_tune_n))
        best = [t for t in b.extra["ray_tuning"] if t.get("best")]
        if best:
            b.extra["ray_tuned"] = best[0]["settings"]
    rounds: list[dict[str, Any]] = []
    b.extra["rounds"] = rounds
    for round_ in range(cfg.repeats):
        shift = round_ * len(jobs) // max(cfg.repeats, 1)
        order = jobs[shift:] + jobs[:shift]
        print(f"round {round_ + 1}/{cfg.repeats}", flush=True)
        before = first if round_ == 0 else load_snapshot()
        for job in order:
            if job.runner == "soak" and round_ > 0:
                continue  # two phases of soak_s each: once is enough, and bounded
            run_job(b, job, round_)
        rounds.append({"round": round_, "before": before, "after": load_snapshot()})

    if cfg.mem_n and "ics" in runners:
        print(f"memory: ICS on {cfg.mem_base} and {cfg.mem_n} images", flush=True)
        for n in (cfg.mem_base, cfg.mem_n):
            folder = ensure_repeated(corpus_root, small, n)
            run = run_job(b, Job("ics", "mem", folder, n), 0, record=False)
            b.extra.setdefault("memory", []).append(run.to_doc())
    if cfg.one_image_runs and "ics" in runners:
        print("one image, warm model cache", flush=True)
        one = ensure_corpus(corpus_root, "small", 1, cfg.seed)
        b.extra["one_image"] = [
            run_job(b, Job("ics", "one", one, 1), i, record=False).to_doc()
            for i in range(cfg.one_image_runs)
        ]
        b.extra["one_image_paths"] = one_image_paths(b, one)
    if cfg.profile and "ics" in runners:
        b.extra["profile"] = profile_ics(b, small)

    b.extra["load_before"] = first["load"]
    b.extra["load_after"] = load_snapshot()["load"]
    b.extra["total_s"] = time.perf_counter() - started
    mach = machine()
    b.extra["run_id"] = run_id(started_at, mach)
    published = write_outputs(b, mach)
    if not published:
        raise SystemExit(
            f"the machine was busy ({'; '.join(busy_reasons(b))}): {cfg.results} not written "
            f"(--require-quiet); raw results in {cfg.out / 'results.json'}. Close other work "
            "and run again."
        )
    print(f"wrote {cfg.results} (run {b.extra['run_id']}) in {b.extra['total_s']:.0f} s")
    failed = [r for r in b.runs if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed; see {b.work}/*.log")


#: The ways one image is classified as a whole process, by what a person types.
ONE_IMAGE_PATHS = ("terminal", "json", "plain")


def one_image_paths(b: Bench, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """One image as a person classifies it: `ics classify ONE.jpg` on a terminal (the
    progress bar and the summary table, the default store and results file), the same with
    `--json` into a pipe, and the plain loop; interleaved, one untimed run of each first
    (the default store is created once, as for a person's second run)."""
    (image,) = sorted(folder.glob("*.jpg"))
    home = b.cfg.out / "home-one"
    home.mkdir(parents=True, exist_ok=True)
    models = home / "models"
    if not models.is_symlink():
        models.symlink_to((b.home / "models").resolve(), target_is_directory=True)
    env = clean_env(ICS_HOME=str(home))
    commands = {
        "terminal": [b.ics, "classify", str(image)],
        "json": [b.ics, "classify", str(image), "--json"],
        "plain": [
            sys.executable,
            "-m",
            "benchmarks.plain_loop",
            b.fp32_json(),
            str(folder),
            str(b.work / "one-plain.jsonl"),
        ],
    }
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in ONE_IMAGE_PATHS}
    for i in range(-1, b.cfg.one_image_runs):
        # Each round starts at another path, so drift of the machine hits all alike.
        order = ONE_IMAGE_PATHS[i % 3 :] + ONE_IMAGE_PATHS[: i % 3]
        for path in order:
            m = run_measured(
                commands[path],
                env=env,
                cwd=ROOT,
                timeout_s=b.cfg.timeout_s,
                log_path=b.work / f"one-{path}-r{i}.log",
                tty=path == "terminal",
            )
            problem = _one_image_problem(path, m)
            if i < 0:
                if problem:
                    b.notes.append(f"one image, {path}: the untimed first run {problem}.")
                continue
            doc = {
                "path": path,
                "round": i,
                "ok": not problem,
                "problem": problem,
                "wall_s": m.wall_s,
                "cpu_s": m.cpu_s,
                "peak_rss_mb": m.peak_rss_mb,
                "others_cores": m.others_cores,
                "rc": m.rc,
            }
            out[path].append(doc)
            print(
                f"  one image {path:<9} {m.wall_s:6.3f} s  cpu {m.cpu_s:5.2f} s  "
                + ("ok" if not problem else f"FAILED: {problem}"),
                flush=True,
            )
    return out


def _one_image_problem(path: str, m: Measurement) -> str:
    """Why a one-image run does not count; empty when it classified its image."""
    if m.timed_out:
        return "timed out"
    if path == "terminal":
        # The person's view: the progress bar, then the summary table, on the terminal.
        if m.rc != 0 or "classifying" not in m.stdout or "status" not in m.stdout:
            return f"exit {m.rc}, no progress bar and summary: {_last_line(m.stdout)}"
        return ""
    if path == "json":
        try:
            counts = json.loads(m.stdout).get("counts", {})
        except json.JSONDecodeError:
            return f"exit {m.rc}, no JSON summary: {_last_line(m.stderr_tail)}"
        if m.rc != 0 or counts.get("total") != 1:
            return f"exit {m.rc}, counts {counts}"
        return ""
    return "" if m.rc == 0 else f"exit {m.rc}: {_last_line(m.stderr_tail)}"


def scaling_jobs(cfg: Config, runners: Sequence[str], corpus_root: Path) -> list[Job]:
    """ICS and the plain loop against corpus size (every core), then against cores."""
    every = cpus()
    cores = sorted({c for c in (1, 2, every) if c <= every})
    sizes = _sizes(cfg.scaling_n)
    jobs: list[Job] = []
    for r in _names(cfg.scaling_runners):
        if r not in runners:
            continue
        for n in sizes:
            folder = ensure_corpus(corpus_root, "small", n, cfg.seed)
            jobs.append(Job(r, f"scale-n{n}-c{every}", folder, n, cores=every))
        folder = ensure_corpus(corpus_root, "small", cfg.scaling_cores_n, cfg.seed)
        for c in cores:
            if c == every and cfg.scaling_cores_n in sizes:
                continue  # already in the corpus-size series
            size = f"scale-n{cfg.scaling_cores_n}-c{c}"
            jobs.append(Job(r, size, folder, cfg.scaling_cores_n, cores=c))
    return jobs


def pin_for(cores: int) -> list[int]:
    """The first `cores` CPUs this process may use; [] for 0 (no pinning)."""
    return sorted(os.sched_getaffinity(0))[:cores] if cores else []


def ics_settings(b: Bench, cores: set[int]) -> dict[str, Any]:
    """ICS's effective settings for each core count its jobs run on ("all" for unpinned)."""
    out: dict[str, Any] = {}
    for c in sorted(cores):
        cpu_list = set(pin_for(c))
        r = subprocess.run(
            [sys.executable, "-m", "benchmarks.ics_settings", b.ics, b.fp32["path"]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=clean_env(ICS_HOME=str(b.home), ICS_DEVICE=b.cfg.device),
            preexec_fn=functools.partial(os.sched_setaffinity, 0, cpu_list) if cpu_list else None,
        )
        key = str(c) if c else "all"
        if r.returncode != 0:
            b.notes.append(f"ICS settings for {key} cores: unreadable ({_last_line(r.stderr)}).")
            continue
        out[key] = json.loads(r.stdout)
    return out


#: Ray Data configurations tried by the tuning pass: (actors, CPUs per actor, batch size).
#: On 2 CPUs an actor pool that reserves every CPU starves the read tasks (FIELD-NOTES), so
#: configurations reserving all CPUs for actors are left out.
RAY_CANDIDATES = ((1, 0.5, 8), (1, 0.5, 32), (1, 1.0, 8), (2, 0.5, 8), (2, 0.5, 32))


def tune_ray(b: Bench, folder: Path) -> list[dict[str, Any]]:
    """Run each Ray configuration once on a small corpus, within the time budget; best marked.

    Ranked by the whole-process rate they would reach on the full small corpus: start-up
    (wall time minus the steady part) plus N ÷ steady images/s, so a short tuning corpus
    does not let start-up decide alone.
    """
    cfg = b.cfg
    n = len(list(folder.glob("*.jpg")))
    print(f"Ray tuning: {len(RAY_CANDIDATES)} configurations on {n} photos", flush=True)
    started = time.perf_counter()
    tried: list[dict[str, Any]] = []
    for i, (actors, actor_cpus, batch) in enumerate(RAY_CANDIDATES):
        if actors * actor_cpus >= cpus():
            continue
        spent = time.perf_counter() - started
        last = tried[-1]["wall_s"] if tried else 0.0
        if tried and spent + last > cfg.ray_tune_s:
            b.notes.append(
                f"Ray tuning stopped after {len(tried)} configuration"
                f"{'s' if len(tried) > 1 else ''}: its budget of "
                f"{cfg.ray_tune_s:g} s (BENCH_RAY_TUNE_S) was spent."
            )
            break
        b.extra["ray_tuned"] = {"actors": actors, "actor_cpus": actor_cpus, "batch_size": batch}
        run = run_job(b, Job("ray", "tune", folder, n), 0, label=f"-t{i}", record=False)
        doc: dict[str, Any] = {
            "settings": dict(b.extra["ray_tuned"]),
            "n": n,
            "ok": run.ok,
            "problem": run.problem,
            "wall_s": run.m.wall_s,
            "images_per_s": run.ips,
            "steady_images_per_s": run.steady_ips,
            "others_cores": run.m.others_cores,
        }
        if run.ok and run.steady_ips:
            startup = max(0.0, run.m.wall_s - n / run.steady_ips)
            doc["projected_images_per_s"] = cfg.n / (startup + cfg.n / run.steady_ips)
        tried.append(doc)
    b.extra.pop("ray_tuned", None)
    ranked = [t for t in tried if t.get("projected_images_per_s")]
    if ranked:
        max(ranked, key=lambda t: t["projected_images_per_s"])["best"] = True
    return tried


def run_id(started: time.struct_time, mach: dict[str, Any]) -> str:
    """Date, commit, CPU model and its vector instructions: what makes a run's figures."""
    cpu = "-".join(
        "".join(ch for ch in word if ch.isalnum()) for word in mach["cpu"].split()
    ).strip("-")
    commit = (mach["commit"].split() or ["nocommit"])[0]
    # A run of uncommitted code cannot be traced to a commit alone: say so in its name.
    dirty = "-dirty" if "uncommitted" in mach["commit"] else ""
    return (
        f"{time.strftime('%Y%m%dT%H%MZ', started)}-{commit}{dirty}-"
        f"{cpu or 'unknown-cpu'}-{mach['isa']}"
    )


def rerender(cfg: Config) -> None:
    """Write the results file again from a finished run's results.json."""
    published = cfg.results.with_name("results.json")
    doc = json.loads((published if published.exists() else cfg.out / "results.json").read_text())
    old = Config.from_json(doc["config"], out=cfg.out, results=cfg.results)
    models = doc.get("models") or {}
    fp32 = models.get("fp32") or model_info(ics_command(), old.model, prepare=False, notes=[])
    b = Bench(
        cfg=old,
        ics="ics",
        fp32=fp32 or {"name": old.model, "path": "?"},
        int8=models.get("int8"),
        home=cfg.out / "home",
        notes=doc.get("notes", []),
        extra=doc.get("extra", {}),
    )
    names = {f.name for f in dataclasses.fields(Measurement)}
    for d in doc["runs"]:
        m = Measurement(**{k: v for k, v in d.items() if k in names})
        job = Job(d["runner"], d["size"], Path(), d["n"], cores=d.get("cores", 0))
        b.runs.append(Run(job, d["round"], m, d["ok"], d["problem"], d["steady_images_per_s"]))
    write_outputs(b, doc["machine"])
    print(f"wrote {cfg.results} from {cfg.out / 'results.json'}")


def warm_page_cache(folder: Path) -> None:
    """Read every file of the corpus once before a timed run, so that each runner starts
    with its photos in the page cache. Without it a runner after a memory-hungry one (Ray
    Data's 5 GB, the 20,000-image run) read them back from disk: a run of 100 large photos
    took 14.4 s with 5.5 s of CPU."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 20):
                    pass


def run_job(b: Bench, job: Job, round_: int, *, label: str = "", record: bool = True) -> Run:
    """Run one job as a measured process, check its output, and print a line."""
    tag = f"{job.runner}-{job.size}-n{job.n}-r{round_}{label}"
    b.work.mkdir(parents=True, exist_ok=True)
    cmd = b.command(job, tag, round_)
    warm_page_cache(job.folder)
    m = run_measured(
        cmd,
        env=clean_env(ICS_HOME=str(b.home), ICS_DEVICE=b.cfg.device, RAY_USAGE_STATS_ENABLED="0"),
        cwd=ROOT,
        timeout_s=b.cfg.timeout_s,
        log_path=b.work / f"{tag}.log",
        report_path=b.work / f"{tag}.report.json",
        pin=pin_for(job.cores),
    )
    run = _check(b, job, m, tag)
    run.round = round_
    for suffix in (".jsonl", ".db", ".db-wal", ".db-shm"):
        (b.work / f"{tag}{suffix}").unlink(missing_ok=True)
    for leftover in Path("/dev/shm").glob(f"ics-bench-{os.getpid()}-{tag}.db*"):
        leftover.unlink(missing_ok=True)
    if record:
        b.runs.append(run)
    status = "ok" if run.ok else f"FAILED: {run.problem}"
    others = "" if m.others_cores is None else f"  others {m.others_cores:4.2f} cores"
    print(
        f"  {job.runner:<9} {job.size:<5} {job.n:>6} images  {m.wall_s:7.2f} s  "
        f"{run.ips:8.1f} img/s  peak {m.peak_rss_mb:7.0f} MB{others}  {status}",
        flush=True,
    )
    return run


def _check(b: Bench, job: Job, m: Measurement, tag: str) -> Run:
    """The run of a finished process: ok only when it classified every image."""
    run = Run(job=job, round=0, m=m, ok=False)
    if m.timed_out:
        run.problem = f"timed out after {b.cfg.timeout_s:.0f} s"
        return run
    if job.runner.startswith("ics"):
        try:
            doc = json.loads(m.stdout)
        except json.JSONDecodeError:
            run.problem = f"exit {m.rc}, no JSON summary: {_last_line(m.stderr_tail)}"
            return run
        counts = doc.get("counts", {})
        if counts.get("total") != job.n or counts.get("FAILED", 0):
            run.problem = f"counts {counts} for {job.n} images"
            return run
        run.steady_ips = doc.get("images_per_s")
        if job.runner == "ics-capture":
            folder = b.capture_dir(tag)
            captured = 0
            for f in folder.rglob("*.jsonl"):
                with f.open("rb") as fh:
                    captured += sum(1 for _ in fh)
            shutil.rmtree(folder, ignore_errors=True)  # hundreds of MB a run: checked, gone
            if captured != job.n:
                run.problem = f"{captured} capture records for {job.n} images"
                return run
        run.ok = m.rc == 0
        run.problem = "" if run.ok else f"exit {m.rc}"
        return run
    if m.rc != 0:
        run.problem = f"exit {m.rc}: {_last_line(m.stderr_tail)}"
        return run
    if job.runner not in ("bounds", "soak"):  # the soak's clients loop for a set time
        lines = b.work / f"{tag}.jsonl"
        count = sum(1 for _ in lines.open()) if lines.exists() else 0
        if count != job.n:
            run.problem = f"{count} results for {job.n} images"
            return run
    if m.report:
        run.steady_ips = m.report.get("steady_images_per_s")
    run.ok = True
    return run


def profile_ics(b: Bench, folder: Path) -> dict[str, Any]:
    spy = py_spy()
    if spy is None:
        b.notes.append("profile: py-spy is not installed (pip install -e '.[bench]'); skipped.")
        return {}
    rate = 100
    raw = b.cfg.out / "profile-ics.txt"
    cmd = [
        spy,
        "record",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "--output",
        str(raw),
        "--",
        *b.ics_cmd(folder, "profile"),
    ]
    print("profile: py-spy record of `ics classify` on the small photos", flush=True)
    m = run_measured(
        cmd,
        env=clean_env(ICS_HOME=str(b.home), ICS_DEVICE=b.cfg.device),
        cwd=ROOT,
        timeout_s=b.cfg.timeout_s,
        log_path=b.cfg.out / "profile-ics.log",
    )
    for suffix in (".jsonl", ".db", ".db-wal", ".db-shm"):
        (b.work / f"profile{suffix}").unlink(missing_ok=True)
    if m.rc != 0 or not raw.exists():
        b.notes.append(f"profile: py-spy failed (exit {m.rc}): {_last_line(m.stderr_tail)}")
        return {}
    headline = summarise(raw.read_text(), rate)
    return {"wall_s": m.wall_s, "lines": headline.lines(), "raw": str(raw)}


def machine() -> dict[str, Any]:
    cpu_model, flags = "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "unknown":
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in ("ics-service", "onnxruntime", "numpy", "pillow", "ray", "py-spy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "cpu": cpu_model,
        "simd": ", ".join(
            f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags
        )
        or "none of avx2/avx512",
        "isa": _isa(flags),
        "cpus": cpus(),
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit + (" + uncommitted changes in src/" if dirty else ""),
    }


def _isa(flags: set[str]) -> str:
    """AVX2 and AVX-512 VNNI (or AVX-VNNI), the instructions the model's speed turns on."""
    vnni = "avx512vnni" if "avx512_vnni" in flags else "avxvnni" if "avx_vnni" in flags else ""
    return "+".join(x for x in ("avx2" if "avx2" in flags else "noavx2", vnni) if x) or "none"


if __name__ == "__main__":
    main()
