"""A command's start-up: how long the process has run (`ics classify` reports its time to
first result with it), and the garbage collector kept out of the start-up's way."""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import time
from typing import NoReturn

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


#: Seconds from a command's start during which the cyclic garbage collector does not run.
GC_PAUSE_S = 1.0


def pause_gc(seconds: float = GC_PAUSE_S) -> None:
    """No cyclic garbage collection for the first `seconds` of the process, nor at its exit.

    Start-up creates some hundred thousand objects that live as long as the process
    (modules, SQLAlchemy's and pydantic's classes), and the collector scanned them again and
    again: measured, about 60 ms of a one-image `ics classify`, and some 100 ms more for the
    collections of the interpreter's exit. After `seconds` the collector runs again for what
    the command does next, with the objects alive then frozen (never scanned again).
    """
    gc.disable()
    timer = threading.Timer(seconds, _resume_gc)
    timer.daemon = True  # a command that ends sooner does not wait for it
    timer.start()
    atexit.register(_no_gc_at_exit)


def _resume_gc() -> None:
    gc.freeze()
    gc.enable()


def _no_gc_at_exit() -> None:
    # What the collector would free at exit, the process's end frees. Python never promised
    # to run the finalizers of objects still alive at exit, and ICS closes its files, stores
    # and sessions itself.
    gc.disable()
    gc.freeze()


#: Set by a command whose every file, store and session is closed when it exits (see
#: `end_process`): `ics classify` once its run is recorded and its summary printed.
_closed_for_exit = False


def closed_for_exit() -> None:
    """Say that this command has closed everything it opened: its exit may skip the
    interpreter's teardown (`end_process`)."""
    global _closed_for_exit
    _closed_for_exit = True


def end_process(code: int) -> NoReturn:
    """Exit with `code`; after `closed_for_exit`, without the interpreter's teardown.

    Python's own exit ends by finalizing every module and object of the process
    (SQLAlchemy's, pydantic's, numpy's, onnxruntime's): measured, some 30 to 70 ms after a
    one-image `ics classify` has printed its summary, for memory that the process's end
    frees anyway. Everything before that teardown still happens: the exit handlers run
    (logging's flush, a coverage tool's), stdout and stderr are flushed; and a process with
    a non-daemon thread still running, or a stream that cannot be flushed, exits the
    ordinary way (which waits for the thread, and reports the stream).
    """
    main = threading.main_thread()
    busy = any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())
    if not _closed_for_exit or busy:
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before its teardown
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)
