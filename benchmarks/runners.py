"""Which benchmark runners exist, what each is given, and the command that launches it.

A runner is a whole process timed from start to exit: `ics classify` or a peer module of
this folder. A `Job` is one runner on one corpus, a `Run` its measured outcome.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import Measurement

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    runner: str
    size: str  # "small", "large", or "-" for the bounds
    folder: Path
    n: int
    #: CPUs the process tree is pinned to (the scaling tables); 0: every usable CPU.
    cores: int = 0


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

    def to_doc(self) -> dict[str, Any]:
        return {
            "runner": self.job.runner,
            "size": self.job.size,
            "n": self.job.n,
            "cores": self.job.cores,
            "round": self.round,
            "ok": self.ok,
            "problem": self.problem,
            "images_per_s": self.ips,
            "steady_images_per_s": self.steady_ips,
            **self.m.to_dict(),
        }


#: Builds the command line of a job: (bench, job, tag of the run, round) → argv.
Launch = Callable[["Bench", Job, str, int], list[str]]


@dataclass(frozen=True)
class Runner:
    name: str
    launch: Launch
    #: What it is, for the results table ({int8} is the INT8 model's name).
    what: str = ""
    #: Timed on the large photos too by default.
    large: bool = False
    #: A server under load (benchmarks.server_bench): reported by client count, not in the
    #: whole-process tables.
    serving: bool = False
    #: Reported in a section of its own (report.render_soak), not in the tables of rates.
    apart: bool = False


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _ics(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return b.ics_cmd(job.folder, tag)


def _ics_lean(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return b.ics_cmd(job.folder, tag, lean=True)


def _ics_capture(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    # Captures of an earlier run with this tag would be counted with this one's.
    shutil.rmtree(b.capture_dir(tag), ignore_errors=True)
    return [*b.ics_cmd(job.folder, tag), "--capture", str(b.capture_dir(tag))]


def _ics_int8(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    assert b.int8 is not None
    return b.ics_cmd(job.folder, tag, model=b.int8["name"])


def _ics_sagemaker(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    from .remote_model import ENDPOINT

    labels = b.work / f"{tag}-labels.txt"
    return [
        *_py(
            "benchmarks.remote_model",
            b.fp32_json(),
            f"sqlite:///{b.work / f'{tag}-server.db'}",
            str(labels),
            "--",
        ),
        *b.ics_cmd(job.folder, tag, model=f"sagemaker:{ENDPOINT}"),
        "--labels",
        str(labels),
    ]


def _plain(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return _py("benchmarks.plain_loop", b.fp32_json(), str(job.folder), b.out_file(tag))


def _plain_ics(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return [*_plain(b, job, tag, round_), "--preprocess", "ics"]


def ray_args(actors: int, actor_cpus: float, batch: int) -> list[str]:
    return ["--actors", str(actors), "--actor-cpus", f"{actor_cpus:g}", "--batch-size", str(batch)]


def _ray(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    # The configuration the tuning pass picked (run.tune_ray), else the knobs'.
    tuned = b.extra.get("ray_tuned") or {}
    return _py(
        "benchmarks.ray_data",
        b.fp32_json(),
        str(job.folder),
        b.out_file(tag),
        *ray_args(
            int(tuned.get("actors", b.cfg.ray_actors)),
            float(tuned.get("actor_cpus", b.cfg.ray_actor_cpus)),
            int(tuned.get("batch_size", b.cfg.ray_batch)),
        ),
    )


def _ray_ics(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return [*_ray(b, job, tag, round_), "--preprocess", "ics"]


def _http(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return _py(
        "benchmarks.http_design",
        b.fp32_json(),
        str(job.folder),
        b.out_file(tag),
        "--concurrency",
        str(b.cfg.http_concurrency),
    )


#: Client counts of the serving runners' passes, in order.
SERVE_CLIENTS = "1,32"


def _serve(b: Bench, job: Job, tag: str, round_: int, server: str = "ics") -> list[str]:
    store = f"sqlite:///{b.work / f'{tag}.db'}"
    return _py(
        "benchmarks.server_bench",
        server,
        b.fp32_json(),
        str(job.folder),
        b.out_file(tag),
        "--clients",
        SERVE_CLIENTS,
        "--store",
        store,
    )


def _serve_grpc(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return _serve(b, job, tag, round_, server="ics-grpc")


def _litserve(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    return _py(
        "benchmarks.server_bench",
        "litserve",
        b.fp32_json(),
        str(job.folder),
        b.out_file(tag),
        "--clients",
        SERVE_CLIENTS,
    )


def _soak(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    store = f"sqlite:///{b.work / f'{tag}.db'}"
    return _py(
        "benchmarks.soak",
        b.fp32_json(),
        str(job.folder),
        b.out_file(tag),
        "--duration-s",
        f"{b.cfg.soak_s:g}",
        "--hostile",
        str(b.cfg.soak_hostile),
        "--store",
        store,
    )


def _bounds(b: Bench, job: Job, tag: str, round_: int) -> list[str]:
    cmd = _py(
        "benchmarks.bounds",
        b.fp32_json(),
        "--small",
        str(job.folder),
        "--min-s",
        str(b.cfg.bounds_min_s),
    )
    if b.cfg.large:
        cmd += ["--large", str(b.extra["large_folder"])]
    if b.int8 is not None:
        cmd += ["--int8-json", str(b.model_json(b.int8))]
        # The agreement does not change between rounds: measured once.
        cmd += ["--agree-n", str(b.cfg.agree_n if round_ == 0 else 0)]
    return cmd


#: Every runner, in the order of the results table.
REGISTRY: dict[str, Runner] = {
    r.name: r
    for r in (
        Runner("ics", _ics, "`ics classify` (local executor), store + results file", large=True),
        Runner("ics-lean", _ics_lean, "`ics classify`, store on tmpfs, results to /dev/null"),
        Runner(
            "ics-capture",
            _ics_capture,
            "`ics classify --capture`: as `ics`, every image and its probabilities captured",
        ),
        Runner("ics-int8", _ics_int8, "`ics classify --model {int8}`"),
        Runner(
            "ics-sagemaker",
            _ics_sagemaker,
            "`ics classify --model sagemaker:…`: the same model behind a local `ics serve`, "
            "reached by boto3 (the server's start-up and CPU count)",
        ),
        Runner("plain", _plain, "plain loop: PIL + onnxruntime, one image at a time", large=True),
        Runner(
            "plain-ics",
            _plain_ics,
            "plain loop with ICS's decode + preprocessing (`ics_service.imaging.Preprocessor`)",
            large=True,
        ),
        Runner("ray", _ray, "Ray Data: read_images + map_batches actor pool", large=True),
        Runner(
            "ray-ics",
            _ray_ics,
            "Ray Data: read_binary_files + ICS's decode + preprocessing, actor pool",
            large=True,
        ),
        Runner("http", _http, "original design: base64 + one HTTP POST per image", large=True),
        Runner("serve", _serve, "`ics serve`: POST /v1/classify, raw JPEG body", serving=True),
        Runner(
            "serve-grpc",
            _serve_grpc,
            "`ics serve`: gRPC ModelInfer, the JPEG as a BYTES input",
            serving=True,
        ),
        Runner(
            "litserve",
            _litserve,
            "LitServe, batching (max 8, 5 ms), ICS's decode, same ONNX file",
            serving=True,
        ),
        Runner(
            "soak",
            _soak,
            "`ics serve` soak: 32 ordinary clients alone, then beside hostile ones",
            apart=True,
        ),
        Runner("bounds", _bounds),
    )
}
RUNNERS = tuple(REGISTRY)
#: Runners timed on the large photos (the others only on small ones).
LARGE_RUNNERS = tuple(r.name for r in REGISTRY.values() if r.large)
#: Servers under load, reported apart (report.render_serving).
SERVING_RUNNERS = tuple(r.name for r in REGISTRY.values() if r.serving)
#: Runners reported in a section of their own.
APART_RUNNERS = tuple(r.name for r in REGISTRY.values() if r.apart)
#: What each runner is, for the table.
DESCRIBE = {r.name: r.what for r in REGISTRY.values() if r.what}


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
    device: str = "cpu"
    http_concurrency: int = 2
    ray_actors: int = 1
    ray_actor_cpus: float = 0.5
    ray_batch: int = 8
    ray_tune_n: int = 300
    ray_tune_s: float = 240.0
    require_quiet: bool = False
    busy_load: float = 0.5
    busy_others: float = 0.1
    scaling: bool = True
    scaling_n: str = "100,1000,10000"
    scaling_cores_n: int = 1000
    scaling_runners: str = "ics,plain"
    one_image_runs: int = 5
    bounds_min_s: float = 1.0
    soak_s: float = 60.0
    soak_hostile: int = 200
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


@dataclass
class Bench:
    """One benchmark run: its knobs, the `ics` command, the models, and what was measured."""

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

    def fp32_json(self) -> str:
        return str(self.model_json(self.fp32))

    def capture_dir(self, tag: str) -> Path:
        return self.work / f"{tag}-capture"

    def out_file(self, tag: str) -> str:
        return str(self.work / f"{tag}.jsonl")

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
        runner = REGISTRY.get(job.runner)
        if runner is None:
            raise ValueError(job.runner)
        return runner.launch(self, job, tag, round_)
