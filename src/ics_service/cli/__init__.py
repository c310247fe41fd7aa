"""The `ics` command. Each command group lives in its own module and registers on `main`."""

from . import alerts, classify, config, executions, models, serve  # noqa: F401  (registers the commands)
from .app import main, run

__all__ = ["main", "run"]
