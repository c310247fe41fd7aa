"""SIGINT and SIGTERM at any moment of a command: exit 130, and an execution ends ABORTED.

Until an execution exists, a signal raises `Interrupted` at once (there is nothing to
record). From `cooperate()` on, it only sets the `stop` event: listing, registering and
the pipeline check it, finished items are recorded and the execution ends ABORTED. A
second signal while stopping is acknowledged, never a crash; a third stops at once (the
execution is still recorded ABORTED, and items in flight stay pending for a resume).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

from ..errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalGuard:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received = 0
        self._cooperative = False

    def cooperate(self) -> threading.Event:
        """From now on a signal only sets (and this returns) the stop event."""
        self._cooperative = True
        if self.received:
            raise Interrupted("stopped by a signal before the execution started")
        return self.stop

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received += 1
        self.stop.set()
        if not self._cooperative or self.received >= 3:
            raise Interrupted(f"stopped by {name}")
        if self.received == 1:
            click.echo(f"\n{name}: stopping; finished items are kept", err=True)
        else:
            click.echo(
                f"{name}: already stopping, recording finished items; a third signal stops at once",
                err=True,
            )


@contextmanager
def guarded() -> Iterator[SignalGuard]:
    """Handle SIGINT and SIGTERM for the block (in the main thread; elsewhere, do nothing)."""
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {s: signal.signal(s, guard.handle) for s in SIGNALS}
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
