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

Every process of the soak shares the same cores, so each phase also records where the CPU
went over the ordinary clients' window (`cpu`): the server's (its process tree), the
ordinary clients' (this process), the hostile clients' (their process) and the whole
machine's (/proc/stat). From these, `bound`: the rate ratio the ordinary clients could
reach beside the hostile ones if the server spent nothing on hostile connections (the CPU
the hostile generator and other work leave to server and clients, over the CPU they used
alone, at most 1), and the server's own extra CPU for the hostile connections (its CPU
beside them less what the same ordinary requests cost it alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import Report, cpus
from .measure import TICKS, cpu_of, own_cpu_s, stat_fields, tree_cpu_s
from .server_bench import ROOT, free_port, server_command, stop, wait_ready
from .server_load import Pass, load_images, run_pass

TOKEN = "soak-token-0123456789"
KEY_ID = "AKIASOAKTESTKEY00001"
SECRET = "soak/secret/0123456789abcdefghijklmnop"
#: The server's default unauthenticated_body_memory (config.Settings), stated in its env.
BODY_BUDGET = 64_000_000
#: Seconds the hostile clients are at it before the ordinary clients start (at most).
LEAD_S = 2.0
#: Machine busy for this share of its cores' time or more: the phase was CPU-bound.
CPU_BOUND_SHARE = 0.95


def loop_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread: the server's event loop, where every
    connection is accepted, parsed and answered (inference and decoding run on others)."""
    return cpu_of(stat_fields(f"/proc/{pid}/task/{pid}/stat"))


def server_cpu_s(pid: int) -> float:
    """CPU seconds of the server: its live process tree, plus the children it has reaped."""
    fields = stat_fields(f"/proc/{pid}/stat")
    reaped = (int(fields[13]) + int(fields[14])) / TICKS if fields else 0.0
    return tree_cpu_s(pid) + reaped


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds all cores spent on anything but idle and iowait since boot, and of those
    the hypervisor's steal (/proc/stat)."""
    with open("/proc/stat", "rb") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: within user/nice]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICKS, ticks[7] / TICKS


class CpuClock:
    """The CPU seconds of the server, the ordinary clients (this process), the hostile
    clients (when there are any) and the whole machine, between `start` and `stop`."""

    def __init__(self, server: int, hostile: int | None) -> None:
        self.server = server
        self.hostile = hostile

    def _now(self) -> dict[str, float]:
        busy, steal = machine_cpu_s()
        return {
            "wall_s": time.perf_counter(),
            "server_s": server_cpu_s(self.server),
            "server_loop_s": loop_cpu_s(self.server),
            "clients_s": own_cpu_s(os.getpid()),
            "hostile_s": own_cpu_s(self.hostile) if self.hostile else 0.0,
            "machine_busy_s": busy,
            "steal_s": steal,
        }

    def start(self) -> None:
        self.started = self._now()

    def stop(self) -> dict[str, Any]:
        end = self._now()
        out: dict[str, Any] = {k: round(end[k] - self.started[k], 3) for k in end}
        # What no process of the soak got: other processes, kernel work charged to none, and
        # the hypervisor's steal.
        out["others_s"] = round(
            out["machine_busy_s"] - out["server_s"] - out["clients_s"] - out["hostile_s"], 3
        )
        out["cores"] = cpus()
        out["machine_cores_used"] = round(
            (end["machine_busy_s"] - self.started["machine_busy_s"])
            / (end["wall_s"] - self.started["wall_s"]),
            3,
        )
        return out


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
    lead_s = min(LEAD_S, args.duration_s / 10)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if name == "hostile":
        hostile = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.hostile",
                url,
                "--clients",
                str(args.hostile),
                # At it for the whole of the ordinary clients' window, the lead and a margin.
                "--duration-s",
                str(args.duration_s + lead_s + 1.0),
                "--access-key-id",
                KEY_ID,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(lead_s)  # the hostile ones are at it first
    clock = CpuClock(pid, hostile.pid if hostile is not None else None)
    with RssSampler(pid) as rss:
        clock.start()
        done = ordinary(url, images, args.clients, args.duration_s)
        cpu = clock.stop()
    ok = done.summary()["ok"]
    cpu["server_ms_per_request"] = round(cpu["server_s"] * 1e3 / ok, 3) if ok else None
    doc: dict[str, Any] = {
        "phase": name,
        **done.summary(),
        "peak_rss_mb": rss.peak / 1e6,
        "cpu": cpu,
    }
    if hostile is not None:
        out, _ = hostile.communicate(timeout=args.duration_s + 120)
        doc["hostile"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        doc["hostile_exit"] = hostile.returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Its whole life (start-up, lead and margin included), as wait4 reports it.
        cpu["hostile_lifetime_s"] = round(
            after.ru_utime + after.ru_stime - children_before.ru_utime - children_before.ru_stime,
            3,
        )
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
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ICS_") or k in ("ICS_HOME", "ICS_DEVICE")
        },
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
    bound = cpu_bound(calm, hostile)
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
            "bound": {
                **bound,
                "measured_over_bound": (
                    round(rate / bound["rate_ratio"], 4) if rate and bound["rate_ratio"] else None
                ),
            },
        },
    )


def cpu_bound(calm: dict[str, Any], hostile: dict[str, Any]) -> dict[str, Any]:
    """What the machine allows the ordinary clients beside the hostile generator.

    If each ordinary request cost the server and the clients the CPU it cost them alone,
    and the server spent nothing on hostile connections, the ordinary rate beside the
    hostile clients would be, relative to alone, the CPU left to server and clients beside
    them (the cores less the hostile generator's and what other work took in that phase)
    over the CPU they used alone; at most 1, as alone they may have left some idle.
    `idle_machine_rate_ratio` is the same with no other work in either phase: the share of
    the cores the hostile generator leaves. The server's extra CPU is what it used beside
    the hostile clients less what the same number of ordinary requests cost it alone.
    """
    a, h = calm["cpu"], hostile["cpu"]
    cores = a["cores"]
    alone_used = (a["server_s"] + a["clients_s"]) / a["wall_s"]
    hostile_cores = h["hostile_s"] / h["wall_s"]
    others_hostile = max(0.0, h["others_s"] / h["wall_s"])
    left = cores - hostile_cores - others_hostile
    ratio = min(1.0, left / alone_used) if alone_used > 0 else None
    server_ms = a["server_s"] / calm["ok"] if calm["ok"] else None
    extra_s = h["server_s"] - hostile["ok"] * server_ms if server_ms is not None else None
    # Of which on the event loop's thread (connections) and on the others (the model's).
    loop_extra_s = (
        h.get("server_loop_s", 0.0) - hostile["ok"] * a.get("server_loop_s", 0.0) / calm["ok"]
        if calm["ok"]
        else None
    )
    generator = hostile.get("hostile") or {}
    # The hostile clients' attempts within the window, at their average rate.
    attempts = sum(k["attempts"] for k in (generator.get("kinds") or {}).values()) * (
        h["wall_s"] / generator["duration_s"] if generator.get("duration_s") else 0.0
    )

    def per_request(phase: dict[str, Any], key: str) -> float | None:
        return round(phase["cpu"][key] * 1e3 / phase["ok"], 3) if phase["ok"] else None

    return {
        "cores": cores,
        "alone_cores_used": round(alone_used, 4),
        "alone_machine_share": round(a["machine_busy_s"] / (cores * a["wall_s"]), 4),
        "alone_cpu_bound": a["machine_busy_s"] >= CPU_BOUND_SHARE * cores * a["wall_s"],
        "others_alone_cores": round(a["others_s"] / a["wall_s"], 4),
        "others_hostile_cores": round(others_hostile, 4),
        "hostile_generator_cores": round(hostile_cores, 4),
        "hostile_generator_share": round(hostile_cores / cores, 4),
        "left_hostile_cores": round(left, 4),
        "rate_ratio": round(ratio, 4) if ratio is not None else None,
        "idle_machine_rate_ratio": round(1 - hostile_cores / cores, 4),
        "server_extra_s": round(extra_s, 3) if extra_s is not None else None,
        "server_extra_cores": round(extra_s / h["wall_s"], 4) if extra_s is not None else None,
        "server_loop_extra_s": round(loop_extra_s, 3) if loop_extra_s is not None else None,
        "hostile_attempts_in_window": round(attempts),
        "server_extra_ms_per_hostile_attempt": (
            round(extra_s * 1e3 / attempts, 3) if extra_s is not None and attempts else None
        ),
        "server_ms_per_request": {
            "alone": per_request(calm, "server_s"),
            "hostile": per_request(hostile, "server_s"),
        },
        "clients_ms_per_request": {
            "alone": per_request(calm, "clients_s"),
            "hostile": per_request(hostile, "clients_s"),
        },
    }


if __name__ == "__main__":
    main()
