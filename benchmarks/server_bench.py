"""Throughput of a classification server: start it on a free loopback port, wait until it is
ready, load it from another process (benchmarks.server_load) with one client at a time,
then with 32 concurrent clients, stop it, and report images/s and p50/p99 latency.

    python -m benchmarks.server_bench ics MODEL_JSON FOLDER OUT.jsonl [--clients 1,32]
    python -m benchmarks.server_bench ics-grpc MODEL_JSON FOLDER OUT.jsonl [--clients 1,32]
    python -m benchmarks.server_bench litserve MODEL_JSON FOLDER OUT.jsonl

`ics` is `ics serve` (its defaults: dynamic batching up to 8, 5 ms delay, every result
recorded in the store given by --store), loaded on POST /v1/classify; `ics-grpc` is the
same server loaded on its gRPC endpoint (KServe's ModelInfer, the JPEG as a BYTES input);
`litserve` is benchmarks.litserve_peer on the same ONNX file, batching the same way. Each
client pass sends every image of the folder once as a raw JPEG body. OUT.jsonl gets one
line per answer of the last pass; the report (BENCH_REPORT) holds every pass's figures.
Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .common import Report, list_images
from .measure import tree_cpu_s

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("ics", "ics-grpc", "litserve")
#: The readiness route of each server.
READY = {"ics": "/readyz", "ics-grpc": "/readyz", "litserve": "/health"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def model_name(model_json: str) -> str:
    name: str = json.loads(Path(model_json).read_text())["name"]
    return name


def server_command(
    server: str, model_json: str, port: int, store: str | None, grpc_port: int = 0
) -> list[str]:
    """The server's command line; `grpc_port` is ICS's gRPC port (0: none)."""
    if server in ("ics", "ics-grpc"):
        ics = Path(sys.executable).parent / "ics"
        name = model_name(model_json)
        cmd = [
            str(ics) if ics.exists() else (shutil.which("ics") or "ics"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            name,
            "--grpc-port",
            str(grpc_port),
        ]
        return cmd + (["--store", store] if store else [])
    return [
        sys.executable,
        "-m",
        "benchmarks.litserve_peer",
        model_json,
        "--port",
        str(port),
        "--max-batch-size",
        "8",
        "--batch-timeout",
        "0.005",
    ]


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM to the server's process group (LitServe has worker processes), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Worker processes left in the group (LitServe's, when its main process went first).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def load(
    url: str,
    folder: str,
    clients: int,
    max_s: float,
    out: str | None,
    model: str | None = None,
) -> dict[str, object]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.server_load",
        url,
        folder,
        "--clients",
        str(clients),
        "--max-s",
        str(max_s),
    ]
    if out:
        cmd += ["--out", out]
    if model:
        cmd += ["--model", model]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max_s + 120)
    if r.returncode != 0:
        raise SystemExit(f"the load generator failed (exit {r.returncode}): {r.stderr[-2000:]}")
    doc: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Load a classification server and measure it.")
    p.add_argument("server", choices=SERVERS)
    p.add_argument("model_json")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--clients", default="1,32", help="comma-separated client counts, in order")
    p.add_argument("--store", help="ICS's store URL (ics and ics-grpc only)")
    p.add_argument("--max-s", type=float, default=300.0, help="limit of one client pass")
    p.add_argument("--ready-timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)
    passes = [int(c) for c in args.clients.split(",") if c.strip()]
    n = len(list_images(args.folder))

    report = Report()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    grpc_port = free_port() if args.server == "ics-grpc" else 0
    target = f"grpc://127.0.0.1:{grpc_port}" if grpc_port else base
    model = model_name(args.model_json) if grpc_port else None
    log_path = Path(args.out).with_suffix(".server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            server_command(args.server, args.model_json, port, args.store, grpc_port),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with its workers
        )
    results: list[dict[str, object]] = []
    try:
        wait_ready(proc, base + READY[args.server], args.ready_timeout_s)
        report.ready()
        for i, clients in enumerate(passes):
            last = i == len(passes) - 1
            cpu_before = tree_cpu_s(proc.pid)
            doc = load(target, args.folder, clients, args.max_s, args.out if last else None, model)
            # The server's whole process tree (LitServe's workers too) during the pass.
            used = tree_cpu_s(proc.pid) - cpu_before
            requests = int(str(doc["requests"]))
            doc["server_cpu_ms_per_request"] = round(used * 1e3 / requests, 3) if requests else None
            results.append(doc)
            print(json.dumps({"server": args.server, **doc}), file=sys.stderr, flush=True)
    finally:
        rc = stop(proc)
    failed = sum(int(str(d["errors"])) for d in results)
    report.finish(
        n * len(passes),
        server=args.server,
        corpus_images=n,
        passes=results,
        server_exit=rc,
    )
    if failed or any(d["stopped_early"] for d in results):
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{failed} requests failed or a pass stopped early; server log:\n{tail}")


if __name__ == "__main__":
    main()
