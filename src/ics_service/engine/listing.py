"""Registering an execution's items while it already runs: a prefix with a million keys
starts classifying once its first chunk is in the store, not once all of it is.

The listing thread writes items in seq order, a chunk per transaction, and marks the
execution listed at the end; the run reads pending items behind it (`tail_pending`). A
crash in between leaves the execution not listed with some of its items registered, which
a resume completes by listing again and registering only the URIs not registered yet
(`unregistered`): objects added or deleted meanwhile shift nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..sources import Duplicates
from ..types import Item

if TYPE_CHECKING:  # annotations only: importing the engine leaves SQLAlchemy unimported
    from ..store import Store

log = logging.getLogger(__name__)

#: How long the run waits for the listing before it asks the store again.
POLL_SECONDS = 0.05
#: URIs looked up in the store at once by `unregistered` (there is no index on uri: each
#: lookup reads the execution's items, so few large lookups beat many small ones).
LOOKUP_CHUNK = 5000

Listed = Iterator[tuple[str, dict[str, Any] | None]]


class BackgroundListing:
    """Registers the rest of a listing in a thread; `error` holds what ended it early."""

    def __init__(
        self,
        store: Store,
        execution_id: str,
        items: Listed,
        *,
        start_seq: int = 0,
        halt: threading.Event | None = None,
        duplicates: Duplicates | None = None,
    ) -> None:
        self.store = store
        self.execution_id = execution_id
        self._items = items
        self.start_seq = start_seq
        #: The listing's count of items named twice (`sources.expand_items`), if it keeps one.
        self.duplicates = duplicates
        self.error: BaseException | None = None
        #: Every item registered and the execution marked listed.
        self.complete = False
        #: Items listed so far (from start_seq on), for a progress bar's growing total.
        self.listed = 0
        self.done = threading.Event()
        #: Set by the run when it stops for good: the listing stops at its next item (give
        #: the same event to `sources.expand_items(stopped=halt.is_set)` for it to stop at
        #: the next key listed, kept or not).
        self.halt = halt or threading.Event()
        self._thread = threading.Thread(target=self._run, name="ics-listing", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self.store.add_items(self.execution_id, self._until_halted(), start_seq=self.start_seq)
            if not self.halt.is_set():
                if self.duplicates is not None and self.duplicates.count:
                    details = {"duplicates": self.duplicates.count}
                    self.store.append_events(
                        self.execution_id, [("DuplicatesDropped", None, details)]
                    )
                self.store.mark_listed(self.execution_id)
                self.complete = True
        except BaseException as e:  # the run raises it (an Interrupted or a UsageError)
            self.error = e
        finally:
            self.done.set()

    def _until_halted(self) -> Listed:
        for entry in self._items:
            if self.halt.is_set():
                return
            self.listed += 1
            yield entry

    @property
    def total(self) -> int:
        """The execution's items known so far: those registered before, and those listed."""
        return self.start_seq + self.listed

    def wait(self) -> None:
        """Until the listing has ended (a signal may interrupt the wait)."""
        while not self.done.wait(0.5):
            pass
        self._thread.join()

    def discard(self) -> None:
        """Drop a listing that will never run (its execution ended first): the listing
        generator is closed, and with it a manifest it has open."""
        close = getattr(self._items, "close", None)
        if close is not None and not self._thread.is_alive():
            close()

    def stop(self, timeout: float) -> None:
        """Halt the listing and wait for it (at most timeout seconds), so that it registers
        nothing after the execution's end is recorded."""
        self.halt.set()
        if self._thread.is_alive() and not self.done.wait(timeout):
            log.warning(
                "execution %s: the listing did not stop within %g s",
                self.execution_id,
                timeout,
                extra={"execution_id": self.execution_id},
            )


def unregistered(store: Store, execution_id: str, items: Listed) -> Listed:
    """The listed items whose URI the execution has not registered yet (a resume's listing
    after a crash), looked up in the store a chunk at a time."""
    chunk: list[tuple[str, dict[str, Any] | None]] = []
    for entry in items:
        chunk.append(entry)
        if len(chunk) >= LOOKUP_CHUNK:
            yield from _new(store, execution_id, chunk)
            chunk = []
    yield from _new(store, execution_id, chunk)


def _new(store: Store, execution_id: str, chunk: list[tuple[str, dict[str, Any] | None]]) -> Listed:
    if not chunk:
        return
    known = store.registered_uris(execution_id, [uri for uri, _ in chunk])
    for uri, meta in chunk:
        if uri not in known:
            yield uri, meta


def tail_pending(
    store: Store, execution_id: str, listing: BackgroundListing, stop: threading.Event
) -> Iterator[Item]:
    """The execution's pending items in seq order, following the listing as it registers
    them, until it has ended (or the run stops)."""
    after = -1
    while not stop.is_set():
        finished = listing.done.is_set()  # read before the query: nothing is missed
        got = False
        for item in store.pending_items(execution_id, after=after):
            got = True
            after = item.seq
            yield item
        if finished:
            return
        if not got:
            listing.done.wait(POLL_SECONDS)
