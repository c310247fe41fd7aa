"""The `ics` command. Each command group lives in its own module and registers on `main`."""

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
