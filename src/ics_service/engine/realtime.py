"""The real-time execution: the results of `ics serve`'s requests, recorded as the items of
one execution per UTC day (`realtime-YYYY-MM-DD`), which the server's lifecycle keeps alive
by heartbeats and ends when the day (or the server) ends.

Several servers (replicas on one store) share the day's execution: its name is unique, so
they find the same one; each appends its results under the execution's row lock, so item ids
never collide; each write and idle heartbeat claims it, so that a replica that stops ends it
only when no other has written or beaten since (the others claim it RUNNING again otherwise).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from concurrent.futures import Future

from ..errors import UsageError
from ..store import Store
from ..types import Execution, ExecutionStatus, ItemResult, ModelRef, utcnow
from .execution import REALTIME_PREFIX
from .lifecycle import HEARTBEAT_SECONDS, is_orphaned, owner_id
from .recording import take_waiting

log = logging.getLogger(__name__)

#: Real-time results of one UTC day are the items of the execution named REALTIME_PREFIX
#: and the day, with this parameter set (which no client can set).
REALTIME = "realtime"


def is_realtime(execution: Execution) -> bool:
    return execution.params.get(REALTIME) is True


class RealtimeLog:
    """Records real-time results as items of one execution per UTC day, named
    `realtime-YYYY-MM-DD`, in coalesced transactions on a thread of its own.

    A request is answered once its result is in the store.
    """

    def __init__(self, store: Store, model: ModelRef, owner: str | None = None) -> None:
        self.store = store
        self.model = model
        #: This process among those sharing the store (its replica id).
        self.owner = owner or owner_id()
        self._day: str | None = None
        self._execution_id = ""
        self._q: queue.Queue[tuple[ItemResult, Future[None]] | None] = queue.Queue()
        self._end_orphaned_days()
        self._thread = threading.Thread(target=self._loop, name="ics-realtime-log", daemon=True)
        self._thread.start()

    def _end_orphaned_days(self) -> None:
        """End the real-time executions a dead server left RUNNING (today's is taken over
        at the first request)."""
        today = REALTIME_PREFIX + utcnow().strftime("%Y-%m-%d")
        for e in self.store.list_executions(limit=1000, status=ExecutionStatus.RUNNING):
            if is_realtime(e) and e.name != today and is_orphaned(e):
                self.store.finish_execution(e.id, ExecutionStatus.SUCCEEDED)

    def append(self, result: ItemResult) -> Future[None]:
        done: Future[None] = Future()
        self._q.put((result, done))
        return done

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                self._idle()
                continue
            if first is None:
                break
            waiting, closing = take_waiting(self._q)
            self._write([first, *waiting])
            if closing:
                break
        self._end_day()

    def _idle(self) -> None:
        """Say the day's execution is alive (others must not take it for orphaned), and end
        it once the day is over."""
        if self._day is None:
            return
        try:
            if utcnow().strftime("%Y-%m-%d") != self._day:
                self._end_day()
            else:
                self.store.claim(self._execution_id, self.owner)
        except Exception as e:
            log.warning("real-time execution %s: %s", self._execution_id, e)

    def _write(self, batch: list[tuple[ItemResult, Future[None]]]) -> None:
        # A request may have given up (a timeout) and cancelled its future meanwhile.
        live = [(r, done) for r, done in batch if done.set_running_or_notify_cancel()]
        try:
            execution_id = self._execution_for(utcnow())
            results = [r for r, _ in batch]
            for r in results:
                r.execution_id = execution_id
            self.store.append_results(execution_id, results)
            self.store.claim(execution_id, self.owner)
        except Exception as e:
            log.error("recording %d real-time results failed: %s", len(batch), e)
            for _, done in live:
                done.set_exception(e)
            return
        for _, done in live:
            done.set_result(None)

    def _execution_for(self, now: dt.datetime) -> str:
        day = now.strftime("%Y-%m-%d")
        if day == self._day:
            return self._execution_id
        self._end_day()
        name = REALTIME_PREFIX + day
        execution, _ = self.store.create_execution(
            params={"sources": [], REALTIME: True, "tolerated_failure_percentage": 100.0},
            model=self.model,
            threshold=0.0,
            name=name,
        )
        if not is_realtime(execution):
            raise UsageError(
                f"the execution named {name} ({execution.id}) is not a real-time one: rename it"
            )
        self.store.claim(execution.id, self.owner)
        self.store.mark_listed(execution.id)
        self._day, self._execution_id = day, execution.id
        return execution.id

    def _end_day(self) -> None:
        """A day's execution ends SUCCEEDED when the day (or the server) ends: at the first
        idle moment (a few seconds) or request after midnight UTC."""
        if self._day is None:
            return
        try:
            # Another replica that wrote or beat since holds it: that one ends it.
            if self.store.get_execution(self._execution_id).owner == self.owner:
                self.store.finish_execution(self._execution_id, ExecutionStatus.SUCCEEDED)
        except Exception as e:
            log.error("could not end the real-time execution %s: %s", self._execution_id, e)
        self._day = None
