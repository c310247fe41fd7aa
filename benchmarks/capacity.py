"""Capacity figures, derived from committed raw outputs only: benchmarks/capacity.json.

    python -m benchmarks.capacity            # write benchmarks/capacity.json again
    python -m benchmarks.capacity --check    # exit 1 when it differs from what the inputs give

Inputs: the committed benchmark run (benchmarks/results.json: the local executor's CPU
per image and rates) and the store benchmark's run (benchmarks/store/results.json, from
`python -m benchmarks.store_writes`). Every figure is arithmetic on those, written with
the formula beside it; docs/deploy.md quotes them in a `<!-- figures:
../benchmarks/capacity.json -->` block, which the docs check (benchmarks/figures.py)
holds to this file, and tests/test_capacity.py holds this file to its inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
STORE = ROOT / "benchmarks" / "store" / "results.json"
OUT = ROOT / "benchmarks" / "capacity.json"

#: The job the docs size.
JOB_IMAGES = 10_000_000
#: The time the docs give a job's cores for.
TARGET_HOURS = 1
#: Cores of one `ics serve` replica: deploy/kubernetes/serve.yaml's CPU limit.
REPLICA_CORES = 2
#: The serving benchmark's client count the replica figures are taken at.
SERVE_CLIENTS = 32
#: Cluster sizes the docs give a job's hours for.
CLUSTER_CORES = (16, 64, 256)


def _r(x: float, digits: int) -> float:
    return round(x, digits)


def capacity(results: dict[str, Any], store: dict[str, Any]) -> dict[str, Any]:
    """The capacity figures from the two raw outputs (see the module's docstring)."""
    summary = results["summary"]
    photos: dict[str, Any] = {}
    for size, key in (("small", "ics/small"), ("large", "ics/large")):
        row = summary[key]
        cpu_ms = float(row["cpu_ms_per_image"])
        per_core_s = 1000.0 / cpu_ms
        core_hours = JOB_IMAGES * cpu_ms / 1000.0 / 3600.0
        photos[size] = {
            "runner": key,
            "n": row["n"],
            "cpu_ms_per_image": _r(cpu_ms, 2),
            "images_per_core_s": _r(per_core_s, 1),  # 1000 / CPU ms per image
            "images_per_core_h": round(per_core_s * 3600),
            # A replica's 2 cores, as measured on this 2-core machine (steady rate).
            "replica_batch_images_per_s": _r(float(row["steady_images_per_s"]), 1),
            "replica_batch_images_per_h": round(float(row["steady_images_per_s"]) * 3600),
            "job_core_hours": _r(core_hours, 1),  # images × CPU s per image / 3600
            "job_cores_for_target_hours": math.ceil(core_hours / TARGET_HOURS),
            "job_hours_on": {str(c): _r(core_hours / c, 2) for c in CLUSTER_CORES},
            # What the store must take for the job's results at that many cores.
            "results_per_s_on": {str(c): round(c * per_core_s) for c in CLUSTER_CORES},
        }
    # `ics serve` at 32 clients, small photos: the median over the rounds, as RESULTS.md's
    # serving table gives it (the server on the machine's 2 cores beside its clients).
    passes = [
        p
        for run in results["runs"]
        if run["runner"] == "serve" and run["size"] == "small" and run["ok"]
        for p in run["report"]["passes"]
        if int(p["clients"]) == SERVE_CLIENTS
    ]
    serve_rate = statistics.median(float(p["images_per_s"]) for p in passes)
    by_store: dict[str, Any] = {}
    for row in store["cells"]:
        entry = by_store.setdefault(row["store"], {"version": row["store_version"]})
        entry.setdefault(row["mode"], {})[str(row["writers"])] = row["results_per_s"]
    small_per_core = photos["small"]["images_per_core_s"]
    large_per_core = photos["large"]["images_per_core_s"]
    for entry in by_store.values():
        if "record" in entry:
            best = max(entry["record"].values())
            entry["record_best_results_per_s"] = best
            # The cores of batch work (small photos) whose results it can take.
            entry["record_feeds_cores"] = math.floor(best / small_per_core)
            entry["record_feeds_cores_large"] = math.floor(best / large_per_core)
        if "append" in entry:
            best = max(entry["append"].values())
            entry["append_best_results_per_s"] = best
            # The `ics serve` replicas (at 32 clients each) whose real-time results it takes,
            # one result per transaction.
            entry["append_feeds_replicas"] = math.floor(best / serve_rate)
    return {
        "inputs": {
            "results": {"path": "benchmarks/results.json", "run_id": results["run_id"]},
            "store": {"path": "benchmarks/store/results.json", "run_id": store["run_id"]},
        },
        "job_images": JOB_IMAGES,
        "replica_cores": REPLICA_CORES,
        "cluster_cores": list(CLUSTER_CORES),
        "photos": photos,
        "serve": {
            "clients": SERVE_CLIENTS,
            "replica_images_per_s": _r(serve_rate, 1),
            "replica_images_per_h": round(serve_rate * 3600),
        },
        "target_hours": TARGET_HOURS,
        "job_results_per_s_in_target_hours": round(JOB_IMAGES / (3600 * TARGET_HOURS)),
        "store": by_store,
    }


def compute() -> dict[str, Any]:
    """capacity() of the committed inputs."""
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    store = json.loads(STORE.read_text(encoding="utf-8"))
    return capacity(results, store)


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render(compute())
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUT.relative_to(ROOT)} is not what its inputs give: run "
                "`python -m benchmarks.capacity` and update docs/deploy.md's figures",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
