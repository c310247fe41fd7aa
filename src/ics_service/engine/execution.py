"""Executions: register the items, drive the pipeline, record results, decide the end status.

The same runner serves the CLI, the HTTP server and the watcher; they differ only in
where items come from and which result sinks are attached.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import sources
from ..config import Settings
from ..errors import UsageError
from ..imaging import Limits, Preprocessor
from ..models.runtime import ModelRuntime
from ..store import Store
from ..types import Counts, ErrorInfo, Execution, ExecutionStatus, ItemResult, ItemStatus, ModelRef
from .pipeline import Pipeline

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    """Receives every finished batch of results (results file, capture, alerts...)."""

    def write(self, results: Sequence[ItemResult]) -> None: ...

    def close(self) -> None: ...


def final_status(counts: Counts, settings: Settings) -> tuple[ExecutionStatus, ErrorInfo | None]:
    """SUCCEEDED unless the failures (LOW_CONFIDENCE or FAILED) exceed the tolerated ones.

    As in Step Functions: with neither tolerance set, no failure is tolerated; with one or
    both set, exceeding either fails the execution.
    """
    failures = counts.low_confidence + counts.failed
    pct = settings.tolerated_failure_percentage
    cnt = settings.tolerated_failure_count
    exceeded = []
    if pct is None and cnt is None:
        if failures:
            exceeded.append("no failures tolerated")
    else:
        if cnt is not None and failures > cnt:
            exceeded.append(f"more than {cnt} tolerated")
        if pct is not None and counts.total and failures * 100.0 / counts.total > pct:
            exceeded.append(f"more than {pct:g}% tolerated")
    if not exceeded:
        return ExecutionStatus.SUCCEEDED, None
    return ExecutionStatus.FAILED, ErrorInfo(
        type="States.ExceedToleratedFailureThreshold",
        message=f"{failures} of {counts.total} items LOW_CONFIDENCE or FAILED "
        f"({counts.low_confidence} low confidence, {counts.failed} failed): " + ", ".join(exceeded),
    )


def execution_params(
    settings: Settings, source_specs: Sequence[str], **extra: Any
) -> dict[str, Any]:
    """What an execution records of how it was started (enough to resume it)."""
    return {
        "sources": list(source_specs),
        "model": settings.model,
        "threshold": settings.threshold,
        "top_k": settings.top_k,
        "batch_size": settings.batch_size,
        "max_pixels": settings.max_pixels,
        "max_bytes": settings.max_bytes,
        "tolerated_failure_percentage": settings.tolerated_failure_percentage,
        "tolerated_failure_count": settings.tolerated_failure_count,
        **extra,
    }


@dataclass
class StoreSink:
    store: Store
    execution_id: str

    def write(self, results: Sequence[ItemResult]) -> None:
        self.store.record_results(self.execution_id, results)
        failed = [r for r in results if r.status is not ItemStatus.SUCCEEDED]
        if failed:
            self.store.append_events(
                self.execution_id,
                (
                    (
                        "MapIterationFailed"
                        if r.status is ItemStatus.FAILED
                        else "MapIterationLowConfidence",
                        int(r.item_id),
                        {
                            "uri": r.uri,
                            "error": None if r.error is None else r.error.type,
                            "cause": None if r.error is None else r.error.message,
                            "confidence": r.confidence,
                        },
                    )
                    for r in failed
                ),
            )

    def close(self) -> None:
        pass


class _Recorder:
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
            while True:
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.q.put(None)
                    break
                batch.extend(more)
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


class ExecutionRunner:
    """Starts and runs executions against one store with one model runtime."""

    def __init__(self, settings: Settings, store: Store, runtime: ModelRuntime) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        card = runtime.card
        self.model_ref = ModelRef(name=card.name, version=card.version)

    def start(
        self, source_specs: Sequence[str], *, name: str | None = None, **params: Any
    ) -> tuple[Execution, bool]:
        """Create the execution and register its items; with a used name, return that one."""
        if name is not None and (existing := self.store.find_by_name(name)) is not None:
            return existing, False
        uris = sources.expand(source_specs)
        first = next(uris, None)
        if first is None:
            raise UsageError(f"no images found in {' '.join(source_specs)}")
        execution, created = self.store.create_execution(
            params=execution_params(self.settings, source_specs, **params),
            model=self.model_ref,
            threshold=self.settings.threshold,
            name=name,
        )
        if created:
            self.store.add_items(execution.id, itertools.chain([first], uris))
            self.store.append_events(
                execution.id, [("ExecutionStarted", None, {"params": execution.params})]
            )
            execution = self.store.get_execution(execution.id)
        return execution, created

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
        all_sinks: list[ResultSink] = [StoreSink(self.store, execution.id), *sinks]
        recorder = _Recorder(all_sinks, on_error=lambda _e: stop.set())
        pipeline = Pipeline(
            runtime=self.runtime,
            preprocess=Preprocessor(
                self.runtime.card, Limits(max_pixels=s.max_pixels, max_bytes=s.max_bytes)
            ),
            reader=sources.read,
            execution_id=execution.id,
            threshold=s.threshold,
            top_k=s.top_k,
            batch_size=s.batch_size,
            workers=s.decode_workers,
        )

        def emit(results: list[ItemResult]) -> None:
            recorder.put(results)
            if on_results is not None:
                on_results(results)

        started = time.perf_counter()
        log.info("execution %s running", execution.id, extra={"execution_id": execution.id})
        try:
            pipeline.run(self.store.pending_items(execution.id), emit, stop)
        finally:
            recorder.close()
            for sink in all_sinks:
                sink.close()
        if recorder.error is not None:
            self.store.finish_execution(
                execution.id,
                ExecutionStatus.FAILED,
                ErrorInfo(
                    type="States.Runtime", message=f"recording results failed: {recorder.error}"
                ),
            )
            raise recorder.error
        finished = self._finish(execution.id, aborted=stop.is_set())
        log.info(
            "execution %s %s in %.2f s",
            execution.id,
            finished.status.value,
            time.perf_counter() - started,
            extra={"execution_id": execution.id},
        )
        return finished

    def _finish(self, execution_id: str, *, aborted: bool) -> Execution:
        counts = self.store.counts(execution_id)
        status, error = final_status(counts, self.settings)
        if aborted and counts.done < counts.total:
            status = ExecutionStatus.ABORTED
            error = ErrorInfo("States.Aborted", "stopped by request")
        finished = self.store.finish_execution(execution_id, status, error)
        event = {
            ExecutionStatus.SUCCEEDED: "ExecutionSucceeded",
            ExecutionStatus.FAILED: "ExecutionFailed",
            ExecutionStatus.ABORTED: "ExecutionAborted",
        }[status]
        self.store.append_events(
            execution_id,
            [
                (
                    event,
                    None,
                    {"counts": finished.counts.to_dict(), "error": error and error.message},
                )
            ],
        )
        return finished
