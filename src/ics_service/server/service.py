"""What the HTTP routes call: decode on the decode pool, classify in dynamic batches, decide,
record. One `Service` per server; every protocol (v1, SageMaker, v2) goes through it, so
they share the decode pools and memory budget, the store and the capture. Each model it
serves (`ServedModel`) has its own runtime and batcher, and can be loaded, reloaded or
unloaded while the server runs without failing a request in flight.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .. import sources
from ..capture import inference_id_of, open_capture
from ..capture.record import content_type_of
from ..config import CPU_MAX_BATCH, CUDA_MAX_BATCH, Settings, default
from ..engine.batcher import Batcher, QueueFull
from ..engine.execution import REALTIME_PREFIX
from ..engine.lifecycle import owner_of
from ..engine.pipeline import default_workers, plan_inference
from ..engine.realtime import RealtimeLog
from ..engine.results import item_result
from ..errors import ItemError, ModelBusy, ModelNotFound, UsageError
from ..imaging import Limits, Preprocessor
from ..models.runtime import ModelRuntime, OnnxRuntime, available_cpus
from ..policies import Decision, decide
from ..store import Store
from ..types import (
    Captured,
    ErrorInfo,
    ImageInfo,
    ItemResult,
    ModelRef,
    utcnow,
)
from .allowed import confine
from .metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Opens a registered model by name, its card and file read from disk (`POST
#: /v1/models/NAME/load`).
Loader = Callable[[str], "ModelRuntime"]

#: How long a client should wait before trying again when the queue is full.
RETRY_AFTER_S = 1
#: `uri` reads run at once, on threads of their own: never on the decode pool, so that a
#: slow source cannot hold the decoding (or the model) of other requests.
READ_WORKERS = 8
#: `uri` reads that may wait for a read thread; beyond, 503 with Retry-After.
READ_QUEUE = 32
#: How often a `uri` read asks whether its client is still there.
GONE_POLL_S = 0.25


@dataclass(frozen=True)
class Options:
    """What one request may change of the settings."""

    threshold: float
    top_k: int


def plan_serving(settings: Settings) -> tuple[int, int]:
    """(intra-op threads, inference workers) of a server's model: as a batch run's."""
    return plan_inference(settings.inference_threads, settings.inference_workers)


#: Inference workers of a model on a CUDA device unless inference_workers says otherwise:
#: one runs a batch on the GPU while the other gathers the next.
CUDA_WORKERS = 2


def on_cuda(runtime: ModelRuntime) -> bool:
    """Whether the runtime runs its model on a CUDA device."""
    device = getattr(runtime, "device", None)
    return bool(getattr(device, "is_cuda", False))


def max_batch(settings: Settings, runtime: ModelRuntime) -> int:
    """The server's batch limit for this runtime: max_batch_size, or its device's default,
    and never over the runtime's own `max_batch` (a v2 model whose batch axis is fixed)."""
    default = CUDA_MAX_BATCH if on_cuda(runtime) else CPU_MAX_BATCH
    size = settings.max_batch_size or default
    most = getattr(runtime, "max_batch", None)
    return min(size, most) if most else size


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
    """What every served model shares (the decode and read pools, the store and its
    real-time log, the capture, the metrics), and the models themselves by name: the
    first is the default, which answers the routes that name none."""

    def __init__(
        self,
        settings: Settings,
        runtimes: Sequence[ModelRuntime],
        store: Store,
        metrics: Metrics,
        *,
        loader: Loader | None = None,
        card_thresholds: bool = False,
    ) -> None:
        if not runtimes:
            raise ValueError("a server serves at least one model")
        self.settings = settings
        #: When the server started (the SageMaker endpoint's creation time).
        self.started = utcnow()
        self.store = store
        self.metrics = metrics
        self.loader = loader
        #: Each model's default threshold is its card's (see `ServedModel.threshold`).
        self.card_thresholds = card_thresholds
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_workers or default_workers(), thread_name_prefix="ics-decode"
        )
        self.read_pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="ics-read")
        #: The stop events of the `uri` reads queued or running (see `read`).
        self._reads: set[threading.Event] = set()
        self._reads_lock = threading.Lock()
        self._confine = confine(settings.allowed_sources)
        first = runtimes[0].card
        self.default_name = first.name
        # One real-time execution a day whatever the model: each result names its own.
        self.log = (
            RealtimeLog(store, ModelRef(name=first.name, version=first.version), owner_of(settings))
            if settings.record_realtime
            else None
        )
        #: Set as the server closes: a capture upload then makes one attempt, no retries.
        self.closing = threading.Event()
        self.capture = open_capture(settings, self.closing)
        if self.capture is not None:
            capture = self.capture
            metrics.track_capture(lambda: capture.error is not None)
        #: Guards `models` and each model's users: a request takes its model and becomes
        #: one of its users at once, so a swap never closes a model a request has taken.
        self._lock = threading.Lock()
        self.models: dict[str, ServedModel] = {}
        #: Models swapped out or unloaded, still finishing their requests.
        self._retiring: dict[ServedModel, threading.Thread] = {}
        for runtime in runtimes:
            if runtime.card.name in self.models:
                raise UsageError(f"model {runtime.card.name!r} is named twice: serve it once")
            self._switch(ServedModel(self, runtime))
        self._admin: asyncio.Lock | None = None
        self.ready = True

    # --- the models -----------------------------------------------------------------------

    @property
    def default(self) -> ServedModel:
        """The default model (routes that name none)."""
        return self.model(None)

    def served(self) -> list[ServedModel]:
        """The served models, the default first, then by name."""
        with self._lock:
            return [self.models[name] for name in self._names()]

    def _names(self) -> list[str]:
        return [self.default_name, *sorted(n for n in self.models if n != self.default_name)]

    def serves(self, name: str) -> bool:
        """Whether a model of that name is served now."""
        with self._lock:
            return name in self.models

    def model(self, name: str | None) -> ServedModel:
        """The served model of that name (None: the default), or ModelNotFound (a 404)."""
        with self._lock:
            return self._model(name)

    def _model(self, name: str | None) -> ServedModel:
        found = self.models.get(self.default_name if name is None else name)
        if found is None:
            served = ", ".join(repr(n) for n in self._names())
            raise ModelNotFound(f"unknown model {name!r}: this server serves {served}")
        return found

    @contextmanager
    def using(self, name: str | None) -> Iterator[ServedModel]:
        """The model of that name (None: the default), held for the request: swapped out
        meanwhile, it finishes the request before it closes."""
        with self._lock:
            model = self._model(name)
            model.users += 1
        try:
            yield model
        finally:
            with self._lock:
                model.users -= 1
                if model.users == 0:
                    model.idle.notify_all()

    async def load(self, name: str) -> tuple[ServedModel, bool]:
        """Load the registered model `name` (its card and file read again from disk) beside
        the one serving under that name, if any, then switch to it: requests from then on
        go to the new one, while the old one finishes its own and closes. Returns the new
        model and whether it replaced one."""
        if self.loader is None:
            raise UsageError("this server was started with its models given: it loads none")
        loader = self.loader
        if self._admin is None:
            self._admin = asyncio.Lock()
        async with self._admin:  # one load or unload at a time
            model = await asyncio.to_thread(lambda: ServedModel(self, loader(name)))
            if model.name != name:
                await asyncio.to_thread(model.close)
                raise UsageError(f"loading {name!r} gave model {model.name!r}")
            with self._lock:
                old = self.models.get(name)
                self._switch(model)
            if old is not None:
                self._retire(old)
            log.info("model %s %s", name, "reloaded" if old is not None else "loaded")
            return model, old is not None

    async def unload(self, name: str) -> None:
        """Stop serving `name`: requests from then on answer 404; those in flight finish."""
        if name == self.default_name:
            raise ModelBusy(
                f"model {name!r} is the default model (routes that name none use it): it "
                f"cannot be unloaded; POST /v1/models/{name}/load reloads it in place"
            )
        if self._admin is None:
            self._admin = asyncio.Lock()
        async with self._admin:
            with self._lock:
                old = self._model(name)
                del self.models[name]
            self.metrics.untrack_queue(name)
            self._retire(old)
            log.info("model %s unloaded", name)

    def _switch(self, model: ServedModel) -> None:
        self.models[model.name] = model
        batcher = model.batcher
        self.metrics.track_queue(model.name, lambda: batcher.depth)

    def _retire(self, model: ServedModel) -> None:
        """Close the model once its last request is done, on a thread of its own."""

        def drain() -> None:
            with self._lock:
                while model.users:
                    model.idle.wait()
            model.close()
            with self._lock:
                self._retiring.pop(model, None)

        thread = threading.Thread(target=drain, name=f"ics-retire-{model.name}", daemon=True)
        with self._lock:
            self._retiring[model] = thread
        thread.start()

    # --- what requests share --------------------------------------------------------------

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        """The awaitable's result, or TimeoutError (a 504) after request_timeout_s."""
        return await asyncio.wait_for(awaitable, self.settings.request_timeout_s)

    def options(self, threshold: float | None = None, top_k: int | None = None) -> Options:
        return Options(
            threshold=self.settings.threshold if threshold is None else threshold,
            top_k=self.settings.top_k if top_k is None else top_k,
        )

    async def read(self, uri: str, gone: Callable[[], Awaitable[bool]] | None = None) -> bytes:
        """The bytes of a checked `uri` input, read on the read pool within
        request_timeout_s (a 504 beyond) and http_timeout_s (a 503). A request that gives
        up, whose client is gone (`gone()` true, asked every GONE_POLL_S), or a server that
        stops, ends its read within a fraction of a second; redirects are followed only
        under allowed_sources."""
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
        # uvicorn does not cancel a request whose client left: without a watch, its read
        # would hold a read slot until a deadline.
        watch = None if gone is None else asyncio.create_task(_stop_when_gone(gone, stop))
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), self.settings.request_timeout_s
            )
        finally:
            stop.set()
            if watch is not None:
                watch.cancel()

    def _read_done(self, stop: threading.Event) -> None:
        with self._reads_lock:
            self._reads.discard(stop)

    async def record(self, result: ItemResult) -> None:
        self.metrics.observe_result(result)
        if self.log is not None:
            await asyncio.wrap_future(self.log.append(result))

    def capture_request(
        self,
        data: bytes,
        image: ImageInfo,
        probs: np.ndarray,
        result: ItemResult,
    ) -> None:
        """Queue a sampled request for data capture without waiting: an answered request
        is never held back by the capture; one that finds the queue full, or the writer
        failed, is not captured and counted in ics_capture_dropped."""
        capture = self.capture
        if capture is None:
            return
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

    def close(self) -> None:
        """Finish the decodes, batches and records in flight, then release the pools."""
        self.ready = False
        self.closing.set()
        with self._reads_lock:
            for stop in self._reads:
                stop.set()
        self.read_pool.shutdown(wait=True)
        self.decode_pool.shutdown(wait=True)  # first: a decode may still submit to a batcher
        with self._lock:
            serving = list(self.models.values())
            retiring = list(self._retiring.values())
        for model in serving:
            model.close()
        for thread in retiring:
            thread.join()
        if self.log is not None:
            self.log.close()
        if self.capture is not None:
            self.capture.close()


class ServedModel:
    """One model of the server: its runtime, preprocessing and dynamic batcher, and how
    many requests hold it (`Service.using`)."""

    def __init__(self, service: Service, runtime: ModelRuntime) -> None:
        self.service = service
        self.settings = service.settings
        self.runtime = runtime
        card = runtime.card
        self.name = card.name
        self.model_ref = ModelRef(name=card.name, version=card.version)
        #: Where the model runs ("cpu", "cuda:0"), for runtimes that run it here.
        self.device: str | None = getattr(getattr(runtime, "device", None), "name", None)
        self.preprocess = Preprocessor.for_runtime(runtime, Limits.from_settings(self.settings))
        settings = self.settings
        workers = plan_serving(settings)[1]
        solo = solo_threads(settings)
        if on_cuda(runtime):
            # The GPU runs the batches: fewer, fuller ones, and no second session.
            workers, solo = settings.inference_workers or CUDA_WORKERS, 0
        self.batcher = Batcher(
            runtime,
            solo=_solo_runtime(runtime, solo),
            max_batch_size=max_batch(settings, runtime),
            max_delay_s=settings.max_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            workers=workers,
            on_batch=functools.partial(service.metrics.observe_batch, card.name),
        )
        #: Requests holding this model; guarded by the service's lock.
        self.users = 0
        self.idle = threading.Condition(service._lock)

    @property
    def threshold(self) -> float:
        """The model's default threshold: the settings' threshold, or with card_thresholds
        (`ics serve` when no file, variable or flag set one) its card's own, else the
        setting's default."""
        if not self.service.card_thresholds:
            return self.settings.threshold
        own = self.runtime.card.threshold
        return own if own is not None else float(default("threshold"))

    def options(self, threshold: float | None = None, top_k: int | None = None) -> Options:
        return self.service.options(self.threshold if threshold is None else threshold, top_k)

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        return await self.service.bounded(awaitable)

    async def decode(self, data: bytes) -> tuple[np.ndarray, ImageInfo]:
        """The model's input for an encoded image, decoded on the decode pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.service.decode_pool, self.preprocess, data)

    async def predict(self, tensor: np.ndarray) -> np.ndarray:
        """Class probabilities (C,) of one input (the card's input_shape), batched with other
        requests."""
        return await asyncio.wrap_future(self.batcher.submit(tensor))

    async def infer(self, tensor: np.ndarray) -> np.ndarray:
        """`predict`, counted in the model's statistics as `classify` counts an image."""
        t0 = time.perf_counter()
        try:
            probs = await self.predict(tensor)
        except BaseException:
            self._observe(False, t0)
            raise
        self._observe(True, t0)
        return probs

    def _observe(self, ok: bool, t0: float) -> None:
        self.service.metrics.observe_input(self.name, ok, time.perf_counter() - t0)

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
            self._observe(False, t0)
            failed = self._result(uri, e.info(), options, started)
            await self.service.record(failed)
            return Outcome(failed, None, e)
        except BaseException:  # the queue is full, the request timed out or was cancelled
            self._observe(False, t0)
            raise
        t2 = time.perf_counter()
        self._observe(True, t0)
        card = self.runtime.card
        (d,) = decide(
            probs[None, :],
            threshold=options.threshold,
            top_k=options.top_k,
            labels=card.labels,
            label_thresholds=card.decision_thresholds(options.threshold),
        )
        result = self._result(
            uri,
            d,
            options,
            started,
            image=image,
            timings_ms={"decode": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3},
        )
        await self.service.record(result)
        self.service.capture_request(data, image, probs, result)
        return Outcome(result, probs, None)

    def _result(
        self,
        uri: str,
        outcome: Decision | ErrorInfo,
        options: Options,
        started: dt.datetime,
        **fields: Any,
    ) -> ItemResult:
        """A request's result; its execution and item ids come when it is recorded."""
        return item_result(
            uri,
            outcome,
            threshold=options.threshold,
            model=self.model_ref,
            started_at=started,
            **fields,
        )

    def close(self) -> None:
        """Finish the batches queued, then release the runtime (when it holds resources)."""
        self.batcher.close()
        for runtime in (self.runtime, self.batcher.solo):
            close = getattr(runtime, "close", None)
            if callable(close):
                close()


def _solo_runtime(runtime: ModelRuntime, threads: int) -> ModelRuntime | None:
    """The same model on a session of `threads` threads, when it is an ONNX file."""
    if not threads or not isinstance(runtime, OnnxRuntime):
        return None
    return OnnxRuntime(runtime.card, runtime.path, threads=threads, device=runtime.device)


async def _stop_when_gone(gone: Callable[[], Awaitable[bool]], stop: threading.Event) -> None:
    while not stop.is_set():
        if await gone():
            stop.set()
            return
        await asyncio.sleep(GONE_POLL_S)


#: A stop already set: `CaptureWriter.reserve` answers at once instead of waiting for room.
_NO_WAIT = threading.Event()
_NO_WAIT.set()
