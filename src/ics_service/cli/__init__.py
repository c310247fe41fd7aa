"""The `ics` command. Each command group lives in its own module and registers on `main`."""

import gc
import os

# ICS uses no pydantic plugin, and looking for them reads the metadata of every installed
# package: some 30 ms of every command. PYDANTIC_DISABLE_PLUGINS set in the environment
# (even empty: look for them all) decides instead.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

# Importing the commands creates long-lived objects only (classes, models, tables): the
# collector would scan them for nothing (some 10 ms). Left as it was found afterwards;
# `run()` pauses it for the rest of an `ics` process's start-up (see startup.pause_gc).
_collecting = gc.isenabled()
gc.disable()
try:
    from . import (  # noqa: F401  (registers the commands)
        alerts,
        capture,
        classify,
        config,
        executions,
        models,
        report,
        review,
        serve,
        watch,
    )
    from .app import main, run
finally:
    if _collecting:
        gc.enable()

__all__ = ["main", "run"]
