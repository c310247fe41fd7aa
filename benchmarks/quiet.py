"""Was the machine quiet? The load average around each round, and other processes' CPU.

A benchmark on a shared machine measures the other work as much as the runner. Two signs
are recorded: the 1/5/15-min load average (and the usable CPU count) before and after every
round, and, for every run, how many cores processes outside the run's own process tree kept
busy while it ran (the machine's busy time from /proc/stat, minus the run's process tree,
minus this orchestrator).

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

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def load_snapshot() -> dict[str, Any]:
    """The load average (1, 5, 15 min) and the usable CPU count, now."""
    return {
        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load": [round(x, 2) for x in os.getloadavg()],
        "cpus": cpus(),
    }


def _system_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux; None elsewhere)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    # user nice system idle iowait irq softirq steal: steal counts as busy, since on a
    # shared virtual machine it is time another guest took from this one.
    ticks = [int(x) for x in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OthersClock:
    """Started before a run; tells how many cores other processes used during it."""

    def __init__(self) -> None:
        self.system0 = _system_busy_s()
        self.own0 = _own_cpu_s()

    def elapsed(self) -> tuple[float, float] | None:
        """(machine busy seconds, this process's CPU seconds) since the start."""
        system = _system_busy_s()
        if system is None or self.system0 is None:
            return None
        return system - self.system0, _own_cpu_s() - self.own0

    @staticmethod
    def cores(
        elapsed: tuple[float, float] | None, tree_cpu_s: float, wall_s: float
    ) -> float | None:
        """Average cores busy outside the run's tree and this orchestrator, over wall_s."""
        if elapsed is None or wall_s <= 0:
            return None
        system, own = elapsed
        # The tree's CPU time is sampled, so it can run a tick ahead of /proc/stat: clamp.
        return round(max(0.0, system - own - tree_cpu_s) / wall_s, 3)


def busy_at_start(snapshot: dict[str, Any], busy_load: float) -> bool:
    """The 1-min load average before the first round exceeds busy_load per core."""
    return bool(snapshot["load"][0] > busy_load * snapshot["cpus"])


def busy_run(others_cores: float | None, busy_others: float) -> bool:
    """Other processes used more than busy_others cores, on average, during a run."""
    return others_cores is not None and others_cores > busy_others
