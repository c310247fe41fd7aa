"""How long this process has run: `ics classify` reports its time to first result with it."""

from __future__ import annotations

import os
import time

#: When ICS was imported: the fallback where the process's own start time cannot be read.
_IMPORTED = time.monotonic()


def process_age_s() -> float:
    """Seconds since this process started, interpreter start-up included.

    On Linux, from the start time in /proc (in clock ticks: 10 ms steps); elsewhere, since
    the ics_service package was imported.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # Fields after the command name (which may hold spaces and ')'): starttime is the
        # 22nd field of the line, the 20th after the name.
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(0.0, since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED
