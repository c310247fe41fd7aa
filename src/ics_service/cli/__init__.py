"""The `ics` command. Each command group lives in its own module and registers on `main`."""

import os

# ICS uses no pydantic plugin, and looking for them reads the metadata of every installed
# package: some 30 ms of every command. PYDANTIC_DISABLE_PLUGINS set in the environment
# (even empty: look for them all) decides instead.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from . import (  # noqa: F401  (registers the commands)
    alerts,
    capture,
    classify,
    config,
    executions,
    models,
    report,
    serve,
    watch,
)
from .app import main, run

__all__ = ["main", "run"]
