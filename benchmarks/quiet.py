"""Was the machine quiet? The load average around each round, and other processes' CPU.

A benchmark on a shared machine measures the other work as much as the runner. Two signs
are recorded: the 1/5/15-min load average (and the usable CPU count) before and after every
round, and, for every run, how many cores processes outside the run's own process tree
(and outside this orchestrator) kept busy while it ran: benchmarks.measure reads every
process's CPU time from /proc when it lists the run's tree, about every 0.3 s. Processes
that start and end between two scans are missed, so the figure is a lower bound; it never
counts the run's own short-lived processes (Ray's workers) as other work, which the
machine-wide /proc/stat minus a sampled tree would.

Only the load average before the first round says something about other work: from the
second round on, it is mostly the harness's own earlier runs. So a run is busy when the load
average before the first round exceeds `busy_load` per core, and each measured run is busy
when other processes used more than `busy_others` cores on average during it.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from .common import cpus


def load_snapshot() -> dict[str, Any]:
    """The load average (1, 5, 15 min) and the usable CPU count, now."""
    return {
        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load": [round(x, 2) for x in os.getloadavg()],
        "cpus": cpus(),
    }


def busy_at_start(snapshot: dict[str, Any], busy_load: float) -> bool:
    """The 1-min load average before the first round exceeds busy_load per core."""
    return bool(snapshot["load"][0] > busy_load * snapshot["cpus"])


def busy_run(others_cores: float | None, busy_others: float) -> bool:
    """Other processes used more than busy_others cores, on average, during a run."""
    return others_cores is not None and others_cores > busy_others
