"""INT8 judged by what the workflow decides, on the photos held out from calibration.

On the held-out photos (ics_service.models.heldout: Debian's tuxpaint-stamps-default,
`scripts/heldout-photos.sh`), each once and then --variations variations of them: the
share of images on which the INT8 model's decision (SUCCEEDED at or above the threshold,
LOW_CONFIDENCE below) equals FP32's, at the default threshold (target ≥ 99 %); its top-1
agreement where FP32's top-1 probability is at least 0.5 (target 100 %); the overall top-1
agreement; and FP32's own noise floor (its agreement with itself when every input value
moves by ±0.5 grey level), for top-1 and decisions. Each photo whose decision flips, or
whose top-1 differs where FP32 is confident, is listed with both models' answers.

These are the figures `make bench` reports in RESULTS.md (benchmarks/bounds.py, Bounds and
Targets); this runs only them, a measurement of agreement rather than of speed (any load
on the machine leaves it unchanged), in about a minute, and writes the committed
benchmarks/int8_decisions.json that the docs quote:

    python -m benchmarks.int8_decisions [--variations N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bounds import heldout_agreement
from benchmarks.report import decision_line, decision_targets
from benchmarks.run import machine
from benchmarks.runners import ROOT

FP32 = "efficientnet-lite0"
INT8 = "efficientnet-lite0-int8"
JSON = ROOT / "benchmarks" / "int8_decisions.json"


def model_sha256(path: Path) -> str | None:
    """The ONNX file's digest as `ics models prepare` recorded it (model.json beside it)."""
    try:
        meta = json.loads((path.parent / "model.json").read_text())
    except (OSError, ValueError):
        return None
    digest = meta.get("sha256")
    return digest if isinstance(digest, str) else None


def measure(models_dir: Path, variations: int, threads: int) -> dict[str, Any]:
    """The decision figures of INT8 against FP32 (both prepared under models_dir first)."""
    from ics_service.models import get_card
    from ics_service.models.prepare import onnx_path, prepare
    from ics_service.models.runtime import OnnxRuntime

    fp32, int8 = get_card(FP32), get_card(INT8)
    prepare(int8, models_dir)  # prepares FP32 first, as its base
    reference = OnnxRuntime(fp32, onnx_path(fp32, models_dir), threads=threads)
    candidate = OnnxRuntime(int8, onnx_path(int8, models_dir), threads=threads)
    started = time.perf_counter()
    heldout = heldout_agreement(reference, candidate, variations)
    if "skipped" in heldout:
        raise SystemExit(f"not measured: {heldout['skipped']}")
    targets = decision_targets(heldout)
    return {
        "benchmark": "int8_decisions",
        "machine": machine(),
        "models": {
            card.name: {"version": card.version, "sha256": model_sha256(rt.path)}
            for card, rt in ((fp32, reference), (int8, candidate))
        },
        "variations": variations,
        "seed": 0,
        "measured_in_s": round(time.perf_counter() - started, 1),
        "heldout": heldout,
        "targets": [{"target": t, "figures": f, "met": ok} for t, f, ok in targets],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variations", type=int, default=1000, help="Variations of the photos.")
    p.add_argument("--models-dir", type=Path, help="Default: the settings' models folder.")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per model.")
    p.add_argument("--json", type=Path, default=JSON, help=f"Default: {JSON.relative_to(ROOT)}.")
    args = p.parse_args(argv)
    from ics_service.config import load_settings

    models_dir = args.models_dir or load_settings().settings.models_dir
    doc = measure(models_dir, args.variations, args.threads)
    args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(decision_line(doc["heldout"]))
    for t in doc["targets"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"- {t['target']}: {t['figures']}: {met}")
    print(f"written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
