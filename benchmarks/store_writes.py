"""The execution store's write rate: results recorded per second with many concurrent writers.

    python -m benchmarks.store_writes                       # SQLite and PostgreSQL
    python -m benchmarks.store_writes --stores sqlite --seconds 1 --writers 1,2
    make bench-store

Each writer is its own process (forked after the imports) with its own Store, as separate
`ics` processes and server replicas are. Two ways of writing, both through the Store's own
methods (nothing is bypassed):

- `record`: `Store.record_results` of 8 results per transaction (a batch of the engine),
  each writer on its own execution whose items it registered beforehand: several batch
  executions at once.
- `append`: `Store.append_results` of 1 result per transaction, every writer on one shared
  execution: real-time requests recorded one by one by several `ics serve` replicas (the
  worst case; a replica groups the results that wait).

For each store, mode and writer count, the writers start together and write for `--seconds`;
the rate is the results committed in that window ÷ its length. SQLite is a file in a fresh
temporary folder; PostgreSQL is a scratch database created (and dropped) through
`--postgres-url` (default: ICS_TEST_POSTGRES_URL, else `scripts/postgres.sh url`).

The raw output is benchmarks/store/results.json (run id, machine, load average, every cell);
`python -m benchmarks.capacity` reads it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ics_service.store import Store
from ics_service.types import ImageInfo, ItemResult, ItemStatus, ModelRef, Prediction

from .quiet import load_snapshot
from .run import machine, run_id

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "store" / "results.json"
MODES = ("record", "append")
#: Results per transaction in each mode.
PER_TRANSACTION = {"record": 8, "append": 1}
MODEL = ModelRef("efficientnet-lite0", "1")


def result(execution_id: str, item_id: int, uri: str) -> ItemResult:
    """A result as the engine records one: top 5, image info, timings."""
    now = dt.datetime.now(dt.UTC)
    top = [Prediction(f"label {k}", 900 + k, 0.9 / (k + 1)) for k in range(5)]
    return ItemResult(
        execution_id=execution_id,
        item_id=str(item_id),
        uri=uri,
        status=ItemStatus.LOW_CONFIDENCE,
        threshold=0.94,
        model=MODEL,
        started_at=now,
        finished_at=now,
        label=top[0].label,
        label_index=top[0].index,
        confidence=top[0].confidence,
        top_k=top,
        image=ImageInfo(500, 375, "JPEG", "0" * 64),
        timings_ms={"read": 0.4, "decode": 1.9, "inference": 6.1},
    )


def _uri(writer: int, seq: int) -> str:
    return f"s3://bench-bucket/photos/w{writer:02d}/{seq:08d}.jpg"


def _writer(
    url: str,
    mode: str,
    writer: int,
    execution_id: str,
    capacity: int,
    start: Any,
    seconds: float,
    out: Any,
) -> None:
    store = Store(url, create=False)
    try:
        per = PER_TRANSACTION[mode]
        if mode == "record":
            store.add_items(execution_id, (_uri(writer, s) for s in range(capacity)))
        start.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        done = 0
        exhausted = False
        while time.perf_counter() < deadline:
            batch = [result(execution_id, done + k, _uri(writer, done + k)) for k in range(per)]
            if mode == "record":
                if done + per > capacity:
                    exhausted = True
                    break
                store.record_results(execution_id, batch)
            else:
                store.append_results(execution_id, batch)
            done += per
        out.put(
            {
                "writer": writer,
                "results": done,
                "s": time.perf_counter() - t0,
                "exhausted": exhausted,
            }
        )
    finally:
        store.close()


def _collect(out: Any, procs: list[Any], timeout_s: float) -> list[dict[str, Any]]:
    """Each writer's row; SystemExit at once when a writer died without one, or at the end
    of `timeout_s`."""
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(rows) < len(procs):
        try:
            rows.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(
                    f"store_writes: a writer process failed (exit codes {dead})"
                ) from None
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"store_writes: no result from a writer in {timeout_s:g} s"
                ) from None
    return rows


def cell(url: str, mode: str, writers: int, seconds: float, capacity: int) -> dict[str, Any]:
    """One measurement: `writers` processes writing for `seconds` in `mode`."""
    # spawn, not fork: a fork of a process with threads (a pytest-xdist worker's) can copy a
    # held lock and hang the writer (a CI run of 1e6a8eb waited 600 s for one).
    ctx = mp.get_context("spawn")
    store = Store(url)
    try:
        shared, _ = store.create_execution(params={"bench": mode}, model=MODEL, threshold=0.94)
        executions = [
            shared.id
            if mode == "append"
            else store.create_execution(
                params={"bench": mode, "writer": w}, model=MODEL, threshold=0.94
            )[0].id
            for w in range(writers)
        ]
    finally:
        store.close()
    start = ctx.Barrier(writers + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_writer,
            args=(url, mode, w, executions[w], capacity, start, seconds, out),
            daemon=True,
        )
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    start.wait(timeout=600)  # the writers have registered their items
    busy0 = _machine_busy_s()
    t0 = time.perf_counter()
    rows = _collect(out, procs, seconds + 600)
    wall = time.perf_counter() - t0
    busy1 = _machine_busy_s()
    for p in procs:
        p.join(timeout=30)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise SystemExit(f"store_writes: a writer process failed (exit codes {failed})")
    total = sum(r["results"] for r in rows)
    window = max(r["s"] for r in rows)
    # The writers' and the database server's CPU together: the whole machine's busy time.
    return {
        "mode": mode,
        "writers": writers,
        "results_per_transaction": PER_TRANSACTION[mode],
        "results": total,
        "window_s": round(window, 3),
        "results_per_s": round(total / window, 1),
        "per_writer_results_per_s": [round(r["results"] / r["s"], 1) for r in rows],
        "items_per_writer": capacity if mode == "record" else None,
        "exhausted": any(r["exhausted"] for r in rows),
        "machine_cores_busy": round((busy1 - busy0) / wall, 2),
        "wall_s": round(wall, 2),
    }


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (not idle or waiting), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _postgres_url(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("ICS_TEST_POSTGRES_URL"):
        return os.environ["ICS_TEST_POSTGRES_URL"]
    done = subprocess.run(
        [str(ROOT / "scripts" / "postgres.sh"), "url"], capture_output=True, text=True
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(
            "store_writes: no PostgreSQL URL: give --postgres-url, set ICS_TEST_POSTGRES_URL, "
            "or run scripts/postgres.sh start"
        )
    return done.stdout.strip()


class ScratchDatabase:
    """A fresh PostgreSQL database beside the one `url` names, dropped at the end."""

    def __init__(self, url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        self.base = make_url(url)
        self.name = f"ics_bench_store_{uuid.uuid4().hex[:8]}"
        self._dsn = self.base.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = self.base.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_writes")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--writers", default="1,4,16", help="writer counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="window per cell")
    parser.add_argument(
        "--items",
        type=int,
        default=24000,
        help="items the `record` writers of a cell register beforehand, shared out among them",
    )
    parser.add_argument("--postgres-url", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES] + [
        s for s in stores if s not in ("sqlite", "postgresql")
    ]
    if unknown:
        parser.error(f"unknown store or mode {unknown}: stores sqlite, postgresql; modes {MODES}")
    counts = [int(w) for w in args.writers.split(",")]

    started = time.gmtime()
    mach = machine()
    before = load_snapshot()
    doc: dict[str, Any] = {
        "run_id": run_id(started, mach),
        "benchmark": "store_writes",
        "command": "python -m benchmarks.store_writes " + " ".join(argv or sys.argv[1:]),
        "machine": mach,
        "load_before": before,
        "seconds_per_cell": args.seconds,
        "cells": [],
    }
    for kind in stores:
        scratch: ScratchDatabase | None = None
        with tempfile.TemporaryDirectory(prefix="ics-bench-store-") as tmp:
            if kind == "sqlite":
                url, version = f"sqlite:///{tmp}/store.db", _sqlite_version()
            else:
                scratch = ScratchDatabase(_postgres_url(args.postgres_url))
                url, version = scratch.url, _postgres_version(scratch.url)
            try:
                for mode in modes:
                    for writers in counts:
                        row = {"store": kind, "store_version": version}
                        row |= cell(url, mode, writers, args.seconds, -(-args.items // writers))
                        doc["cells"].append(row)
                        print(
                            f"{kind:10} {mode:6} {writers:3} writers: "
                            f"{row['results_per_s']:9.1f} results/s"
                            + (" (a writer ran out of items)" if row["exhausted"] else ""),
                            flush=True,
                        )
            finally:
                if scratch is not None:
                    scratch.drop()
    doc["load_after"] = load_snapshot()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"store_writes: {doc['run_id']} written to {args.out}")
    return 0


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def _postgres_version(url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar())
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
