"""Batch executions inside `ics serve`: started by `POST /v1/executions`, run a few at a
time (`max_running_executions`) in the order they came, each on a worker thread with a stop
event of its own.

A POST only creates the execution (RUNNING, nothing listed yet) and queues it, so it is
answered at once whatever the size of its sources; the worker that takes it lists and
registers its items, then runs it. Every item URI is checked against `allowed_sources` as it
is listed, so neither a list file nor a symlink in a folder reaches outside. While an
execution waits or is being listed, this module says the server is alive for it (the
runner does once it runs), and a cancel request reaches it.

At shutdown the queued executions end ABORTED and the running ones are stopped and end
ABORTED. At start-up (unless `resume_orphans` is off) the server queues for resume the
executions whose process died (orphans, left RUNNING) and the batch executions that a
server started and a server's shutdown left ABORTED with work to do; executions cancelled
by request stay cancelled. `POST /v1/executions/{id}/resume` (`Batches.resume`) queues any
other interrupted execution, as `ics executions resume` runs it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .. import sources
from ..config import Settings
from ..engine.batcher import QueueFull
from ..engine.execution import (
    ExecutionRunner,
    check_name,
    check_resumable,
    execution_params,
    settings_for,
)
from ..engine.lifecycle import (
    HEARTBEAT_SECONDS,
    cancel_execution,
    is_orphaned,
    owner_of,
    record_end,
)
from ..engine.realtime import is_realtime
from ..engine.recording import ResultSink
from ..errors import (
    EnvironmentUnavailable,
    ExecutionTaken,
    IcsError,
    Interrupted,
    ModelNotFound,
    UsageError,
)
from ..models.runtime import ModelRuntime
from ..redact import redact_uri
from ..sources.local import split_glob
from ..types import ErrorInfo, Execution, ExecutionStatus
from .allowed import allowed_uri, confine, item_check
from .service import Service, plan_serving

log = logging.getLogger(__name__)

#: How long shutdown waits for running executions to stop before it lets them go.
SHUTDOWN_WAIT_S = 30.0
#: Most orphans looked at when the server starts.
ORPHANS_SCANNED = 10_000


#: Executions waiting to run at most: beyond, 503 (each waiting one costs heartbeats).
MAX_QUEUED = 100

#: The params key that marks a batch execution started by `POST /v1/executions`: a server
#: resumes such an execution at start-up when a server's shutdown aborted it.
STARTED_BY_SERVER = "serve"


class ShuttingDown(EnvironmentUnavailable):
    """The server is stopping: it starts no new execution."""


class Phase(StrEnum):
    QUEUED = "QUEUED"
    LISTING = "LISTING"
    RUNNING = "RUNNING"


@dataclass(eq=False)
class Job:
    """One execution this server holds: waiting, being listed, or running."""

    execution_id: str
    settings: Settings
    #: The sources to list (a new execution), or None: resume the execution as it is.
    sources: list[str] | None
    stop: threading.Event = field(default_factory=threading.Event)
    phase: Phase = Phase.QUEUED
    #: Whether this server has claimed the execution (an orphan is claimed when it runs).
    owned: bool = True
    cancelled: bool = False
    #: Created with its items already registered (a watcher's micro-batch): just run it.
    listed: bool = False
    #: Resume it whatever its status (asked for, or aborted by a server's shutdown), not
    #: only while it is an orphan.
    resume: bool = False
    #: The runner of the job once a worker has it.
    runner: ExecutionRunner | None = None


#: Result sinks an execution's run feeds besides the store (None: none), chosen by its
#: params: how a protocol that starts executions (SageMaker's InvokeEndpointAsync) hands
#: their results on, on every run of them, resumes included.
SinksFor = Callable[[Execution, ExecutionRunner], ResultSink | None]


class Batches:
    """The batch queue of one server."""

    def __init__(self, service: Service, sinks_for: Sequence[SinksFor] = ()) -> None:
        self.service = service
        self.sinks_for = list(sinks_for)
        self.store = service.store
        self.settings = service.settings
        self.owner = owner_of(self.settings)
        self.lease_s = self.settings.execution_lease_s
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._closing = False
        self._beat_done = threading.Event()
        #: Orphans on a model this server does not serve: left to another server.
        self._passed_over: set[str] = set()
        self._workers = [
            threading.Thread(target=self._work, name=f"ics-batch-{i}", daemon=True)
            for i in range(self.settings.max_running_executions)
        ]
        self._heart = threading.Thread(target=self._heartbeat, name="ics-batch-beat", daemon=True)
        if self.settings.resume_orphans:
            self._queue_orphans()
        for t in (*self._workers, self._heart):
            t.start()

    # --- what the routes call ---------------------------------------------------------

    def start(
        self,
        source_specs: Sequence[str],
        overrides: dict[str, Any],
        name: str | None,
        model: str | None = None,
    ) -> tuple[Execution, bool]:
        """Create and queue an execution on a served model (None: the default), with the
        server's settings but for `overrides`; with a name already used, return that one.
        Without a threshold in `overrides`, the model's default threshold applies, as for a
        real-time request."""
        if name is not None and (existing := self.store.find_by_name(name)) is not None:
            return existing, False
        if self._closing:
            raise ShuttingDown("the server is shutting down: it starts no new execution")
        check_name(name)
        served = self.service.model(model)  # ModelNotFound (404) names the served ones
        update = {"threshold": served.threshold, **overrides}
        if served.name != self.service.default_name:
            update["model"] = served.name
        settings = self.settings.model_copy(update=update)
        if len(self._queue) >= MAX_QUEUED:
            raise QueueFull(f"{MAX_QUEUED} executions are already waiting to run; try again later")
        for spec in source_specs:
            check_source(spec, self.settings.allowed_sources)
        runner = self._runner(settings, served.runtime)
        execution, created = self.store.create_execution(
            params=execution_params(settings, source_specs, **{STARTED_BY_SERVER: True}),
            model=runner.model_ref,
            threshold=settings.threshold,
            name=name,
        )
        if not created:
            return execution, False
        with runner.ending_on_error(execution.id):
            self.store.claim(execution.id, self.owner)
            self.store.append_events(
                execution.id, [("ExecutionStarted", None, {"params": execution.params})]
            )
        job = Job(execution.id, settings, list(source_specs))
        if self._put(job) is not job:
            self._abort(job, "the server stopped before it ran")
            raise ShuttingDown("the server is shutting down: it starts no new execution")
        log.info("execution %s queued", execution.id, extra={"execution_id": execution.id})
        return self.store.get_execution(execution.id), True

    def start_listed(
        self, register: Callable[[ExecutionRunner], Execution | None], settings: Settings
    ) -> Execution | None:
        """Queue the execution that `register` creates with its items registered and claims
        (`POST /v1/events`); None when it created none."""
        if self._closing:
            raise ShuttingDown("the server is shutting down: it starts no new execution")
        if len(self._queue) >= MAX_QUEUED:
            raise QueueFull(f"{MAX_QUEUED} executions are already waiting to run; try again later")
        execution = register(self._runner(settings, self.service.default.runtime))
        if execution is None:
            return None
        job = Job(execution.id, settings, None, listed=True)
        if self._put(job) is not job:
            self._abort(job, "the server stopped before it ran")
            raise ShuttingDown("the server is shutting down: it starts no new execution")
        log.info("execution %s queued", execution.id, extra={"execution_id": execution.id})
        return execution

    def resume(self, execution_id: str) -> Execution:
        """Queue an interrupted execution to finish it, as `ics executions resume` does:
        its pending items run with its own settings, items with a result are not redone.
        One this server holds already is left as it is (asking twice resumes once)."""
        execution = self.store.get_execution(execution_id)
        if execution.id in self._jobs:
            return execution
        if self._closing:
            raise ShuttingDown("the server is shutting down: it resumes no execution")
        if is_realtime(execution):
            raise UsageError(
                f"execution {execution.id} holds real-time requests, which are not kept: "
                "it cannot be resumed; send the requests again"
            )
        # Its items are listed again if it stopped while listing: only from where the
        # server may read, as for a new one.
        for spec in execution.params.get("sources") or []:
            check_source(str(spec), self.settings.allowed_sources)
        check_resumable(self.store, execution)
        settings = self._resume_settings(execution)
        self._check_served(execution, settings)
        if len(self._queue) >= MAX_QUEUED:
            raise QueueFull(f"{MAX_QUEUED} executions are already waiting to run; try again later")
        job = Job(execution.id, settings, None, owned=False, resume=True)
        held = self._put(job)
        if held is None:
            raise ShuttingDown("the server is shutting down: it resumes no execution")
        if held is not job:  # asked twice at once: the first is queued, this one is it
            return self.store.get_execution(execution.id)
        log.info(
            "execution %s queued for resume", execution.id, extra={"execution_id": execution.id}
        )
        return self.store.get_execution(execution.id)

    def _resume_settings(self, execution: Execution) -> Settings:
        """The execution's own settings, alerting the subscriptions it started with."""
        settings = settings_for(execution, self.settings)
        if "subscriptions" in execution.params:
            from ..alerts.dispatcher import recorded_subscriptions

            notify = recorded_subscriptions(self.store, execution.params["subscriptions"])
            settings = settings.model_copy(update={"notify": notify})
        return settings

    def queued(self, execution_id: str) -> bool:
        """Whether the execution waits in this server's queue for a worker."""
        job = self._jobs.get(execution_id)
        return job is not None and job.phase is Phase.QUEUED

    def cancel(self, execution_id: str, wait_s: float) -> Execution:
        """Stop an execution: at once when it waits here; otherwise as `ics executions
        cancel` does (its runner, here or in another process, sees the request)."""
        execution = self.store.get_execution(execution_id)
        job = self._jobs.get(execution.id)
        if job is not None and self._drop(job, "cancelled by request while queued"):
            return self.store.get_execution(execution.id)
        return cancel_execution(self.store, execution.id, wait_s=wait_s)

    def close(self) -> None:
        """Abort what waits, stop what runs and wait for it (bounded): nothing stays RUNNING."""
        with self._lock:
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            running = [j for j in self._jobs.values() if j.phase is not Phase.QUEUED]
            self._ready.notify_all()
        for job in waiting:
            if job.owned:
                self._abort(job, "the server stopped before it ran")
            else:  # an orphan not taken yet stays one, for the next server
                self._forget(job)
        for job in running:
            job.stop.set()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("a batch execution did not stop within %g s", SHUTDOWN_WAIT_S)
        self._beat_done.set()
        self._heart.join()

    # --- the queue --------------------------------------------------------------------

    def _put(self, job: Job) -> Job | None:
        """Queue the job and return it; when this server holds its execution already, the
        job that does (this one is not queued); None when the server is closing."""
        with self._lock:
            if self._closing:
                return None
            if (held := self._jobs.get(job.execution_id)) is not None:
                return held
            self._jobs[job.execution_id] = job
            self._queue.append(job)
            self._ready.notify()
        return job

    def _take(self) -> Job | None:
        with self._lock:
            while not self._queue and not self._closing:
                self._ready.wait()
            if self._closing:
                return None
            job = self._queue.popleft()
            job.phase = Phase.LISTING
            return job

    def _drop(self, job: Job, why: str) -> bool:
        """End a job still waiting ABORTED, cancelled; False when a worker has it already."""
        with self._lock:
            if job.phase is not Phase.QUEUED or job not in self._queue:
                return False
            self._queue.remove(job)
        # Cancelled stays cancelled: no later start-up resumes it.
        try:
            self.store.request_cancel(job.execution_id)
        except IcsError as e:
            log.error("could not record the cancel of %s: %s", job.execution_id, e)
        if job.owned:
            self._abort(job, why)
        else:
            record_end(
                self.store,
                job.execution_id,
                ExecutionStatus.ABORTED,
                ErrorInfo("States.Aborted", f"{why}; it was waiting to be resumed"),
            )
            self._forget(job)
        return True

    def _drop_taken(self, job: Job) -> bool:
        """Forget a job still waiting whose execution another process took over; False when
        a worker has it already."""
        with self._lock:
            if job.phase is not Phase.QUEUED or job not in self._queue:
                return False
            self._queue.remove(job)
        self._forget(job)
        return True

    def _abort(self, job: Job, why: str) -> None:
        try:
            counts = self.store.counts(job.execution_id)
            left = f"; {counts.total - counts.done} items left" if counts.total else ""
            record_end(
                self.store,
                job.execution_id,
                ExecutionStatus.ABORTED,
                ErrorInfo("States.Aborted", why + left),
            )
        except IcsError as e:
            log.error("could not record execution %s ABORTED: %s", job.execution_id, e)
        self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            # Only this job's entry: another job for the same execution is not forgotten.
            if self._jobs.get(job.execution_id) is job:
                del self._jobs[job.execution_id]

    def _queue_orphans(self, *, starting: bool = True) -> None:
        """Queue the executions whose process died, to resume them with their own settings;
        when the server starts, also those a server's shutdown aborted."""
        try:
            running = self.store.list_executions(
                limit=ORPHANS_SCANNED, status=ExecutionStatus.RUNNING
            )
        except IcsError as e:
            log.error("could not look for executions to resume: %s", e)
            return
        # Oldest first: they have waited longest.
        for execution in reversed(running):
            if execution.id in self._jobs or execution.id in self._passed_over:
                continue  # held here already, or not this server's to resume
            if is_realtime(execution) or not is_orphaned(execution, self.lease_s):
                continue
            if execution.params.get("realtime"):
                continue
            log.warning(
                "execution %s was left running by %s: resuming it",
                execution.id,
                execution.owner,
                extra={"execution_id": execution.id},
            )
            settings = settings_for(execution, self.settings)
            try:
                self._check_served(execution, settings)
            except UsageError as e:
                if execution.id not in self._passed_over:  # said once, not at every scan
                    log.warning("execution %s left for another server: %s", execution.id, e)
                    self._passed_over.add(execution.id)
                continue
            self._put(Job(execution.id, settings, None, owned=False))
        if starting:
            self._queue_aborted()

    def _queue_aborted(self) -> None:
        """Queue the batch executions a server started and a server's shutdown left ABORTED
        with items to run (not those cancelled by request, nor any `ics classify` ran)."""
        try:
            aborted = self.store.list_executions(
                limit=ORPHANS_SCANNED, status=ExecutionStatus.ABORTED
            )
        except IcsError as e:
            log.error("could not look for aborted executions to resume: %s", e)
            return
        for execution in reversed(aborted):
            if execution.params.get(STARTED_BY_SERVER) is not True or execution.cancel_requested:
                continue
            try:
                check_resumable(self.store, execution)
            except IcsError:
                continue  # every item has its result
            try:
                for spec in execution.params.get("sources") or []:
                    check_source(str(spec), self.settings.allowed_sources)
            except IcsError as e:
                log.warning("execution %s not resumed: %s", execution.id, e)
                continue
            log.warning(
                "execution %s was aborted when a server stopped: resuming it",
                execution.id,
                extra={"execution_id": execution.id},
            )
            try:
                settings = self._resume_settings(execution)
                self._check_served(execution, settings)
            except IcsError as e:
                log.error("execution %s not resumed: %s", execution.id, e)
                continue
            self._put(Job(execution.id, settings, None, owned=False, resume=True))

    # --- the workers ------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                self._run(job)
            except (Exception, Interrupted) as e:
                # Recorded on the execution already (ending_on_error), unless a resume
                # was refused before it claimed the execution.
                log.warning("execution %s: %s", job.execution_id, e)
            finally:
                self._forget(job)

    def _runner(self, settings: Settings, runtime: ModelRuntime) -> ExecutionRunner:
        # The server's model session was planned for serving: run as many batches at once
        # as it was planned for.
        threads, workers = plan_serving(self.settings)
        planned = settings.model_copy(
            update={"inference_threads": threads, "inference_workers": workers}
        )
        return ExecutionRunner(
            planned,
            self.store,
            runtime,
            confine=confine(self.settings.allowed_sources),
            check_item=item_check(self.settings.allowed_sources),
        )

    def _model_of(self, settings: Settings) -> str | None:
        """The served model that an execution with these (recorded) settings runs on: None
        for the default model."""
        if settings.model in (self.settings.model, self.service.default_name):
            return None
        return settings.model

    def _check_served(self, execution: Execution, settings: Settings) -> None:
        """Refuse to resume an execution on another model than its own."""
        model = self._model_of(settings)
        if model is not None and not self.service.serves(model):
            raise UsageError(
                f"execution {execution.id} runs on model {model!r}, which this server does "
                f"not serve: serve it too (`ics serve --model {self.service.default_name} "
                f"--model {model}`), or resume it with `ics executions resume {execution.id}`"
            )

    def _run(self, job: Job) -> None:
        with contextlib.ExitStack() as held:
            try:
                served = held.enter_context(self.service.using(self._model_of(job.settings)))
            except ModelNotFound as e:  # unloaded since the job was queued
                why = f"its model is no longer served ({e})"
                if job.owned:
                    self._abort(job, why)
                else:
                    log.warning("execution %s not resumed: %s", job.execution_id, why)
                return
            self._run_on(job, self._runner(job.settings, served.runtime))

    def _run_on(self, job: Job, runner: ExecutionRunner) -> None:
        job.runner = runner
        sinks: list[ResultSink] = []
        if job.listed:
            execution = self.store.get_execution(job.execution_id)
        elif job.sources is None:
            execution = self.store.get_execution(job.execution_id)
            if not job.resume and not is_orphaned(execution, self.lease_s):
                log.warning("execution %s is no longer orphaned: not resumed", execution.id)
                return
            output = results_path(job.settings, execution)

            def claimed() -> threading.Event:
                job.owned = True
                return job.stop

            execution = runner.prepare_resume(execution.id, cooperate=claimed)
            if output is not None:
                from ..outputs import rebuilt_writer

                with runner.ending_on_error(execution.id):
                    sinks = [rebuilt_writer(*output, runner.store.results(execution.id))]
        else:
            with runner.ending_on_error(job.execution_id):
                # The rest is registered while the run classifies (engine/listing.py).
                listed = self._listed(job)
                first = next(listed, None)
                if first is None:
                    raise UsageError(f"no images found in {' '.join(map(redact_uri, job.sources))}")
                runner.list_while_running(job.execution_id, itertools.chain([first], listed))
            execution = self.store.get_execution(job.execution_id)
        job.phase = Phase.RUNNING
        for sinks_for in self.sinks_for:
            if (sink := sinks_for(execution, runner)) is not None:
                sinks.append(sink)
        runner.run(execution, sinks=sinks, stop=job.stop)

    def _listed(self, job: Job) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """The job's items (URI, manifest metadata) until it is stopped (the runner checks
        each against allowed_sources as it registers it)."""
        assert job.sources is not None
        log.info("listing %s", " ".join(map(redact_uri, job.sources)))
        for uri, meta in sources.expand_items(job.sources, stopped=job.stop.is_set):
            if job.stop.is_set():
                break
            yield uri, meta
        if job.stop.is_set():
            why = "cancelled by request" if job.cancelled else "stopped with the server"
            raise Interrupted(f"{why} while listing the sources")

    def _heartbeat(self) -> None:
        """Keep the executions that wait or are being listed alive; pass on cancel requests;
        every third of a lease, look for executions whose process died (another replica
        killed, its host lost) to take over."""
        scan_every = max(HEARTBEAT_SECONDS, self.lease_s / 3)
        last_scan = time.monotonic()
        while not self._beat_done.wait(HEARTBEAT_SECONDS):
            if self.settings.resume_orphans and time.monotonic() - last_scan >= scan_every:
                last_scan = time.monotonic()
                self._queue_orphans(starting=False)
            with self._lock:
                jobs = [
                    j
                    for j in self._jobs.values()
                    if j.owned and j.phase in (Phase.QUEUED, Phase.LISTING)
                ]
            for job in jobs:
                try:
                    requested = self.store.heartbeat(job.execution_id, self.owner)
                except ExecutionTaken as e:
                    # Went unheard past the lease (a stalled host): the taker runs it.
                    log.error("%s", e, extra={"execution_id": job.execution_id})
                    job.owned = False
                    if not self._drop_taken(job):
                        if job.runner is not None:  # it records nothing of the end
                            job.runner.taken(job.execution_id)
                        job.stop.set()
                    continue
                except IcsError as e:
                    log.warning("heartbeat of %s failed: %s", job.execution_id, e)
                    continue
                if requested and not job.cancelled:
                    job.cancelled = True
                    if not self._drop(job, "cancelled by request while queued"):
                        job.stop.set()


def check_source(spec: str, allowed: list[str]) -> None:
    """Refuse (403) a SOURCE outside allowed_sources: a path or URI, a glob's literal
    folder, a list file. What a folder, glob or list names is checked as it is listed."""
    if "\x00" in spec:
        raise UsageError(f"source {spec!r} holds a NUL character: no path or URI does")
    if spec.startswith("@"):
        allowed_uri(spec[1:], allowed)
        return
    sources.source_for(spec)  # an unknown scheme is a 400 now, not a failed execution
    if sources.scheme_of(spec) != "file":
        allowed_uri(spec, allowed)
        return
    path = os.path.expanduser(sources.uri_to_path(spec))
    if not os.path.lexists(path) and set("*?[") & set(path):
        path = split_glob(path)[0]
    allowed_uri(path, allowed)


def results_path(settings: Settings, execution: Execution) -> tuple[str, str | None] | None:
    """The results file (path, format) of an execution started by `ics classify`, checked
    as `ics executions resume` checks it; None for one started over HTTP or to stdout."""
    from ..outputs import check_output

    params = execution.params
    if "output" not in params or params["output"] == "-":
        return None
    output, fmt = params.get("output"), params.get("output_format")
    path = str(output) if output else str(settings.results_dir / f"{execution.id}.jsonl")
    check_output(path, fmt, settings.results_dir)
    return path, fmt
