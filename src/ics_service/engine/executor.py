"""The executor contract: what runs an execution's items once the runner has them.

`ExecutionRunner.run` lists and registers items, then hands them to an executor, which
calls `emit` with each finished batch of results; the runner's one recorder takes them
from there (store, results file, alerts outbox, capture, progress). Two executors exist:

- `local`: `Pipeline` (pipeline.py), in this process;
- `ray`: `RayExecutor` (ray_executor.py), Ray actors on a Ray cluster, each running its
  own `Pipeline` on chunks of item URIs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from ..config import Settings
from ..errors import UsageError, install_hint
from ..types import Item
from .pipeline import Emit, Pipeline


class Executor(Protocol):
    def run(self, items: Iterable[Item], emit: Emit, stop: threading.Event | None = None) -> None:
        """Process every item (until `stop` is set), calling `emit` with finished batches;
        an item left without a result (stopped first) stays pending, for a resume."""
        ...


def check_executor(settings: Settings) -> None:
    """Refuse, before anything is done, an executor whose package is not installed."""
    if settings.executor != "ray":
        return
    try:  # imported now, not only found: the run imports it next anyway
        import ray  # noqa: F401
    except ImportError:
        raise UsageError(
            f"executor 'ray' needs Ray, which is not installed: {install_hint('ray')}"
        ) from None


def executor_for(settings: Settings, pipeline: Pipeline, resolve: Callable[[str], str]) -> Executor:
    """The executor of `settings.executor`. `pipeline` is the local one (the Ray executor
    takes its settings, history and capture from it); `resolve` gives the URI with
    credentials of a stored URI (see ExecutionRunner._redacted)."""
    if settings.executor == "local":
        return pipeline
    check_executor(settings)
    from .ray_executor import RayExecutor

    return RayExecutor(settings=settings, pipeline=pipeline, resolve=resolve)
