"""Watching sources for new objects, classified in micro-batches, each object exactly once.

The watcher is a new place items come from, not a new engine: a micro-batch is an ordinary
execution (named `watch-NAME-N`) that ExecutionRunner runs. What the watcher adds is
finding new objects (a `Feed` per source, in feeds.py) once each is complete, grouping them
(at most watch_max_items, waiting at most watch_max_wait_s) and registering them through
the store's watch state (store/watched.py), which makes "seen" and "registered" one
transaction. `POST /v1/events` registers the objects an S3 event names through
`start_batch` too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from .. import sources
from ..errors import UsageError
from ..sources.remote import S3_PROTOCOLS
from ..store.watched import Seen, WatchState
from ..types import ErrorInfo, Execution, ExecutionStatus
from .execution import ExecutionRunner, execution_params, settings_for
from .feeds import RESCAN_S, SETTLE_CHECK_S, Feed, S3Feed
from .lifecycle import HEARTBEAT_SECONDS, STALE_AFTER_SECONDS, is_orphaned, record_end
from .recording import ResultSink

log = logging.getLogger(__name__)

#: The longest part of a watcher name taken from its sources.
_NAME_PART = 40
#: Objects found by a poll looked up in the watch state at a time (between stop checks).
_LOOKUP_SLICE = 5000


def default_name(specs: Sequence[str]) -> str:
    """A watcher name for these sources: readable, and the same on every start."""
    canonical = sorted(_canonical(s) for s in specs)
    digest = hashlib.sha256("\n".join(canonical).encode("utf-8", "surrogateescape")).hexdigest()
    base = os.path.basename(canonical[0].rstrip("/")) or "root"
    base = re.sub(r"[^A-Za-z0-9_.]+", "_", base).strip("_.")[:_NAME_PART] or "watch"
    return f"{base}-{digest[:8]}"


def _canonical(spec: str) -> str:
    """The source as one string however it is written (`S3://b/p` is `s3://b/p/`)."""
    if sources.scheme_of(spec) in S3_PROTOCOLS:
        return S3Feed(spec, settle_s=0.0, poll_s=0.0).uri
    if sources.scheme_of(spec) == "file":
        return os.path.abspath(os.path.expanduser(sources.uri_to_path(spec)))
    return spec


def check_watcher_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", name):
        raise UsageError(
            f"bad watcher name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 200, starting with a letter or digit)"
        )


def start_batch(
    runner: ExecutionRunner, state: WatchState, objects: Sequence[Seen], specs: Sequence[str]
) -> Execution | None:
    """Register the objects not registered yet as one new micro-batch execution, claimed
    by the runner's process; None when there are none."""
    s = runner.settings
    return state.register(
        objects,
        params=execution_params(s, list(specs), watcher=state.watcher),
        model=runner.model_ref,
        threshold=s.threshold,
        owner=runner.owner,
    )


#: Called after each micro-batch with its execution and whether it was a resumed one.
OnBatch = Callable[[Execution, bool], None]


class WatcherPresence:
    """Records in the store that process `owner` runs the watcher, with a heartbeat every
    HEARTBEAT_SECONDS, until closed: `ics watch forget` refuses meanwhile."""

    def __init__(self, state: WatchState, owner: str) -> None:
        self.state = state
        self.owner = owner
        state.attach(owner)
        self._done = threading.Event()
        self._heart = threading.Thread(target=self._beat, name="ics-watch-beat", daemon=True)
        self._heart.start()

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_SECONDS):
            try:
                self.state.beat(self.owner)
            except Exception as e:  # a busy store must not stop the watcher
                log.warning("watcher %s: heartbeat failed: %s", self.state.watcher, e)

    def close(self) -> None:
        self._done.set()
        self._heart.join()
        try:
            self.state.detach(self.owner)
        except Exception as e:  # the store is gone: the heartbeat goes stale instead
            log.warning("watcher %s: could not record that it stopped: %s", self.state.watcher, e)


class Watcher:
    """Micro-batches of new objects from some feeds, each run as an execution."""

    def __init__(
        self,
        runner: ExecutionRunner,
        name: str,
        feeds: Sequence[Feed],
        *,
        sinks: Callable[[Execution], list[ResultSink]] = lambda _e: [],
        on_batch: OnBatch = lambda _e, _r: None,
    ) -> None:
        self.runner = runner
        self.name = name
        self.feeds = list(feeds)
        self.state = WatchState(runner.store, name)
        self._sinks = sinks
        self._on_batch = on_batch
        self.executions: list[Execution] = []

    def recover(self, stop: threading.Event, *, starting: bool = False) -> None:
        """Finish the micro-batches left with items to run: killed, stopped by a signal,
        or ended FAILED by an error (a full disk); not those cancelled by request.

        `starting`: this process has run nothing yet, so a batch RUNNING under its own
        owner id (a container restarted as the same host and PID) is a dead process's."""
        for execution in self.state.unfinished():
            if stop.is_set():
                return
            own = starting and execution.owner == self.runner.owner
            if (
                execution.status is ExecutionStatus.RUNNING
                and not own
                and not is_orphaned(execution)
            ):
                # Another process runs it (a server resuming orphans, or a second watcher
                # of this name: the state's keys keep even two of them exactly once).
                log.info(
                    "watcher %s: %s is being run by %s",
                    self.name,
                    execution.name,
                    execution.owner,
                    extra={"execution_id": execution.id},
                )
                continue
            if execution.cancel_requested:
                # Its process died before it saw the cancel: end it as the cancel would have.
                record_end(
                    self.runner.store,
                    execution.id,
                    ExecutionStatus.ABORTED,
                    ErrorInfo("States.Aborted", "cancelled by request; its process had gone"),
                )
                continue
            log.warning(
                "watcher %s: resuming %s (%s), left %s by an earlier run",
                self.name,
                execution.name,
                execution.id,
                execution.status.value,
                extra={"execution_id": execution.id},
            )
            try:
                runner = self._runner_for(execution)
            except UsageError as e:  # its model was removed, or cannot be opened now
                log.warning("watcher %s: cannot resume %s: %s", self.name, execution.name, e)
                continue
            try:
                self._resume(execution, runner, stop, own=own)
            finally:
                if runner.runtime is not self.runner.runtime:  # opened for this batch
                    close = getattr(runner.runtime, "close", None)
                    if close is not None:
                        close()

    def _resume(
        self, execution: Execution, runner: ExecutionRunner, stop: threading.Event, *, own: bool
    ) -> None:
        try:
            if own and execution.status is ExecutionStatus.RUNNING:
                taken = self._take_own(execution)
                if taken is None:
                    return
                execution = taken
            else:
                execution = runner.prepare_resume(execution.id)
        except UsageError as e:  # nothing left to run in it, or taken meanwhile
            log.warning("watcher %s: %s", self.name, e)
            return
        self._run(execution, stop, resumed=True, runner=runner)

    def _take_own(self, execution: Execution) -> Execution | None:
        """Claim a batch left RUNNING under this process's own owner id, as prepare_resume
        claims an orphan (which it is, though is_orphaned cannot tell)."""
        store = self.runner.store
        if not store.take_over(
            execution.id,
            self.runner.owner,
            expected_owner=execution.owner,
            expected_heartbeat=execution.heartbeat_at,
        ):
            return None
        resumed = ("ExecutionResumed", None, {"owner": self.runner.owner})
        store.append_events(execution.id, [resumed])
        return store.get_execution(execution.id)

    def _runner_for(self, execution: Execution) -> ExecutionRunner:
        """A runner with the settings the execution was started with (model, threshold,
        tolerated failures...), as `ics executions resume` runs it."""
        settings = settings_for(execution, self.runner.settings)
        if settings == self.runner.settings:
            return self.runner
        runtime = self.runner.runtime
        if settings.model != self.runner.settings.model:
            from ..models import get_card, load_runtime
            from ..models.device import device_for
            from ..models.remote import RemoteOptions
            from .pipeline import plan_inference

            threads, _ = plan_inference(settings.inference_threads, settings.inference_workers)
            card = get_card(settings.model, settings)
            runtime = load_runtime(
                card,
                settings.models_dir,
                threads=threads,
                device=device_for(card.kind, card.name, settings.device),
                remote=RemoteOptions.of(settings),
            )
        return ExecutionRunner(settings, self.runner.store, runtime)

    def run(self, stop: threading.Event, *, once: bool = False) -> list[Execution]:
        """Watch until `stop` is set (or, with `once`, until every object found so far is
        complete and classified); returns the micro-batch executions run."""
        wake = threading.Event()
        started: list[Feed] = []
        presence = WatcherPresence(self.state, self.runner.owner)
        try:
            for feed in self.feeds:
                feed.start(wake.set)
                started.append(feed)
            self.recover(stop, starting=True)
            recovered = time.monotonic()
            # Objects waiting for their micro-batch, with when each was found: the oldest
            # one's wait is what --max-wait bounds.
            waiting: list[tuple[Seen, float]] = []
            while not stop.is_set():
                if time.monotonic() - recovered >= STALE_AFTER_SECONDS:
                    # Batches that another watcher of this name left when it died.
                    self.recover(stop)
                    recovered = time.monotonic()
                for part in self._fresh([w for w, _ in waiting], stop):
                    # A huge first poll: micro-batches start as its slices are looked up.
                    now = time.monotonic()
                    waiting = self._flush([*waiting, *((w, now) for w in part)], stop)
                unsettled = sum(f.unsettled() for f in self.feeds)
                waiting = self._flush(waiting, stop, drain=once and not unsettled)
                if once and not waiting and not unsettled:
                    break
                # Never past the next look for batches that a dead watcher left.
                until_recovery = recovered + STALE_AFTER_SECONDS - time.monotonic()
                _wait(wake, stop, min(self._tick(bool(waiting or unsettled)), until_recovery))
        finally:
            for feed in started:
                feed.close()
            presence.close()
        return self.executions

    def _fresh(self, waiting: Iterable[Seen], stop: threading.Event) -> Iterator[list[Seen]]:
        """What the feeds found that is neither registered nor waiting, a slice at a time
        (a stop is not kept waiting by the lookups of a huge first poll)."""
        found = list(dict.fromkeys(seen for feed in self.feeds for seen in feed.poll(stop)))
        skip = set(waiting)
        for i in range(0, len(found), _LOOKUP_SLICE):
            if stop.is_set():
                return  # not looked up: the next start finds them again
            part = found[i : i + _LOOKUP_SLICE]
            known = self.state.known(part)
            yield [seen for seen in part if seen not in known and seen not in skip]

    def _flush(
        self, waiting: list[tuple[Seen, float]], stop: threading.Event, *, drain: bool = False
    ) -> list[tuple[Seen, float]]:
        """Start the micro-batches due (full, or the oldest waited --max-wait; with
        `drain`, all); returns what still waits."""
        s = self.runner.settings
        while waiting and not stop.is_set():
            full = len(waiting) >= s.watch_max_items
            due = time.monotonic() - waiting[0][1] >= s.watch_max_wait_s
            if not (full or due or drain):
                break
            batch, waiting = waiting[: s.watch_max_items], waiting[s.watch_max_items :]
            self._start([seen for seen, _ in batch], stop)
        return waiting

    def _tick(self, busy: bool) -> float:
        s = self.runner.settings
        if busy:
            return min(SETTLE_CHECK_S, max(s.watch_max_wait_s, 0.05))
        polling = any(getattr(f, "polling", True) for f in self.feeds)
        return s.watch_poll_interval_s if polling else RESCAN_S

    def _start(self, batch: Sequence[Seen], stop: threading.Event) -> None:
        execution = start_batch(self.runner, self.state, batch, [f.spec for f in self.feeds])
        if execution is not None:
            self._run(execution, stop, resumed=False)

    def _run(
        self,
        execution: Execution,
        stop: threading.Event,
        *,
        resumed: bool,
        runner: ExecutionRunner | None = None,
    ) -> None:
        runner = runner or self.runner
        # What escapes (a lost store, a full disk) is recorded on the execution and ends the
        # watcher: the next start resumes the micro-batch.
        with runner.ending_on_error(execution.id):
            sinks = self._sinks(execution)
        with _linked(stop) as batch_stop:
            finished = runner.run(execution, sinks=sinks, stop=batch_stop)
        self.executions.append(finished)
        self._on_batch(finished, resumed)


def _wait(wake: threading.Event, stop: threading.Event, seconds: float) -> None:
    """Wait until woken, stopped or `seconds` have passed (in slices: a signal handler
    sets `stop`, which no single wait could also watch)."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        if wake.wait(min(left, 0.5)):
            break
    wake.clear()


@contextmanager
def _linked(stop: threading.Event) -> Iterator[threading.Event]:
    """An event set when `stop` is, for one run: the pipeline sets its stop event when it
    ends, which must not stop the watcher."""
    linked = threading.Event()
    done = threading.Event()

    def relay() -> None:
        while not done.is_set():
            if stop.wait(0.1):
                linked.set()
                return

    thread = threading.Thread(target=relay, name="ics-watch-stop", daemon=True)
    thread.start()
    try:
        yield linked
    finally:
        done.set()
        thread.join()
