"""Run every benchmark runner on the same corpus, interleaved, and write the results table.

    python -m benchmarks.run            # or: make bench
    BENCH_N=200 BENCH_N_LARGE=10 BENCH_REPEATS=1 BENCH_MEM_N=2000 make bench   # a quick run

Every knob is a flag and an environment variable (`--help` lists them). Each runner is a
whole process timed from start to exit (benchmarks.measure); runners take turns, and each
round starts the turn at a different runner, so drift of the machine hits all alike.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import cpus
from .corpus import SIZES, ensure_corpus, ensure_repeated
from .measure import Measurement, run_measured
from .profiling import py_spy, summarise

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = ("ics", "ics-lean", "ics-int8", "plain", "ray", "http", "bounds")
#: Runners timed on the large photos (the others only on small ones).
LARGE_RUNNERS = ("ics", "plain", "ray", "http")
#: What each runner is, for the table.
DESCRIBE = {
    "ics": "`ics classify` (local executor), store + results file",
    "ics-lean": "`ics classify`, store on tmpfs, results to /dev/null",
    "ics-int8": "`ics classify --model {int8}`",
    "plain": "plain loop: PIL + onnxruntime, one image at a time",
    "ray": "Ray Data: read_images + map_batches actor pool",
    "http": "original design: base64 + one HTTP POST per image",
}


def _env(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return type(default)(raw) if not isinstance(default, bool) else raw not in ("0", "no", "")


#: Hand-written analysis of the missed targets, appended to RESULTS.md on every render.
LIMITS = Path(__file__).resolve().parent / "LIMITS.md"


@dataclass
class Config:
    n: int = 1500
    n_large: int = 100
    repeats: int = 2
    seed: int = 0
    mem_n: int = 20000
    mem_base: int = 1000
    runners: tuple[str, ...] = RUNNERS
    large_runners: tuple[str, ...] = LARGE_RUNNERS
    large: bool = True
    prepare: bool = True
    model: str = "efficientnet-lite0"
    int8_model: str = "efficientnet-lite0-int8"
    http_concurrency: int = 2
    ray_actors: int = 1
    ray_actor_cpus: float = 0.5
    one_image_runs: int = 3
    bounds_min_s: float = 1.0
    agree_n: int = 1000
    warmup: bool = True
    profile: bool = True
    timeout_s: float = 1200.0
    out: Path = ROOT / "benchmarks" / "out"
    results: Path = ROOT / "benchmarks" / "RESULTS.md"
    rerender: bool = False

    @classmethod
    def from_json(cls, doc: dict[str, Any], **override: Any) -> Config:
        """The config of a results.json (values may be stored as text)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in doc:
                continue
            v, default = doc[f.name], getattr(cls(), f.name)
            if isinstance(default, tuple):
                v = ast.literal_eval(v) if isinstance(v, str) and v.startswith("(") else v
                v = tuple(v.split(",") if isinstance(v, str) else v)
            elif isinstance(default, bool):
                v = v in (True, "True", "1")
            elif isinstance(default, Path):
                v = Path(v)
            else:
                v = type(default)(v)
            values[f.name] = v
        values.update(override)
        return cls(**values)


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
        ("http_concurrency", d.http_concurrency, "concurrent requests of the HTTP design"),
        ("ray_actors", d.ray_actors, "Ray actor pool size"),
        ("ray_actor_cpus", d.ray_actor_cpus, "CPUs reserved by each Ray actor"),
        ("one_image_runs", d.one_image_runs, "runs of `ics classify` on one image"),
        ("bounds_min_s", d.bounds_min_s, "seconds per bound measurement"),
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
    if unknown:
        p.error(f"unknown runners {sorted(unknown)}; known: {', '.join(RUNNERS)}")
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
    info = json.loads(r.stdout)
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


# --- jobs -----------------------------------------------------------------------------


@dataclass
class Job:
    runner: str
    size: str  # "small", "large", or "-" for the bounds
    folder: Path
    n: int


@dataclass
class Run:
    job: Job
    round: int
    m: Measurement
    ok: bool
    problem: str = ""
    steady_ips: float | None = None

    @property
    def ips(self) -> float:
        return self.job.n / self.m.wall_s


@dataclass
class Bench:
    cfg: Config
    ics: str
    fp32: dict[str, Any]
    int8: dict[str, Any] | None
    home: Path
    notes: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.cfg.out / "runs"

    def model_json(self, info: dict[str, Any]) -> Path:
        path = self.cfg.out / "models" / f"{info['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2))
        return path

    def ics_cmd(self, folder: Path, tag: str, *, lean: bool = False, model: str = "") -> list[str]:
        if lean:
            store = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.work
            store_url = f"sqlite:///{store / f'ics-bench-{os.getpid()}-{tag}.db'}"
            output = os.devnull
        else:
            store_url = f"sqlite:///{self.work / f'{tag}.db'}"
            output = str(self.work / f"{tag}.jsonl")
        return [
            self.ics,
            "classify",
            str(folder),
            "--model",
            model or self.cfg.model,
            "--store",
            store_url,
            "-o",
            output,
            "--output-format",
            "jsonl",
            "--tolerated-failure-percentage",
            "100",
            "--json",
            "--no-progress",
        ]

    def command(self, job: Job, tag: str, round_: int) -> list[str]:
        py = [sys.executable, "-m"]
        fp32 = str(self.model_json(self.fp32))
        out = str(self.work / f"{tag}.jsonl")
        r = job.runner
        if r == "ics":
            return self.ics_cmd(job.folder, tag)
        if r == "ics-lean":
            return self.ics_cmd(job.folder, tag, lean=True)
        if r == "ics-int8":
            assert self.int8 is not None
            return self.ics_cmd(job.folder, tag, model=self.int8["name"])
        if r == "plain":
            return [*py, "benchmarks.plain_loop", fp32, str(job.folder), out]
        if r == "ray":
            return [
                *py,
                "benchmarks.ray_data",
                fp32,
                str(job.folder),
                out,
                "--actors",
                str(self.cfg.ray_actors),
                "--actor-cpus",
                str(self.cfg.ray_actor_cpus),
            ]
        if r == "http":
            return [
                *py,
                "benchmarks.http_design",
                fp32,
                str(job.folder),
                out,
                "--concurrency",
                str(self.cfg.http_concurrency),
            ]
        if r == "bounds":
            cmd = [
                *py,
                "benchmarks.bounds",
                fp32,
                "--small",
                str(job.folder),
                "--min-s",
                str(self.cfg.bounds_min_s),
            ]
            if self.cfg.large:
                cmd += ["--large", str(self.extra["large_folder"])]
            if self.int8 is not None:
                cmd += ["--int8-json", str(self.model_json(self.int8))]
                cmd += ["--agree-n", str(self.cfg.agree_n if round_ == 0 else 0)]
            return cmd
        raise ValueError(r)

    def run_job(self, job: Job, round_: int, *, label: str = "", record: bool = True) -> Run:
        tag = f"{job.runner}-{job.size}-n{job.n}-r{round_}{label}"
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = self.command(job, tag, round_)
        m = run_measured(
            cmd,
            env=clean_env(ICS_HOME=str(self.home), RAY_USAGE_STATS_ENABLED="0"),
            cwd=ROOT,
            timeout_s=self.cfg.timeout_s,
            log_path=self.work / f"{tag}.log",
            report_path=self.work / f"{tag}.report.json",
        )
        run = self._check(job, m, tag)
        run.round = round_
        for suffix in (".jsonl", ".db", ".db-wal", ".db-shm"):
            (self.work / f"{tag}{suffix}").unlink(missing_ok=True)
        for leftover in Path("/dev/shm").glob(f"ics-bench-{os.getpid()}-{tag}.db*"):
            leftover.unlink(missing_ok=True)
        if record:
            self.runs.append(run)
        status = "ok" if run.ok else f"FAILED: {run.problem}"
        print(
            f"  {job.runner:<9} {job.size:<5} {job.n:>6} images  {m.wall_s:7.2f} s  "
            f"{run.ips:8.1f} img/s  peak {m.peak_rss_mb:7.0f} MB  {status}",
            flush=True,
        )
        return run

    def _check(self, job: Job, m: Measurement, tag: str) -> Run:
        run = Run(job=job, round=0, m=m, ok=False)
        if m.timed_out:
            run.problem = f"timed out after {self.cfg.timeout_s:.0f} s"
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
            run.ok = m.rc == 0
            run.problem = "" if run.ok else f"exit {m.rc}"
            return run
        if m.rc != 0:
            run.problem = f"exit {m.rc}: {_last_line(m.stderr_tail)}"
            return run
        if job.runner != "bounds":
            lines = self.work / f"{tag}.jsonl"
            count = sum(1 for _ in lines.open()) if lines.exists() else 0
            if count != job.n:
                run.problem = f"{count} results for {job.n} images"
                return run
        if m.report:
            run.steady_ips = m.report.get("steady_images_per_s")
        run.ok = True
        return run


# --- the run --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.rerender:
        rerender(cfg)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
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

    if cfg.warmup:
        print("warm-up (untimed): every runner on 8 small photos", flush=True)
        for r in runners:
            if r != "bounds":
                b.run_job(Job(r, "tiny", tiny, 8), 0, record=False)
    for round_ in range(cfg.repeats):
        shift = round_ * len(jobs) // max(cfg.repeats, 1)
        order = jobs[shift:] + jobs[:shift]
        print(f"round {round_ + 1}/{cfg.repeats}", flush=True)
        for job in order:
            b.run_job(job, round_)

    if cfg.mem_n and "ics" in runners:
        print(f"memory: ICS on {cfg.mem_base} and {cfg.mem_n} images", flush=True)
        for n in (cfg.mem_base, cfg.mem_n):
            folder = ensure_repeated(corpus_root, small, n)
            run = b.run_job(Job("ics", "mem", folder, n), 0, record=False)
            b.extra.setdefault("memory", []).append(_run_doc(run))
    if cfg.one_image_runs and "ics" in runners:
        print("one image, warm model cache", flush=True)
        one = ensure_corpus(corpus_root, "small", 1, cfg.seed)
        b.extra["one_image"] = [
            _run_doc(b.run_job(Job("ics", "one", one, 1), i, record=False))
            for i in range(cfg.one_image_runs)
        ]
    if cfg.profile and "ics" in runners:
        b.extra["profile"] = profile_ics(b, small)

    b.extra["load_before"] = load_before
    b.extra["load_after"] = os.getloadavg()
    b.extra["total_s"] = time.perf_counter() - started
    write_outputs(b)
    print(f"wrote {cfg.results} in {b.extra['total_s']:.0f} s", flush=True)
    failed = [r for r in b.runs if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed; see {b.work}/*.log")


def rerender(cfg: Config) -> None:
    """Write the results file again from a finished run's results.json."""
    doc = json.loads((cfg.out / "results.json").read_text())
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
        job = Job(d["runner"], d["size"], Path(), d["n"])
        b.runs.append(Run(job, d["round"], m, d["ok"], d["problem"], d["steady_images_per_s"]))
    write_outputs(b, doc["machine"])
    print(f"wrote {cfg.results} from {cfg.out / 'results.json'}")


def _run_doc(run: Run) -> dict[str, Any]:
    return {
        "runner": run.job.runner,
        "size": run.job.size,
        "n": run.job.n,
        "round": run.round,
        "ok": run.ok,
        "problem": run.problem,
        "images_per_s": run.ips,
        "steady_images_per_s": run.steady_ips,
        **run.m.to_dict(),
    }


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
        env=clean_env(ICS_HOME=str(b.home)),
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


# --- the report -----------------------------------------------------------------------


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(b: Bench) -> dict[str, Any]:
    """Medians per (runner, size) over the rounds; max of the peak RSS."""
    out: dict[str, Any] = {}
    keys = sorted({(r.job.runner, r.job.size) for r in b.runs})
    for key in keys:
        runs = [r for r in b.runs if (r.job.runner, r.job.size) == key]
        ok = [r for r in runs if r.ok]
        out["/".join(key)] = {
            "runs": len(runs),
            "ok": len(ok),
            "problems": sorted({r.problem for r in runs if not r.ok}),
            "images_per_s": _med([r.ips for r in ok]),
            "min": min((r.ips for r in ok), default=None),
            "max": max((r.ips for r in ok), default=None),
            "steady_images_per_s": _med([r.steady_ips for r in ok if r.steady_ips]),
            "startup_s": _med(
                [
                    r.m.wall_s - r.job.n / r.steady_ips
                    for r in ok
                    if r.steady_ips and r.job.runner != "bounds"
                ]
            ),
            "peak_rss_mb": max((r.m.peak_rss_mb for r in ok), default=None),
            "cpu_ms_per_image": _med([r.m.cpu_s * 1e3 / r.job.n for r in ok]),
            "cores_used": _med([r.m.cpu_s / r.m.wall_s for r in ok]),
            "wall_s": _med([r.m.wall_s for r in ok]),
        }
    bounds = [r.m.report for r in b.runs if r.job.runner == "bounds" and r.ok and r.m.report]
    if bounds:
        out["bounds"] = bound_summary(bounds)
    return out


def bound_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    c = reports[0]["cpus"]
    ips_c = _med([r["model"]["best_images_per_s"] for r in reports])
    ips_1 = _med([r["model"]["one_thread_images_per_s"] for r in reports])
    ips_p = _med([r["model"]["per_core_sessions_images_per_s"] for r in reports])
    by_batch = {
        bs: _med([r["model"]["images_per_s_by_batch"][bs] for r in reports])
        for bs in reports[0]["model"]["images_per_s_by_batch"]
    }
    doc: dict[str, Any] = {
        "cpus": c,
        "model_best_images_per_s": ips_c,
        "model_best_batch": max(by_batch, key=lambda k: by_batch[k] or 0),
        "model_one_thread_images_per_s": ips_1,
        "model_per_core_sessions_images_per_s": ips_p,
        "model_per_core_sessions_best_batch": reports[0]["model"]["per_core_sessions_best_batch"],
        "model_by_batch": by_batch,
        "preprocessor": reports[0].get("preprocessor"),
        "decode": {},
        "pipelined": {},
    }
    for size in SIZES:
        ms = _med([r["decode"][size]["ics_ms"] for r in reports if size in r.get("decode", {})])
        plain = _med(
            [r["decode"][size]["plain_ms"] for r in reports if size in r.get("decode", {})]
        )
        if ms is None or not ips_c or not ips_p:
            continue
        d = ms / 1e3
        # Core-seconds per image: the model's (c / its throughput on all c cores) plus the
        # decode's (d, on one core); the c cores share them. The model runs either as one
        # session over all cores or as one single-thread session per core, whichever is
        # faster: the better schedule is the bound.
        shared = 1.0 / (1.0 / ips_c + d / c)
        per_core = 1.0 / (1.0 / ips_p + d / c)
        doc["decode"][size] = {"ics_ms": ms, "plain_ms": plain}
        doc["pipelined"][size] = {
            "bound": max(shared, per_core),
            "shared_cores": shared,
            "per_core": per_core,
            "decode_only": c / d,
        }
    int8 = [r["int8"] for r in reports if "int8" in r]
    if int8:
        agreements = [x["agreement"] for x in int8 if x.get("agreement", {}).get("images")]
        doc["int8"] = {
            "model_best_images_per_s": _med([x["model"]["best_images_per_s"] for x in int8]),
            "model_best_batch": int8[0]["model"]["best_batch"],
            "agreement": agreements[0] if agreements else None,
        }
    return doc


def machine() -> dict[str, Any]:
    cpu_model, flags = "unknown", set()
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
        "cpus": cpus(),
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit + (" + uncommitted changes in src/" if dirty else ""),
    }


def write_outputs(b: Bench, mach: dict[str, Any] | None = None) -> None:
    s = summary(b)
    doc = {
        "config": {
            k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(b.cfg).items()
        },
        "machine": mach or machine(),
        "models": {"fp32": b.fp32, "int8": b.int8},
        "summary": s,
        "runs": [_run_doc(r) for r in b.runs],
        "extra": {k: v for k, v in b.extra.items() if k != "large_folder"},
        "notes": b.notes,
    }
    b.cfg.out.mkdir(parents=True, exist_ok=True)
    (b.cfg.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    b.cfg.results.parent.mkdir(parents=True, exist_ok=True)
    b.cfg.results.write_text(render(b, s, doc["machine"]))


def render(b: Bench, s: dict[str, Any], mach: dict[str, Any]) -> str:
    cfg = b.cfg
    today = dt.date.today().isoformat()
    lb, la = b.extra["load_before"], b.extra["load_after"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured {today} by `make bench` (`python -m benchmarks.run`) in "
        f"{b.extra['total_s'] / 60:.1f} min: {cfg.n} small photos (~500×375), "
        f"{cfg.n_large} large (~4000×3000), seed {cfg.seed}, {cfg.repeats} interleaved "
        f"round(s); medians over the rounds, peak RSS is the largest seen. Every runner is "
        f"timed as a whole process, start-up included. Raw data: "
        f"`{_rel(cfg.out / 'results.json')}`.",
        "",
        f"Knobs changed from their defaults: {_changed(cfg) or 'none'}.",
        "",
        f"Load average (1, 5, 15 min) before: {lb[0]:.2f}, {lb[1]:.2f}, {lb[2]:.2f}; "
        f"after: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}.",
        "",
        *(
            [
                f"**Taken on a busy machine**: the load average before the run exceeded half the "
                f"{cpus()} cores, so other work shared the CPUs with every runner (see the "
                "'cores used' column: CPU seconds ÷ wall seconds). Rates and ratios are "
                "indicative only; CPU ms/image is the steadier comparison.",
                "",
            ]
            # The load after the run is mostly the run's own: only the load before it
            # says whether other work was sharing the cores.
            if lb[0] > cpus() / 2
            else []
        ),
        "## Machine",
        "",
        f"- CPU: {mach['cpu']} ({mach['simd']}); {mach['cpus']} cores usable; "
        f"{mach['memory_gb']} GB memory",
        f"- Linux {mach['kernel']}, Python {mach['python']}; "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()),
        f"- ICS at commit {mach['commit']}; model `{cfg.model}` (`{_rel(Path(b.fp32['path']))}`)",
        "",
    ]
    bounds = s.get("bounds")
    for size in ("small", "large"):
        if not any(k.endswith("/" + size) for k in s):
            continue
        n = cfg.n if size == "small" else cfg.n_large
        label = "~500×375" if size == "small" else "~4000×3000"
        lines += [
            f"## {size.capitalize()} photos ({n:,} × {label})",
            "",
            "| runner | images/s | range | steady images/s | start-up s | peak RSS MB "
            "| CPU ms/image | cores used | ICS ÷ runner |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ics = (s.get(f"ics/{size}") or {}).get("images_per_s")
        for r in RUNNERS:
            row = s.get(f"{r}/{size}")
            if row is None:
                continue
            what = DESCRIBE.get(r, r).format(int8=cfg.int8_model)
            failed = (
                f" ({row['runs'] - row['ok']} of {row['runs']} runs failed)"
                if (row["ok"] < row["runs"])
                else ""
            )
            lines.append(
                f"| {what}{failed} | {_fmt(row['images_per_s'])} "
                f"| {_fmt(row['min'])}–{_fmt(row['max'])} | {_fmt(row['steady_images_per_s'])} "
                f"| {_fmt(row['startup_s'], 2)} | {_fmt(row['peak_rss_mb'], 0)} "
                f"| {_fmt(row['cpu_ms_per_image'], 2)} | {_fmt(row.get('cores_used'), 2)} "
                f"| {_fmt(_ratio(ics, row['images_per_s']), 2) if r != 'ics' else ''} |"
            )
        if bounds and size in bounds["pipelined"]:
            pb = bounds["pipelined"][size]
            lines.append(
                f"| pipelined bound for {bounds['cpus']} cores (computed, no start-up) "
                f"| {_fmt(pb['bound'])} | | | | | | | {_fmt(_ratio(ics, pb['bound']), 2)} |"
            )
        lines.append("")
    if bounds:
        lines += render_bounds(bounds)
    lines += render_targets(b, s)
    lines += render_other(b, s)
    prof = b.extra.get("profile") or {}
    if prof.get("lines"):
        lines += [
            "## Profile headline: `ics classify` on the small photos",
            "",
            f"One run of {cfg.n:,} small photos under py-spy ({prof['wall_s']:.1f} s "
            f"with the profiler); raw stacks in `{_rel(Path(prof['raw']))}`.",
            "",
            *prof["lines"],
            "",
        ]
    lines += render_method(b)
    if b.notes:
        lines += ["## Notes from this run", "", *(f"- {n}" for n in b.notes), ""]
    if LIMITS.is_file():
        # Written by hand after reading a run: what limits each missed target.
        lines += [LIMITS.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines)


def render_bounds(bd: dict[str, Any]) -> list[str]:
    sweep = " · ".join(
        f"{bs}: {_fmt(v)}" for bs, v in bd["model_by_batch"].items() if v is not None
    )
    lines = [
        "## Bounds",
        "",
        f"- Bare model on pre-decoded tensors, {bd['cpus']} threads, images/s by batch size: "
        f"{sweep}; best {_fmt(bd['model_best_images_per_s'])} at batch "
        f"{bd['model_best_batch']}; one thread {_fmt(bd['model_one_thread_images_per_s'])}; "
        f"{bd['cpus']} one-thread sessions side by side "
        f"{_fmt(bd['model_per_core_sessions_images_per_s'])} in all (batch "
        f"{bd['model_per_core_sessions_best_batch']}).",
    ]
    for size, d in bd["decode"].items():
        pb = bd["pipelined"][size]
        lines.append(
            f"- Decode + preprocess on one core, {size} photos: {_fmt(d['ics_ms'], 2)} ms "
            f"with ICS's preprocessor ({_fmt(d['plain_ms'], 2)} ms the plain PIL way). "
            f"Pipelined bound {_fmt(pb['bound'])} images/s (one session on all cores: "
            f"{_fmt(pb['shared_cores'])}; one single-thread session per core: "
            f"{_fmt(pb['per_core'])}; decoding alone on every core: {_fmt(pb['decode_only'])})."
        )
    if bd.get("int8"):
        i8 = bd["int8"]
        lines.append(
            f"- INT8 bare model: best {_fmt(i8['model_best_images_per_s'])} images/s at batch "
            f"{i8['model_best_batch']}."
        )
    return [*lines, ""]


def _target(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[ok]


def render_targets(b: Bench, s: dict[str, Any]) -> list[str]:
    def ips(key: str) -> float | None:
        return (s.get(key) or {}).get("images_per_s")

    rows: list[tuple[str, str, bool | None]] = []
    bounds = s.get("bounds") or {}
    for size, peers in (
        ("small", (("plain", 1.15), ("ray", 3.0), ("http", 2.0))),
        ("large", (("plain", 5.0), ("ray", 5.0))),
    ):
        ics = ips(f"ics/{size}")
        if size == "small":
            bound = (bounds.get("pipelined", {}).get("small") or {}).get("bound")
            r = _ratio(ics, bound)
            rows.append(
                (
                    "small photos: ICS ≥ 0.85 × pipelined bound",
                    f"{_fmt(r, 3)} ({_fmt(ics)} of {_fmt(bound)} images/s)",
                    None if r is None else r >= 0.85,
                )
            )
        for peer, want in peers:
            r = _ratio(ics, ips(f"{peer}/{size}"))
            rows.append(
                (
                    f"{size} photos: ICS ≥ {want:g} × {peer}",
                    f"{_fmt(r, 3)} ×",
                    None if r is None else r >= want,
                )
            )
    mem = b.extra.get("memory") or []
    if len(mem) == 2 and all(m["ok"] for m in mem):
        grow = mem[1]["peak_rss_mb"] - mem[0]["peak_rss_mb"]
        rows.append(
            (
                f"memory: {mem[1]['n']:,} images within 150 MB of {mem[0]['n']:,}",
                f"{grow:+,.0f} MB ({mem[0]['peak_rss_mb']:,.0f} → {mem[1]['peak_rss_mb']:,.0f})",
                grow <= 150 if mem[1]["n"] >= 20000 else None,
            )
        )
    else:
        rows.append(("memory: 20,000 images within 150 MB of 1,000", "not run", None))
    i8 = bounds.get("int8")
    if i8:
        r = _ratio(i8["model_best_images_per_s"], bounds.get("model_best_images_per_s"))
        rows.append(
            ("INT8 bare model ≥ 1.8 × FP32", f"{_fmt(r, 3)} ×", None if r is None else r >= 1.8)
        )
        ag = i8.get("agreement")
        if ag:
            rows.append(
                (
                    f"INT8 top-1 agreement ≥ 98 % ({ag['images']:,} images)",
                    f"{ag['top1_agreement']:.1%}",
                    ag["top1_agreement"] >= 0.98 if ag["images"] >= 1000 else None,
                )
            )
        r = _ratio(ips("ics-int8/small"), ips("plain/small"))
        rows.append(
            (
                "INT8 end to end: ICS --model int8 ≥ 1.6 × FP32 plain loop",
                f"{_fmt(r, 3)} ×",
                None if r is None else r >= 1.6,
            )
        )
    else:
        rows.append(("INT8 targets", f"skipped: no `{b.cfg.int8_model}` model", None))
    lean, full = ips("ics-lean/small"), ips("ics/small")
    if lean and full:
        cost = 1 - full / lean
        rows.append(
            (
                "non-model work ≤ 10 % (default vs lean configuration)",
                f"{cost:+.1%} ({_fmt(full)} vs {_fmt(lean)} images/s)"
                + ("; below zero the lean run was the slower: noise" if cost < 0 else ""),
                cost <= 0.10,
            )
        )
    one = b.extra.get("one_image") or []
    walls = [r["wall_s"] for r in one if r["ok"]]
    if walls:
        rows.append(
            (
                "`ics classify` on one image < 2 s (warm model cache)",
                f"median {statistics.median(walls):.2f} s, max {max(walls):.2f} s",
                max(walls) < 2.0,
            )
        )
    lines = ["## Targets (issue 4)", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {_target(ok)} |" for t, m, ok in rows]
    return [*lines, ""]


def render_other(b: Bench, s: dict[str, Any]) -> list[str]:
    lines = ["## Other measurements", ""]
    for m in b.extra.get("memory") or []:
        failed = "" if m["ok"] else f" (FAILED: {m['problem']})"
        lines.append(
            f"- Memory run: `ics classify` on {m['n']:,} images (the small corpus repeated "
            f"by hard links): {m['wall_s']:.1f} s, {m['images_per_s']:.1f} images/s, "
            f"peak RSS {m['peak_rss_mb']:,.0f} MB{failed}."
        )
    one = b.extra.get("one_image") or []
    if one:
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in one)
        lines.append(f"- `ics classify` on one image, warm model cache: {walls} s.")
    lean = s.get("ics-lean/small")
    if lean:
        lines.append(
            "- No `ics classify` flag turns the execution store (or capture) off; the lean "
            "configuration keeps the store on tmpfs (`--store sqlite:////dev/shm/...`) and "
            "writes results to /dev/null, so its gap to the default bounds the cost of the "
            "disk writes, not of the store itself. The profile below shows the rest."
        )
    return [*lines, ""] if len(lines) > 2 else []


def render_method(b: Bench) -> list[str]:
    cfg = b.cfg
    return [
        "## How it was measured",
        "",
        "- Corpus (`benchmarks/corpus.py`): scikit-image's bundled photos, each image a "
        "random crop, flip and colour jitter, resized to its class and saved as JPEG "
        "(quality 85-95); large ones get sensor-like grain so they compress like real "
        "12-megapixel photos (about 3 MB each). Deterministic from the seed.",
        "- images/s = images ÷ wall time of the whole process (start-up included). "
        "Steady images/s is the runner's own clock from when it was ready (ICS: its "
        "`elapsed_s`), and start-up is the difference.",
        "- Peak RSS: the larger of the process's own high-water mark (VmHWM) and the "
        "summed RSS of its whole process tree (Ray's workers and raylet, the HTTP design's "
        "endpoint process), both sampled from /proc every 0.1 s; pages shared between "
        "processes count once per process.",
        "- Cores used = CPU seconds ÷ wall seconds of the run: how much of the machine the "
        "runner actually got (at most the core count).",
        "- CPU ms/image: user + system time of the whole process tree (the larger of what "
        "wait4 reports for the process and its reaped children, and the CPU time of every "
        "process of the tree sampled from /proc).",
        "- Peers use the same ONNX file and onnxruntime settings as ICS (intra-op threads = "
        "cores, no spinning, sequential, all graph optimisations). "
        f"Ray: {cfg.ray_actors} actor(s) of {cfg.ray_actor_cpus:g} CPU, preprocessing "
        f"fused into the read tasks, batch 8. HTTP design: stdlib endpoint in its own "
        f"process, a new connection per image, {cfg.http_concurrency} requests at a time.",
        "- Pipelined bound = 1 / (1/M + D/C): C cores share the model's core-seconds per "
        "image (C/M) and the decode's (D). M is the bare model's best images/s on all C "
        "cores, either one session with C threads or C single-thread sessions side by side "
        "(whichever is faster, each at its best batch size); D the decode + preprocess "
        "seconds per image on one core with ICS's preprocessor. The bound has no start-up; "
        "ICS's images/s includes its start-up.",
        "",
    ]


def _changed(cfg: Config) -> str:
    default = Config()
    return ", ".join(
        f"BENCH_{f.name.upper()}={_knob(getattr(cfg, f.name))}"
        for f in dataclasses.fields(Config)
        if f.name not in ("large", "out", "results", "rerender")
        and getattr(cfg, f.name) != getattr(default, f.name)
    )


def _knob(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(v)
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    main()
