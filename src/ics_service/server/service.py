"""What the HTTP routes call: decode on the decode pool, classify in dynamic batches, decide,
record. One `Service` per server; every protocol (v1, SageMaker, v2) goes through it, so
they share the model, the decode memory budget, the batcher and the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .. import sources
from ..capture import CaptureWriter, inference_id_of, open_capture
from ..capture.record import content_type_of
from ..config import Settings
from ..engine.batcher import Batcher, QueueFull
from ..engine.execution import REALTIME_PREFIX
from ..engine.lifecycle import HEARTBEAT_SECONDS, is_orphaned, owner_id
from ..engine.pipeline import default_workers, plan_inference
from ..engine.recording import take_waiting
from ..errors import ItemError, UsageError
from ..imaging import Limits, Preprocessor
from ..models.runtime import ModelRuntime, OnnxRuntime, available_cpus
from ..policies import decide
from ..store import Store
from ..types import (
    Captured,
    Execution,
    ExecutionStatus,
    ImageInfo,
    ItemResult,
    ItemStatus,
    ModelRef,
    utcnow,
)
from .allowed import confine
from .metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Real-time results of one UTC day are the items of the execution named REALTIME_PREFIX
#: and the day, with this parameter set (which no client can set).
REALTIME = "realtime"


def is_realtime(execution: Execution) -> bool:
    return execution.params.get(REALTIME) is True


#: How long a client should wait before trying again when the queue is full.
RETRY_AFTER_S = 1
#: `uri` reads run at once, on threads of their own: never on the decode pool, so that a
#: slow source cannot hold the decoding (or the model) of other requests.
READ_WORKERS = 8
#: `uri` reads that may wait for a read thread; beyond, 503 with Retry-After.
READ_QUEUE = 32


@dataclass(frozen=True)
class Options:
    """What one request may change of the settings."""

    threshold: float
    top_k: int


def plan_serving(settings: Settings) -> tuple[int, int]:
    """(intra-op threads, inference workers) of a server's model: as a batch run's."""
    return plan_inference(settings.inference_threads, settings.inference_workers)


def solo_threads(settings: Settings) -> int:
    """Threads of the extra session a lone request runs on, 0 for none.

    Under load every core runs a single-thread session on its own batches, as a batch run
    does (the most images per second); but a request that finds the server idle would then
    use one core of several. It runs on a session over every core instead, unless the
    settings chose the sessions' threads or workers themselves.
    """
    cpus = available_cpus()
    if settings.inference_threads or settings.inference_workers or cpus < 2:
        return 0
    return cpus


@dataclass(frozen=True)
class Outcome:
    """One image of a request, recorded: its result, and the class probabilities (C,) it was
    decided from, or the error that made it FAILED."""

    result: ItemResult
    probs: np.ndarray | None
    error: ItemError | None

    def raise_error(self) -> np.ndarray:
        """The probabilities, or the image's error raised (a 4xx)."""
        if self.error is not None:
            raise self.error
        assert self.probs is not None
        return self.probs


class Service:
    def __init__(
        self, settings: Settings, runtime: ModelRuntime, store: Store, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.metrics = metrics
        card = runtime.card
        self.model_ref = ModelRef(name=card.name, version=card.version)
        self.preprocess = Preprocessor(card, Limits.from_settings(settings))
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_workers or default_workers(), thread_name_prefix="ics-decode"
        )
        self.read_pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="ics-read")
        #: The stop events of the `uri` reads queued or running (see `read`).
        self._reads: set[threading.Event] = set()
        self._reads_lock = threading.Lock()
        self._confine = confine(settings.allowed_sources)
        self.batcher = Batcher(
            runtime,
            solo=_solo_runtime(runtime, solo_threads(settings)),
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            workers=plan_serving(settings)[1],
            on_batch=metrics.observe_batch,
        )
        metrics.track_queue(lambda: self.batcher.depth)
        self.log = RealtimeLog(store, self.model_ref) if settings.record_realtime else None
        self.capture = open_capture(settings)
        if self.capture is not None:
            capture = self.capture
            metrics.track_capture(lambda: capture.error is not None)
        self.ready = True

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        """The awaitable's result, or TimeoutError (a 504) after request_timeout_s."""
        return await asyncio.wait_for(awaitable, self.settings.request_timeout_s)

    def options(self, threshold: float | None = None, top_k: int | None = None) -> Options:
        return Options(
            threshold=self.settings.threshold if threshold is None else threshold,
            top_k=self.settings.top_k if top_k is None else top_k,
        )

    async def read(self, uri: str) -> bytes:
        """The bytes of a checked `uri` input, read on the read pool within
        request_timeout_s (a 504 beyond) and http_timeout_s (a 503). A request that gives
        up, or a server that stops, ends its read within a fraction of a second; redirects
        are followed only under allowed_sources."""
        stop = threading.Event()
        with self._reads_lock:
            if len(self._reads) >= READ_WORKERS + READ_QUEUE:
                raise QueueFull(f"{len(self._reads)} uri reads are already in progress")
            self._reads.add(stop)
        read = functools.partial(
            sources.read, uri, self.settings.max_bytes, stop=stop, confine=self._confine
        )
        try:
            future = self.read_pool.submit(read)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._read_done(stop)
            raise
        future.add_done_callback(lambda _: self._read_done(stop))
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), self.settings.request_timeout_s
            )
        finally:
            stop.set()

    def _read_done(self, stop: threading.Event) -> None:
        with self._reads_lock:
            self._reads.discard(stop)

    async def decode(self, data: bytes) -> tuple[np.ndarray, ImageInfo]:
        """The model's input for an encoded image, decoded on the decode pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, self.preprocess, data)

    async def predict(self, tensor: np.ndarray) -> np.ndarray:
        """Class probabilities (C,) of one input (3, H, W), batched with other requests."""
        return await asyncio.wrap_future(self.batcher.submit(tensor))

    async def classify(self, data: bytes, uri: str, options: Options) -> Outcome:
        """Decode, classify, decide and record one image. An image that cannot be read is
        recorded FAILED and its ItemError returned in the outcome, not raised."""
        started = utcnow()
        t0 = time.perf_counter()
        try:
            tensor, image = await self.decode(data)
            t1 = time.perf_counter()
            probs = await self.predict(tensor)
        except ItemError as e:
            failed = self._result(uri, options, started, ItemStatus.FAILED, error=e.info())
            await self.record(failed)
            return Outcome(failed, None, e)
        t2 = time.perf_counter()
        (d,) = decide(
            probs[None, :],
            threshold=options.threshold,
            top_k=options.top_k,
            labels=self.runtime.card.labels,
        )
        result = self._result(
            uri,
            options,
            started,
            d.status,
            label=d.label,
            label_index=d.index,
            confidence=d.confidence,
            top_k=d.top_k,
            image=image,
            timings_ms={
                "decode": round((t1 - t0) * 1e3, 3),
                "inference": round((t2 - t1) * 1e3, 3),
            },
        )
        await self.record(result)
        if self.capture is not None:
            self._capture(self.capture, data, image, probs, result)
        return Outcome(result, probs, None)

    def _capture(
        self,
        capture: CaptureWriter,
        data: bytes,
        image: ImageInfo,
        probs: np.ndarray,
        result: ItemResult,
    ) -> None:
        """Queue a sampled request for data capture without waiting: an answered request
        is never held back by the capture; one that finds the queue full, or the writer
        failed, is not captured and counted in ics_capture_dropped."""
        if result.execution_id:
            inference_id = inference_id_of(result.execution_id, result.item_id)
        else:  # record_realtime off: no execution and item ids to name it by
            inference_id = f"{REALTIME_PREFIX}{uuid.uuid4()}"
        if capture.wants(inference_id):
            captured = Captured(data, content_type_of(image.format), probs)
            if capture.reserve(captured, _NO_WAIT):
                capture.submit(inference_id, result.finished_at, captured, reserved=True)
            else:
                reason = "queue_full" if capture.error is None else "writer_failed"
                self.metrics.capture_dropped.labels(reason).inc()

    def _result(
        self,
        uri: str,
        options: Options,
        started: dt.datetime,
        status: ItemStatus,
        **fields: Any,
    ) -> ItemResult:
        """A request's result; its execution and item ids come when it is recorded."""
        return ItemResult(
            execution_id="",
            item_id="",
            uri=uri,
            status=status,
            threshold=options.threshold,
            model=self.model_ref,
            started_at=started,
            finished_at=utcnow(),
            **fields,
        )

    async def record(self, result: ItemResult) -> None:
        self.metrics.observe_result(result)
        if self.log is not None:
            await asyncio.wrap_future(self.log.append(result))

    def close(self) -> None:
        """Finish the decodes, batches and records in flight, then release the pools."""
        self.ready = False
        with self._reads_lock:
            for stop in self._reads:
                stop.set()
        self.read_pool.shutdown(wait=True)
        self.decode_pool.shutdown(wait=True)  # first: a decode may still submit to the batcher
        self.batcher.close()
        if self.log is not None:
            self.log.close()
        if self.capture is not None:
            self.capture.close()


def _solo_runtime(runtime: ModelRuntime, threads: int) -> ModelRuntime | None:
    """The same model on a session of `threads` threads, when it is an ONNX file."""
    if not threads or not isinstance(runtime, OnnxRuntime):
        return None
    return OnnxRuntime(runtime.card, runtime.path, threads=threads)


#: A stop already set: `CaptureWriter.reserve` answers at once instead of waiting for room.
_NO_WAIT = threading.Event()
_NO_WAIT.set()


class RealtimeLog:
    """Records real-time results as items of one execution per UTC day, named
    `realtime-YYYY-MM-DD`, in coalesced transactions on a thread of its own.

    A request is answered once its result is in the store.
    """

    def __init__(self, store: Store, model: ModelRef) -> None:
        self.store = store
        self.model = model
        self.owner = owner_id()
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
                self.store.heartbeat(self._execution_id)
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
            self.store.heartbeat(execution_id)
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
            self.store.finish_execution(self._execution_id, ExecutionStatus.SUCCEEDED)
        except Exception as e:
            log.error("could not end the real-time execution %s: %s", self._execution_id, e)
        self._day = None
