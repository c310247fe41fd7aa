"""Executions: register the items, drive the pipeline, record results, decide the end status.

The runner knows nothing of its caller: it gets the sources to list, the result sinks to
feed and an event that stops it, so any front end can drive it.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import sources
from ..capture import inference_id_of, open_capture
from ..capture.sink import CaptureSink
from ..config import Settings
from ..errors import (
    INTERNAL_ERROR,
    ExecutionBusy,
    ExecutionTaken,
    IcsError,
    Interrupted,
    SourceUnreadable,
    StoreLost,
    UsageError,
)
from ..imaging import Limits, Preprocessor
from ..models.runtime import ModelRuntime
from ..redact import is_redacted, redact_uri
from ..types import (
    ErrorInfo,
    Execution,
    ExecutionStatus,
    ItemResult,
    ModelRef,
    Step,
)
from .executor import executor_for
from .lifecycle import (
    HEARTBEAT_SECONDS,
    STALE_AFTER_SECONDS,
    final_status,
    is_orphaned,
    owner_of,
    record_end,
)
from .listing import BackgroundListing, Listed, tail_pending, unregistered
from .pipeline import Pipeline, Reader, plan_batches
from .recording import History, Recorder, ResultSink, StoreSink

if TYPE_CHECKING:  # annotations only: importing the engine leaves SQLAlchemy unimported
    from ..store import Store

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How long a run that ends waits for its listing thread to stop.
LISTING_STOP_SECONDS = 30.0
#: ... and after a signal that stops at once (a listing blocked in a read is not waited for).
LISTING_AT_ONCE_SECONDS = 1.0

#: Executions whose count of duplicates a runner keeps for `duplicates_dropped`.
KEPT_COUNTS = 100

#: Called once nothing may be interrupted by an exception any more; returns the stop event.
Cooperate = Callable[[], threading.Event]


def execution_params(
    settings: Settings, source_specs: Sequence[str], **extra: Any
) -> dict[str, Any]:
    """What an execution records of how it was started (enough to resume it, except the
    credentials of a SOURCE URL, which are never recorded: see `redact_uri`)."""
    return {
        "sources": [redact_uri(spec) for spec in source_specs],
        "model": settings.model,
        # A remote model's labels file (a resume reads the same one, from any folder).
        "labels": None if settings.labels is None else str(settings.labels.resolve()),
        "threshold": settings.threshold,
        "top_k": settings.top_k,
        "batch_size": settings.batch_size,
        "max_pixels": settings.max_pixels,
        "max_bytes": settings.max_bytes,
        "low_confidence": settings.low_confidence,
        "tolerated_failure_percentage": settings.tolerated_failure_percentage,
        "tolerated_failure_count": settings.tolerated_failure_count,
        # Ids in the store's ics_subscriptions: a resume alerts them again.
        "subscriptions": [s.id for s in settings.notify],
        **extra,
    }


def settings_for(execution: Execution, settings: Settings) -> Settings:
    """The settings an execution was started with (for resume), over the current ones."""
    keep = {k: v for k, v in execution.params.items() if k in RECORDED_SETTINGS}
    if keep.get("labels") is not None:
        keep["labels"] = Path(keep["labels"])
    # Executions recorded before the setting existed ran under the strict rule.
    keep.setdefault("low_confidence", "fail")
    return settings.model_copy(update=keep)


#: Settings recorded in an execution's params: a resume runs with the same ones.
RECORDED_SETTINGS = (
    "model",
    "labels",
    "threshold",
    "top_k",
    "batch_size",
    "max_pixels",
    "max_bytes",
    "low_confidence",
    "tolerated_failure_percentage",
    "tolerated_failure_count",
)


#: Names of the real-time executions of `ics serve` (one a day); no other may take one.
REALTIME_PREFIX = "realtime-"
#: Names of the micro-batches of `ics watch` and `POST /v1/events` (store/watched.py).
WATCH_PREFIX = "watch-"


#: The form of an execution id (store.new_execution_id): no name may have it.
_ID_FORM = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def check_name(name: str | None) -> None:
    """Refuse an execution name kept for the real-time or watch executions, or one that has
    the form of an id (executions are found by id or name: it would be another's id)."""
    if name is not None and _ID_FORM.fullmatch(name):
        raise UsageError(
            f"execution name {name!r} has the form of an execution id; choose another name"
        )
    if name is not None and name.startswith(REALTIME_PREFIX):
        raise UsageError(
            f"execution names starting with {REALTIME_PREFIX!r} are kept for the real-time "
            "executions of `ics serve`; choose another name"
        )
    if name is not None and name.startswith(WATCH_PREFIX):
        raise UsageError(
            f"execution names starting with {WATCH_PREFIX!r} are kept for the micro-batches "
            "of `ics watch` and `POST /v1/events`; choose another name"
        )


class ExecutionRunner:
    """Starts, runs and resumes executions against one store with one model runtime."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: ModelRuntime,
        *,
        confine: sources.Confine | None = None,
        check_item: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        #: Which redirect targets an HTTP item may follow (a server's allowed_sources).
        self.confine = confine
        #: Raises for a listed item URI that may not be read (a server's allowed_sources):
        #: every listing, a resume's included, passes its items through it.
        self.check_item = check_item
        #: Per execution, the URIs with credentials of its items, by the URI stored.
        self._secrets: dict[str, dict[str, str]] = {}
        self.store = store
        self.runtime = runtime
        card = runtime.card
        self.model_ref = ModelRef(name=card.name, version=card.version)
        self.owner = owner_of(settings)
        #: Executions another process took over while this one went unheard: their runs
        #: stop, and their ends are the new owner's to record.
        self._taken: set[str] = set()
        #: Listings of executions this runner started, for `run` to register as it goes.
        self._listings: dict[str, BackgroundListing] = {}
        #: The listings `run` is registering now, by execution (see `listed_so_far`).
        self._running: dict[str, BackgroundListing] = {}
        #: Items named twice that the listings `run` completed left out, by execution.
        self._duplicates: dict[str, int] = {}
        sources.configure(settings)

    def start(
        self,
        source_specs: Sequence[str],
        *,
        name: str | None = None,
        cooperate: Cooperate | None = None,
        **params: Any,
    ) -> tuple[Execution, bool]:
        """Create the execution; with a used name, return that one. Its items are
        registered by `run`, while it classifies them (see listing.py).

        `cooperate` is called just before the execution is created and returns the event
        that a signal sets from then on (see cli/signals.py). Until then a signal may
        raise anywhere, as nothing is recorded yet; after, a set event ends the listing
        with `Interrupted` and the execution ABORTED.
        """
        check_name(name)
        if name is not None and (existing := self.store.find_by_name(name)) is not None:
            return existing, False
        log.info("listing %s", " ".join(map(redact_uri, source_specs)))
        halt = threading.Event()
        duplicates = sources.Duplicates()
        uris = self._checked(
            sources.expand_items(
                source_specs, _selection(params), stopped=halt.is_set, duplicates=duplicates
            )
        )
        first = next(uris, None)
        if first is None:
            raise UsageError(f"no images found in {' '.join(map(redact_uri, source_specs))}")
        stop = cooperate() if cooperate is not None else None
        execution, created = self.store.create_execution(
            params=execution_params(self.settings, source_specs, **params),
            model=self.model_ref,
            threshold=self.settings.threshold,
            name=name,
        )
        if created:
            log.info("execution %s created", execution.id, extra={"execution_id": execution.id})
            with self.ending_on_error(execution.id):
                self.store.claim(execution.id, self.owner)
                self.store.append_events(
                    execution.id, [("ExecutionStarted", None, {"params": execution.params})]
                )
                listed = self._redacted(execution.id, _until(stop, itertools.chain([first], uris)))
                self._listings[execution.id] = BackgroundListing(
                    self.store, execution.id, listed, halt=halt, duplicates=duplicates
                )
                execution = self.store.get_execution(execution.id)
        return execution, created

    def taken(self, execution_id: str) -> None:
        """Another process took the execution over: its run here stops (when told to) and
        records nothing of its end."""
        self._taken.add(execution_id)

    def listed_so_far(self, execution_id: str) -> tuple[int, bool] | None:
        """While its items are being listed: (items known so far, whether the listing has
        ended); None when this runner lists nothing for it (the total is the store's)."""
        listing = self._listings.get(execution_id) or self._running.get(execution_id)
        if listing is None:
            return None
        return listing.total, listing.done.is_set()

    def duplicates_dropped(self, execution_id: str) -> int | None:
        """How many items named twice in the SOURCEs the run of this execution left out
        (None: this runner did not list it, such as a resume of a listed execution)."""
        return self._duplicates.get(execution_id)

    def prepare_resume(self, execution_id: str, *, cooperate: Cooperate | None = None) -> Execution:
        """Take over an interrupted (or aborted) execution so that `run` finishes it."""
        execution = self.store.get_execution(execution_id)
        check_resumable(self.store, execution, stale_after=self.settings.execution_lease_s)
        needs_secrets = self._check_secrets(execution)
        stop = cooperate() if cooperate is not None else None
        # Only if nobody took it since it was read: two servers (or a server and `ics
        # executions resume`) that find one orphan at once must not both run it.
        taken = self.store.take_over(
            execution.id,
            self.owner,
            expected_owner=execution.owner,
            expected_heartbeat=execution.heartbeat_at,
        )
        if not taken:
            raise _still_running(self.store.get_execution(execution.id))
        with self.ending_on_error(execution.id):
            self.store.append_events(
                execution.id, [("ExecutionResumed", None, {"owner": self.owner})]
            )
            if not execution.items_listed:
                # The process died while listing: `run` lists again (as it runs, under its
                # heartbeat) and registers the URIs not registered yet.
                # The same listing again, duplicates dropped as the first time (the first
                # URI of each image is kept, as the first listing kept it).
                halt = threading.Event()
                duplicates = sources.Duplicates()
                specs = execution.params["sources"]
                listed = sources.expand_items(
                    specs, _selection(execution.params), stopped=halt.is_set, duplicates=duplicates
                )
                listed = self._redacted(execution.id, _until(stop, self._checked(listed)))
                fresh = unregistered(self.store, execution.id, listed)
                self._listings[execution.id] = BackgroundListing(
                    self.store,
                    execution.id,
                    fresh,
                    start_seq=execution.counts.total,
                    halt=halt,
                    duplicates=duplicates,
                )
            elif needs_secrets:
                # The credentials of its item URIs were never stored: listed again, the
                # sources name them (a manifest of presigned URLs, read again).
                log.info("listing %s again for the credentials of its items", execution.id)
                relisted = sources.expand_items(
                    execution.params["sources"], _selection(execution.params)
                )
                for _ in self._redacted(execution.id, _until(stop, self._checked(relisted))):
                    pass
            return self.store.get_execution(execution.id)

    def _check_secrets(self, execution: Execution) -> bool:
        """Whether the pending items of an execution to resume have URIs whose credentials
        were left out of the store (then its sources are listed again for them); a
        UsageError when a SOURCE itself had them, as it cannot be listed again."""
        pending = (item.uri for item in self.store.pending_items(execution.id))
        if not any(is_redacted(uri) for uri in pending):
            return False
        hidden = [spec for spec in execution.params.get("sources", []) if is_redacted(spec)]
        if hidden:
            raise UsageError(
                f"execution {execution.id} cannot be resumed: its source {hidden[0]} had "
                "credentials in its URL (a password or a presigned query), which ICS never "
                "stores; run `ics classify` again with that URL, under a new --name"
            )
        return True

    def _checked(self, items: Listed) -> Listed:
        """The listed items, each passed through `check_item` (which raises to refuse one)."""
        check = self.check_item
        for item in items:
            if check is not None:
                check(item[0])
            yield item

    def _redacted(self, execution_id: str, items: Listed) -> Listed:
        """The listed items with their URIs as the store keeps them (`redact_uri`, unique to
        each URI); the URIs with credentials are kept in memory, for `run` to read, until
        the item's result is recorded."""
        for uri, meta in items:
            shown = redact_uri(uri)
            if shown != uri:
                self._secrets.setdefault(execution_id, {})[shown] = uri
            yield shown, meta

    def list_while_running(
        self, execution_id: str, items: Iterator[tuple[str, dict[str, Any] | None]]
    ) -> None:
        """Have `run` register items (of an execution with none yet) as it runs them."""
        items = self._checked(items)
        self._listings[execution_id] = BackgroundListing(
            self.store, execution_id, self._redacted(execution_id, items)
        )

    @contextmanager
    def ending_on_error(self, execution_id: str) -> Iterator[None]:
        """Whatever escapes the block (a signal, a bug, a lost store, a full disk) ends the
        execution ABORTED or FAILED with the reason, then goes on up."""
        try:
            yield
        except BaseException as e:
            self.abandon(execution_id, e)
            raise

    def abandon(self, execution_id: str, error: BaseException) -> None:
        """Record the execution ABORTED (a signal) or FAILED (anything else) because of error."""
        listing = self._listings.pop(execution_id, None)
        if listing is not None:  # it ended before `run`: its listing never runs
            listing.discard()
        if execution_id in self._taken:
            log.warning(
                "execution %s: %s; another process runs it now",
                execution_id,
                error,
                extra={"execution_id": execution_id},
            )
            return
        if isinstance(error, Interrupted | KeyboardInterrupt):
            status, info = ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", _why(error))
        elif isinstance(error, IcsError):
            status, info = ExecutionStatus.FAILED, ErrorInfo("States.Runtime", str(error))
        else:
            status = ExecutionStatus.FAILED
            info = ErrorInfo(INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        log.error(
            "execution %s %s: %s",
            execution_id,
            status.value,
            info.message,
            extra={"execution_id": execution_id},
        )
        try:
            record_end(self.store, execution_id, status, info)
        except Exception as e:
            # The store itself is gone: the execution stays RUNNING with a dead owner,
            # which `ics executions resume` recognises.
            log.error(
                "could not record execution %s as %s: %s",
                execution_id,
                status.value,
                e,
                extra={"execution_id": execution_id},
            )

    def _reader(self, execution_id: str) -> Reader:
        """Reads an item, by the URI with credentials the listing kept for it, if any."""
        # The dict the listing fills as it goes (it may not have listed anything yet).
        secrets = self._secrets.setdefault(execution_id, {})

        def read(uri: str, max_bytes: int, *, stop: threading.Event) -> bytes:
            real = secrets.get(uri)
            if real is None and is_redacted(uri):
                raise SourceUnreadable(
                    f"{uri}: its credentials were never stored, and listing the sources "
                    "again did not name it; classify it again with its full URL"
                )
            return sources.read(real or uri, max_bytes, stop=stop, confine=self.confine)

        return read

    def run(
        self,
        execution: Execution,
        *,
        sinks: Iterable[ResultSink] = (),
        on_results: Callable[[Sequence[ItemResult]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Execution:
        """Process the execution's pending items, then record its final status."""
        stop = stop or threading.Event()
        s = self.settings
        history = History(self.store, execution.id, full=s.history == "full")
        all_sinks: list[ResultSink] = [StoreSink(self.store, execution.id, history), *sinks]
        capture = open_capture(s, stop)
        if capture is not None:
            all_sinks.append(CaptureSink(capture))
        recorder = Recorder(all_sinks, on_error=lambda _e: stop.set())
        batch_size, inference_workers = plan_batches(
            self.runtime,
            batch_size=s.batch_size,
            threads=s.inference_threads,
            workers=s.inference_workers,
            remote_concurrency=s.remote_concurrency,
        )
        pipeline = Pipeline(
            runtime=self.runtime,
            preprocess=Preprocessor.for_runtime(self.runtime, Limits.from_settings(s)),
            reader=self._reader(execution.id),
            execution_id=execution.id,
            threshold=s.threshold,
            top_k=s.top_k,
            batch_size=batch_size,
            workers=s.decode_workers,
            inference_workers=inference_workers,
            retry_read=s.retry[Step.SERIALIZE_IMAGE_DATA],
            retry_classify=s.retry[Step.CLASSIFY_IMAGE],
            on_event=history.add,
            capture=None
            if capture is None
            else lambda item: capture.wants(inference_id_of(execution.id, item.item_id)),
            reserve_capture=None if capture is None else capture.reserve_all,
        )

        secrets = self._secrets.setdefault(execution.id, {})
        executor = executor_for(s, pipeline, lambda uri: secrets.get(uri, uri))

        def emit(results: list[ItemResult]) -> None:
            recorder.put(results)
            for result in results:  # read for good: its credentials are needed no more
                secrets.pop(result.uri, None)
            if on_results is not None:
                on_results(results)

        started = time.perf_counter()
        log.info("execution %s running", execution.id, extra={"execution_id": execution.id})
        cancelled = threading.Event()
        beating = threading.Event()
        heart = threading.Thread(
            target=self._heartbeat,
            args=(execution.id, stop, cancelled, beating),
            name="ics-heartbeat",
            daemon=True,
        )
        listing = self._listings.pop(execution.id, None)
        at_once = False
        with self.ending_on_error(execution.id):
            heart.start()
            try:
                if listing is None:
                    executor.run(self.store.pending_items(execution.id), emit, stop)
                else:
                    self._running[execution.id] = listing
                    listing.start()
                    executor.run(tail_pending(self.store, execution.id, listing, stop), emit, stop)
                    if stop.is_set():
                        listing.halt.set()
                    listing.wait()
                    if listing.complete and listing.duplicates is not None:
                        self._duplicates[execution.id] = listing.duplicates.count
                        while len(self._duplicates) > KEPT_COUNTS:  # a server runs many
                            del self._duplicates[next(iter(self._duplicates))]
            except (Interrupted, KeyboardInterrupt):
                # A signal that stops at once (the third): a listing blocked in a read (a
                # FIFO, a hung mount) is not waited for; the process ends with it.
                at_once = True
                raise
            finally:
                if listing is not None:
                    # A run that fails stops its listing too, before its end is recorded.
                    listing.stop(LISTING_AT_ONCE_SECONDS if at_once else LISTING_STOP_SECONDS)
                    self._running.pop(execution.id, None)
                self._secrets.pop(execution.id, None)
                beating.set()
                heart.join()
                recorder.close()
                # Every sink is closed, whatever another's close raised: a results upload
                # that fails must not keep the capture file from being published.
                close_errors = _close_all(all_sinks, execution.id)
            if recorder.error is not None:
                raise recorder.error
            if execution.id in self._taken:
                # Its results went to the store as the items' first (a result recorded
                # twice keeps the first); the new owner runs the rest and ends it.
                finished = self.store.get_execution(execution.id)
            elif listing is not None and not listing.complete:
                finished = self._listing_ended(execution.id, listing, cancelled.is_set())
            else:
                finished = self._finish(
                    execution.id, aborted=stop.is_set(), cancelled=cancelled.is_set()
                )
        log.info(
            "execution %s %s in %.2f s",
            execution.id,
            finished.status.value,
            time.perf_counter() - started,
            extra={"execution_id": execution.id},
        )
        if close_errors:
            # The status above is the items'; the caller still learns what was not written.
            raise close_errors[0]
        return finished

    def _heartbeat(
        self,
        execution_id: str,
        stop: threading.Event,
        cancelled: threading.Event,
        done: threading.Event,
    ) -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                if self.store.heartbeat(execution_id, self.owner):
                    log.warning(
                        "execution %s: cancel requested, stopping",
                        execution_id,
                        extra={"execution_id": execution_id},
                    )
                    cancelled.set()
                    stop.set()
            except StoreLost as e:
                # Nothing this run records can be kept: stop it; its end fails with this.
                log.error("%s", e, extra={"execution_id": execution_id})
                stop.set()
                return
            except ExecutionTaken as e:
                log.error("%s", e, extra={"execution_id": execution_id})
                self.taken(execution_id)
                stop.set()
                return
            except Exception as e:  # a busy store must not kill the run
                log.warning("heartbeat failed: %s", e, extra={"execution_id": execution_id})

    def _listing_ended(
        self, execution_id: str, listing: BackgroundListing, cancelled: bool
    ) -> Execution:
        """End a run whose listing did not complete: a listing error (a missing bucket, a
        bad manifest line, a bug) goes on up; a stop leaves the execution ABORTED, for a
        resume to list the rest."""
        if listing.error is not None and not isinstance(listing.error, Interrupted):
            raise listing.error
        counts = self.store.counts(execution_id)
        why = "cancelled by request" if cancelled else "stopped by a signal"
        error = ErrorInfo(
            "States.Aborted",
            f"{why} while listing the sources; {counts.total - counts.done} of the "
            f"{counts.total} items registered so far left",
        )
        return record_end(self.store, execution_id, ExecutionStatus.ABORTED, error)

    def _finish(self, execution_id: str, *, aborted: bool, cancelled: bool) -> Execution:
        counts = self.store.counts(execution_id)
        status, error = final_status(counts, self.settings)
        if aborted and counts.done < counts.total:
            status = ExecutionStatus.ABORTED
            why = "cancelled by request" if cancelled else "stopped by a signal"
            error = ErrorInfo("States.Aborted", f"{why}; {counts.total - counts.done} items left")
        return record_end(self.store, execution_id, status, error)


def _close_all(sinks: Sequence[ResultSink], execution_id: str) -> list[BaseException]:
    """Close every sink; the errors raised, in order (each logged)."""
    errors: list[BaseException] = []
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:
            log.error("execution %s: %s", execution_id, e, extra={"execution_id": execution_id})
            errors.append(e)
    return errors


def check_resumable(
    store: Store, execution: Execution, *, stale_after: float = STALE_AFTER_SECONDS
) -> None:
    """Refuse to resume an execution that runs in a live process (ExecutionBusy) or that
    has every item's result (UsageError); its process is gone once unheard for stale_after
    seconds."""
    if execution.status is ExecutionStatus.RUNNING and not is_orphaned(execution, stale_after):
        raise _still_running(execution)
    pending = next(iter(store.pending_items(execution.id, page_size=1)), None)
    if execution.items_listed and pending is None and execution.status.finished:
        raise UsageError(
            f"execution {execution.id} is {execution.status}: every item has its result "
            f"(`ics executions show {execution.id} --results` shows them)"
        )


def _still_running(execution: Execution) -> ExecutionBusy:
    return ExecutionBusy(
        f"execution {execution.id} is still running (in {execution.owner}); "
        f"wait for it, or stop it with `ics executions cancel {execution.id}`"
    )


def _until(stop: threading.Event | None, uris: Iterator[_T]) -> Iterator[_T]:
    """The URIs, until `stop` is set: then `Interrupted`."""
    for uri in uris:
        if stop is not None and stop.is_set():
            raise Interrupted("stopped by a signal while listing the sources")
        yield uri
    if stop is not None and stop.is_set():
        raise Interrupted("stopped by a signal while listing the sources")


def _selection(params: dict[str, Any]) -> sources.Selection:
    """The --include / --exclude globs an execution was started with."""
    return sources.Selection(params.get("include") or (), params.get("exclude") or ())


def _why(error: BaseException) -> str:
    return str(error) or "stopped by a signal"
