"""The original design's shape: per image, base64-encode it, POST it to a model endpoint
in its own process (one image per request, a new connection each, as a Lambda does), parse
the probabilities and compare the top one with the threshold.

The endpoint is benchmarks.http_endpoint, started by this runner (its start-up counts,
as every runner's does); --concurrency is the Map step's bounded concurrency.

    python -m benchmarks.http_design MODEL_JSON FOLDER OUT.jsonl [--concurrency 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .common import Report, list_images, result_line


def start_endpoint(model_json: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.http_endpoint", model_json],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"endpoint did not start (said {line!r}, exit code {proc.wait()})")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def classify_one(url: str, path: Path, threshold: float) -> str:
    body = json.dumps({"image": base64.b64encode(path.read_bytes()).decode("ascii")}).encode()
    req = urllib.request.Request(
        url + "/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        probs = np.asarray(json.loads(resp.read())["probabilities"], dtype=np.float32)
    return result_line(str(path), probs, threshold)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Base64 + one HTTP request per image.")
    p.add_argument("model_json")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--threshold", type=float, default=0.94)
    p.add_argument("--concurrency", type=int, default=2)
    args = p.parse_args(argv)

    report = Report()
    proc, url = start_endpoint(args.model_json)
    try:
        files = list_images(args.folder)
        with urllib.request.urlopen(url + "/settings", timeout=30) as resp:
            endpoint = json.loads(resp.read())
        report.ready()
        n = 0
        with open(args.out, "w") as out, ThreadPoolExecutor(args.concurrency) as pool:
            for line in pool.map(lambda f: classify_one(url, f, args.threshold), files):
                out.write(line + "\n")
                n += 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report.finish(
        n,
        concurrency=args.concurrency,
        settings={
            "concurrency": args.concurrency,
            "connection": "a new one per image",
            "preprocess": "PIL convert + resize + crop, in the endpoint",
            **endpoint,
        },
    )


if __name__ == "__main__":
    main()
