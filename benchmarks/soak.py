"""Soak: `ics serve` under ordinary clients alone, then the same clients beside hostile ones.

    python -m benchmarks.soak MODEL_JSON FOLDER OUT.jsonl [--duration-s 60] [--clients 32]
                              [--hostile 200] [--store URL]

Starts `ics serve` on a loopback port with an API token and SigV4 keys (so that every
guard is on), its limits at their defaults. Then two phases of --duration-s each: the
ordinary clients alone (benchmarks.server_load: bearer token, one raw JPEG per request,
the folder's photos in turn), and the ordinary clients again beside --hostile hostile
clients in their own process (benchmarks.hostile: slow headers, slow bodies, made-up
signatures, strange methods, huge declared lengths). The server's resident memory is
sampled every 0.1 s throughout.

The report (BENCH_REPORT) holds both phases' figures: the ordinary clients' rate, p99 and
errors, the server's peak RSS in each phase, and the memory the server may hold for
hostile clients by its settings (unauthenticated_body_memory). OUT.jsonl gets one line
per photo of the folder (its last answer in the hostile phase), as the harness counts.
Exits non-zero only when the soak could not run (the server did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import Report
from .server_bench import ROOT, free_port, server_command, stop, wait_ready
from .server_load import Pass, load_images, run_pass

TOKEN = "soak-token-0123456789"
KEY_ID = "AKIASOAKTESTKEY00001"
SECRET = "soak/secret/0123456789abcdefghijklmnop"
#: The server's default unauthenticated_body_memory (config.Settings), stated in its env.
BODY_BUDGET = 64_000_000


class RssSampler:
    """The peak resident memory of a process, sampled every `every_s` in a thread."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            match = re.search(r"^VmRSS:\s+(\d+) kB", self.path.read_text(), re.MULTILINE)
        except OSError:
            return 0
        return int(match[1]) * 1024 if match else 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ordinary(url: str, images: list[tuple[str, bytes]], clients: int, duration_s: float) -> Pass:
    """`clients` ordinary clients sending the photos in turn for `duration_s`."""
    # Enough turns of the folder that no client runs out before the time is up.
    turns = [images[i % len(images)] for i in range(max(len(images), int(duration_s * 2000)))]
    return asyncio.run(
        run_pass(
            url + "/v1/classify",
            turns,
            clients=clients,
            max_s=duration_s,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    )


def phase(
    name: str, url: str, pid: int, images: list[tuple[str, bytes]], args: argparse.Namespace
) -> tuple[dict[str, Any], Pass]:
    hostile: subprocess.Popen[str] | None = None
    if name == "hostile":
        hostile = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.hostile",
                url,
                "--clients",
                str(args.hostile),
                "--duration-s",
                str(args.duration_s),
                "--access-key-id",
                KEY_ID,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(min(2.0, args.duration_s / 10))  # the hostile ones are at it first
    with RssSampler(pid) as rss:
        done = ordinary(url, images, args.clients, args.duration_s)
    doc: dict[str, Any] = {"phase": name, **done.summary(), "peak_rss_mb": rss.peak / 1e6}
    if hostile is not None:
        out, _ = hostile.communicate(timeout=args.duration_s + 120)
        doc["hostile"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        doc["hostile_exit"] = hostile.returncode
    print(json.dumps(doc), file=sys.stderr, flush=True)
    return doc, done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Soak `ics serve` with hostile clients beside.")
    p.add_argument("model_json")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--duration-s", type=float, default=60.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=32, help="ordinary clients")
    p.add_argument("--hostile", type=int, default=200, help="hostile clients")
    p.add_argument("--store", help="ICS's store URL")
    p.add_argument("--ready-timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)
    images = load_images(args.folder)
    if not images:
        raise SystemExit(f"no JPEG images in {args.folder}")

    report = Report()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ICS_") or k == "ICS_HOME"},
        "ICS_API_TOKEN": TOKEN,
        "ICS_SIGV4_ACCESS_KEY_ID": KEY_ID,
        "ICS_SIGV4_SECRET_ACCESS_KEY": SECRET,
        "ICS_UNAUTHENTICATED_BODY_MEMORY": str(BODY_BUDGET),
    }
    log_path = Path(args.out).with_suffix(".server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            server_command("ics", args.model_json, port, args.store),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(proc, base + "/readyz", args.ready_timeout_s)
        report.ready()
        calm, _ = phase("calm", base, proc.pid, images, args)
        hostile, last = phase("hostile", base, proc.pid, images, args)
    finally:
        rc = stop(proc)
    answers = {a.uri: a for a in last.answers}
    with open(args.out, "w") as out:
        for uri, _ in images:
            a = answers.get(uri)
            out.write(
                json.dumps(
                    {
                        "uri": uri,
                        "http_status": a.status if a else None,
                        "label_index": a.label_index if a else None,
                    }
                )
                + "\n"
            )
    rate = (hostile["images_per_s"] or 0) / calm["images_per_s"] if calm["images_per_s"] else None
    p99 = hostile["p99_ms"] / calm["p99_ms"] if calm["p99_ms"] and hostile["p99_ms"] else None
    report.finish(
        int(calm["ok"]) + int(hostile["ok"]),
        soak={
            "duration_s": args.duration_s,
            "clients": args.clients,
            "hostile_clients": args.hostile,
            "calm": calm,
            "hostile": hostile,
            "rate_ratio": rate,
            "p99_ratio": p99,
            "body_budget_mb": BODY_BUDGET / 1e6,
            # The most hostile clients may make the server hold: the body budget.
            "rss_budget_mb": calm["peak_rss_mb"] + BODY_BUDGET / 1e6,
            "server_exit": rc,
        },
    )


if __name__ == "__main__":
    main()
