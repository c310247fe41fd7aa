"""Resume's skip-by-URI lookup on a 1,000,000-item execution, before and after migration 6
(the index ix_ics_items_uri on (execution_id, uri)).

A SQLite store is built at schema version 5 (as an ICS without the index would), one
execution gets --items items through `Store.add_items`, and `Store.registered_uris` (what a
resume's listing calls for each chunk of listed URIs, engine/listing.py) is timed on
--lookups URIs, half of them registered; then the store is opened again with migration 6,
which builds the index, and the same lookups are timed again. Every timing is wall time,
best and all of --repeats runs, on the machine as it is (load before and after reported).

    python -m benchmarks.resume_index [--items N] [--lookups N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.run import machine
from ics_service.engine.listing import LOOKUP_CHUNK
from ics_service.store import Store, migrations
from ics_service.types import ModelRef

URI = "file:///data/photos/{:07d}.jpg"


def uris(n: int) -> Iterator[str]:
    return (URI.format(i) for i in range(n))


def store_at(url: str, version: int) -> Store:
    """The store at url, migrated only up to version (an ICS that ships no later one)."""
    shipped, latest = migrations.MIGRATIONS, migrations.LATEST
    migrations.MIGRATIONS = [(v, f) for v, f in shipped if v <= version]
    migrations.LATEST = version
    try:
        return Store(url)
    finally:
        migrations.MIGRATIONS, migrations.LATEST = shipped, latest


def timed_lookups(store: Store, execution_id: str, asked: list[str], repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        found: set[str] = set()
        for i in range(0, len(asked), LOOKUP_CHUNK):
            found |= store.registered_uris(execution_id, asked[i : i + LOOKUP_CHUNK])
        runs.append(time.perf_counter() - started)
        assert len(found) == len(asked) // 2, len(found)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="Write the results here too.")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rng = random.Random(17)
    registered = [URI.format(i) for i in rng.sample(range(args.items), args.lookups // 2)]
    absent = [URI.format(args.items + i) for i in range(args.lookups - len(registered))]
    asked = registered + absent
    rng.shuffle(asked)

    with tempfile.TemporaryDirectory(prefix="ics-resume-index-") as tmp:
        db = Path(tmp) / "ics.db"
        url = f"sqlite:///{db}"
        store = store_at(url, 5)
        try:
            execution, _ = store.create_execution(
                params={"sources": ["/data/photos"]}, model=ModelRef("m", "1"), threshold=0.94
            )
            started = time.perf_counter()
            store.add_items(execution.id, uris(args.items))
            fill_s = time.perf_counter() - started
            before = timed_lookups(store, execution.id, asked, args.repeats)
        finally:
            store.close()
        size_before = db.stat().st_size

        started = time.perf_counter()
        store = store_at(url, 6)
        migrate_s = time.perf_counter() - started
        try:
            assert store.schema_version() == 6
            after = timed_lookups(store, execution.id, asked, args.repeats)
        finally:
            store.close()
        size_after = db.stat().st_size

    result: dict[str, Any] = {
        "benchmark": "resume_index",
        "machine": machine(),
        "sqlite": sqlite3.sqlite_version,
        "items": args.items,
        "lookups": args.lookups,
        "registered_of_lookups": len(registered),
        "lookup_chunk": LOOKUP_CHUNK,
        "repeats": args.repeats,
        "fill_s": round(fill_s, 2),
        "before_index": {
            "schema_version": 5,
            "best_s": round(min(before), 4),
            "median_s": round(statistics.median(before), 4),
            "runs_s": [round(t, 4) for t in before],
        },
        "migration_6_s": round(migrate_s, 2),
        "after_index": {
            "schema_version": 6,
            "best_s": round(min(after), 4),
            "median_s": round(statistics.median(after), 4),
            "runs_s": [round(t, 4) for t in after],
        },
        "speedup_median": round(statistics.median(before) / statistics.median(after), 1),
        "db_bytes": {"before": size_before, "after": size_after},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
