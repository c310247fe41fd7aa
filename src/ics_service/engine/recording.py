"""Recording results: the sinks every finished batch goes to, and the history it implies.

Sinks run on the recorder's own thread, off the inference path; the store sink comes
first, so a result is in the store before it is anywhere else.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..types import ItemResult, ItemStatus, Step

if TYPE_CHECKING:  # annotations only: importing the engine leaves SQLAlchemy unimported
    from ..store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")


class ResultSink(Protocol):
    """Receives every finished batch of results (the store, a results file...)."""

    def write(self, results: Sequence[ItemResult]) -> None: ...

    def close(self) -> None: ...


class History:
    """Buffers history events from any thread; written with the next batch of results."""

    def __init__(self, store: Store, execution_id: str, *, full: bool) -> None:
        self.store = store
        self.execution_id = execution_id
        self.full = full
        self._lock = threading.Lock()
        self._pending: list[tuple[str, int | None, dict[str, Any] | None]] = []

    def add(self, etype: str, seq: int | None, details: dict[str, Any] | None) -> None:
        with self._lock:
            self._pending.append((etype, seq, details))

    def add_results(self, results: Sequence[ItemResult]) -> None:
        for r in results:
            seq = int(r.item_id)
            if self.full:
                self.add("MapIterationStarted", seq, {"uri": r.uri})
                for step in (
                    Step.SERIALIZE_IMAGE_DATA,
                    Step.CLASSIFY_IMAGE,
                    Step.FILTER_LOW_CONFIDENCE,
                ):
                    if step is Step.CLASSIFY_IMAGE and r.label is None:
                        break
                    self.add("TaskStateEntered", seq, {"step": step.value})
                    self.add("TaskStateExited", seq, {"step": step.value})
            if r.status is ItemStatus.SUCCEEDED:
                if self.full:
                    self.add("MapIterationSucceeded", seq, {"label": r.label})
                continue
            details: dict[str, Any] = {"uri": r.uri, "status": r.status.value}
            if r.error is not None:
                details.update(error=r.error.type, cause=r.error.message)
            else:
                details.update(error="LowConfidence", confidence=r.confidence, label=r.label)
            self.add("MapIterationFailed", seq, details)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            self.store.append_events(self.execution_id, pending)


@dataclass
class StoreSink:
    """Records results (once each) and the history they imply, in the store."""

    store: Store
    execution_id: str
    history: History

    def write(self, results: Sequence[ItemResult]) -> None:
        self.store.record_results(self.execution_id, results)
        self.history.add_results(results)
        self.history.flush()

    def close(self) -> None:
        self.history.flush()


def take_waiting(q: queue.Queue[T | None]) -> tuple[list[T], bool]:
    """What waits in q, without blocking, up to its None sentinel: (items, whether a None
    was taken). Lets a writer coalesce what queued up meanwhile into one transaction."""
    items: list[T] = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return items, False
        if item is None:
            return items, True
        items.append(item)


class Recorder:
    """Hands finished batches to the sinks on its own thread, off the inference path."""

    def __init__(self, sinks: Sequence[ResultSink], on_error: Callable[[BaseException], None]):
        self.sinks = sinks
        self.on_error = on_error
        self.q: queue.Queue[list[ItemResult] | None] = queue.Queue(maxsize=256)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ics-recorder", daemon=True)
        self.thread.start()

    def put(self, results: list[ItemResult]) -> None:
        if self.error is None:
            self.q.put(results)

    def _loop(self) -> None:
        while (batch := self.q.get()) is not None:
            if self.error is not None:
                continue
            # Coalesce what is waiting into one write (one store transaction).
            waiting, closing = take_waiting(self.q)
            for more in waiting:
                batch.extend(more)
            if closing:
                self.q.put(None)  # seen by the loop's next get
            try:
                for sink in self.sinks:
                    sink.write(batch)
            except BaseException as e:
                log.exception("recording results failed")
                self.error = e
                self.on_error(e)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
