"""The local executor: decode on a thread pool, overlapped with batched inference.

Decode workers pull items, read and preprocess them and put tensors on a bounded queue;
the inference loop takes whatever is ready (up to batch_size), runs the model once and
emits the results. Pillow, numpy and onnxruntime release the GIL, so the two stages run
in parallel on separate cores, and the bounded queue keeps memory flat for any number of
items.

A remote model (`plan_batches`) gets `remote_concurrency` inference workers, each with one
request in flight; one sent encoded images (`takes_bytes`: a SageMaker endpoint) still has
every image read and decoded here first, so a broken image ends FAILED without a call, and
gets the bytes instead of a tensor. When it refuses a whole batch (ModelError), each image
of the batch is sent again alone, so that only the one to blame fails.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..capture import Captured
from ..capture.record import content_type_of
from ..config import RetryPolicy
from ..errors import DecodeCancelled, InferenceError, ItemError, ModelError
from ..imaging import Preprocessor
from ..models.runtime import ModelRuntime, available_cpus, takes_bytes
from ..policies import Decision, call_with_retry, decide
from ..types import ErrorInfo, ImageInfo, Item, ItemResult, ModelRef, Step, utcnow
from .results import item_result

log = logging.getLogger(__name__)


class Reader(Protocol):
    def __call__(self, uri: str, max_bytes: int, *, stop: threading.Event) -> bytes:
        """The item's bytes; a set `stop` may end the read (DecodeCancelled)."""
        ...


Emit = Callable[[list[ItemResult]], None]
#: History events: (type, item seq or None, details).
OnEvent = Callable[[str, int | None, dict[str, Any]], None]


@dataclass(slots=True)
class _Decoded:
    item: Item
    started_at: dt.datetime
    tensor: np.ndarray | None = None
    image: ImageInfo | None = None
    error: ErrorInfo | None = None
    attempts: int = 1
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: The original bytes, kept for a runtime that takes them (a remote model) and for an
    #: item that data capture samples.
    data: bytes | None = None


_DONE = object()


def default_workers() -> int:
    """Decode threads: enough to keep inference fed; the OS shares the cores between them."""
    return max(2, available_cpus())


def plan_inference(threads: int, workers: int) -> tuple[int, int]:
    """(intra-op threads, inference workers), 0 meaning automatic for either.

    By default one single-thread model session per core, each on its own batches: measured
    on 2 cores, about 1.2 times one two-thread session, which shares the cores with
    decoding less well. (A server adds a session on every core for a lone request:
    `server.service.solo_threads`.)
    """
    cpus = available_cpus()
    if not threads and not workers:
        return 1, cpus
    if not workers:
        return threads, max(1, cpus // threads)
    if not threads:
        return max(1, cpus // workers), workers
    return threads, workers


def plan_batches(
    runtime: ModelRuntime, *, batch_size: int, threads: int, workers: int, remote_concurrency: int
) -> tuple[int, int]:
    """(batch size, inference workers) for the runtime.

    A remote model (a runtime with `remote = True`) gets `remote_concurrency` workers, each
    with one request in flight, so that waiting on the network never holds up the decode
    threads; its batches are at most its `max_batch` (1 for a SageMaker endpoint, which
    takes one image per invocation). A local model gets `plan_inference`'s workers.
    """
    if getattr(runtime, "remote", False):
        most = getattr(runtime, "max_batch", None) or batch_size
        return min(batch_size, most), remote_concurrency
    return batch_size, plan_inference(threads, workers)[1]


def _error_info(e: BaseException) -> ErrorInfo:
    if isinstance(e, ItemError):
        return e.info()
    return ErrorInfo(type="InternalError", message=f"{type(e).__name__}: {e}")


@dataclass
class Pipeline:
    """Runs items through SerializeImageData → ClassifyImage → FilterLowConfidence."""

    runtime: ModelRuntime
    preprocess: Preprocessor
    reader: Reader
    execution_id: str
    threshold: float
    top_k: int
    batch_size: int
    #: Decode threads (0: `default_workers()`).
    workers: int
    #: Threads running the model at once, each on its own batches (the session is shared).
    inference_workers: int
    retry_read: RetryPolicy
    retry_classify: RetryPolicy
    on_event: OnEvent | None = None
    #: Whether data capture wants an item (its bytes and probabilities); None: capture off.
    capture: Callable[[Item], bool] | None = None
    #: Waits for room in data capture's queue (backpressure); False: the run is stopping.
    reserve_capture: Callable[[Sequence[Captured], threading.Event], bool] | None = None

    def __post_init__(self) -> None:
        card = self.runtime.card
        self.model_ref = ModelRef(name=card.name, version=card.version)
        self.labels = card.labels
        self.label_thresholds = card.decision_thresholds(self.threshold)
        self.workers = self.workers or default_workers()
        #: The runtime is sent the encoded images (a remote endpoint decodes them itself);
        #: they are still decoded here first, so a broken image never reaches it.
        self.takes_bytes = takes_bytes(self.runtime)
        self._stop = threading.Event()

    def run(self, items: Iterable[Item], emit: Emit, stop: threading.Event | None = None) -> None:
        """Process every item (until stop is set), calling emit with each finished batch."""
        stop = self._stop = stop or threading.Event()
        it = iter(items)
        lock = threading.Lock()
        q: queue.Queue[object] = queue.Queue(maxsize=self.batch_size * 2 + self.workers)
        failed = threading.Event()
        errors: list[BaseException] = []

        def put(msg: object) -> None:
            # Never block for ever: if inference died, nobody drains the queue.
            while not failed.is_set():
                try:
                    q.put(msg, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def next_item() -> Item | None:
            if stop.is_set():
                return None
            with lock:
                return next(it, None)

        def decoder() -> None:
            try:
                while (item := next_item()) is not None:
                    decoded = self._decode(item)
                    if decoded is not None:
                        put(decoded)
            except BaseException as e:  # an item iterator that fails must not hang the run
                log.exception("decode worker crashed")
                errors.append(e)
                stop.set()

        def inferer() -> None:
            try:
                self._infer_loop(q, emit)
            except BaseException as e:
                errors.append(e)
                failed.set()
                stop.set()

        decoders = [
            threading.Thread(target=decoder, name=f"ics-decode-{i}", daemon=True)
            for i in range(self.workers)
        ]
        inferers = [
            threading.Thread(target=inferer, name=f"ics-infer-{i}", daemon=True)
            for i in range(self.inference_workers)
        ]
        for t in (*decoders, *inferers):
            t.start()
        try:
            for t in decoders:
                t.join()
            for _ in inferers:
                put(_DONE)
            for t in inferers:
                t.join()
        finally:
            stop.set()
            failed.set()
        if errors:
            raise errors[0]

    def _retried(
        self, step: Step, item: Item | None
    ) -> Callable[[BaseException, int, float], None]:
        def on_retry(e: BaseException, attempt: int, delay: float) -> None:
            err = _error_info(e)
            log.info(
                "%s retry %d after %s: %s (in %.2f s)",
                step.value,
                attempt,
                err.type,
                err.message,
                delay,
                extra={
                    "execution_id": self.execution_id,
                    "item_id": None if item is None else item.item_id,
                },
            )
            if self.on_event is not None:
                self.on_event(
                    "TaskRetried",
                    None if item is None else item.seq,
                    {
                        "step": step.value,
                        "error": err.type,
                        "cause": err.message,
                        "attempt": attempt,
                        "delay_s": round(delay, 3),
                    },
                )

        return on_retry

    def _decode(self, item: Item) -> _Decoded | None:
        """The item read and decoded, or with its error; None when the run stopped first."""
        d = _Decoded(item=item, started_at=utcnow())
        timings: dict[str, float] = {}

        def attempt() -> tuple[np.ndarray | None, ImageInfo]:
            t0 = time.perf_counter()
            data = self.reader(item.uri, self.preprocess.limits.max_bytes, stop=self._stop)
            t1 = time.perf_counter()
            out: tuple[np.ndarray | None, ImageInfo]
            if self.takes_bytes:
                out = None, self.preprocess.decode(data, stop=self._stop)[1]
                d.data = data
            else:
                out = self.preprocess(data, stop=self._stop)
                if self.capture is not None and self.capture(item):
                    d.data = data
            timings["read"] = (t1 - t0) * 1e3
            timings["decode"] = (time.perf_counter() - t1) * 1e3
            return out

        try:
            (d.tensor, d.image), d.attempts = call_with_retry(
                attempt,
                self.retry_read,
                stop=self._stop,
                on_retry=self._retried(Step.SERIALIZE_IMAGE_DATA, item),
            )
        except DecodeCancelled:
            return None  # left pending: a resume decodes it
        except Exception as e:
            if not isinstance(e, ItemError):  # a bug or an unexpected library error
                log.exception("unexpected error on %s", item.uri)
            d.error = _error_info(e)
            d.attempts = getattr(e, "attempts", 1)
        d.timings_ms = timings
        return d

    def _infer_loop(self, q: queue.Queue[object], emit: Emit) -> None:
        """Take what is ready (up to batch_size), classify it, emit; until a _DONE arrives."""
        card = self.runtime.card
        buf = (
            None
            if self.takes_bytes
            else np.empty((self.batch_size, *card.input_shape), dtype=np.float32)
        )
        done = False
        while not done:
            ready: list[_Decoded] = []
            msg = q.get()
            while True:
                if msg is _DONE:
                    done = True
                    break
                assert isinstance(msg, _Decoded)
                ready.append(msg)
                if len(ready) >= self.batch_size:
                    break
                try:
                    msg = q.get_nowait()
                except queue.Empty:
                    break
            if ready:
                emit(self._classify(ready, buf))

    def _predict(self, ok: list[_Decoded], buf: np.ndarray | None) -> tuple[np.ndarray, int]:
        predict: Callable[[], np.ndarray]
        if buf is None:
            images = [d.data or b"" for d in ok]
            types = [content_type_of(None if d.image is None else d.image.format) for d in ok]

            def predict() -> np.ndarray:
                return self.runtime.predict_bytes(images, content_types=types)  # type: ignore[attr-defined, no-any-return]
        else:
            for i, d in enumerate(ok):
                buf[i] = d.tensor
                d.tensor = None
            batch = buf[: len(ok)]

            def predict() -> np.ndarray:
                return self.runtime.predict(batch)

        def attempt() -> np.ndarray:
            try:
                return predict()
            except ItemError:
                raise
            except Exception as e:
                raise InferenceError(f"model {self.model_ref.name} failed: {e}") from e

        return call_with_retry(
            attempt,
            self.retry_classify,
            stop=self._stop,
            on_retry=self._retried(Step.CLASSIFY_IMAGE, None),
        )

    def _classify(self, ready: list[_Decoded], buf: np.ndarray | None) -> list[ItemResult]:
        results: list[ItemResult] = []
        held: list[tuple[ItemResult, Captured]] = []
        ok = [d for d in ready if d.error is None]
        if ok:
            t0 = time.perf_counter()
            try:
                probs, attempts = self._predict(ok, buf)
            except Exception as e:
                if isinstance(e, ModelError) and self.takes_bytes and len(ok) > 1:
                    # A remote model refused the batch: one image may be to blame (the
                    # server decodes differently), so each is sent alone, and only its own
                    # fails.
                    log.warning("%s; sending each of the %d images alone", e, len(ok))
                    for d in ok:
                        results.extend(self._classify([d], buf))
                    return results + self._failed([d for d in ready if d not in ok])
                log.error("inference failed on a batch of %d: %s", len(ok), e)
                for d in ok:
                    d.error = _error_info(e)
                    d.attempts = max(d.attempts, getattr(e, "attempts", 1))
                    d.data = None
                ok = []
            else:
                per_item = (time.perf_counter() - t0) * 1e3 / len(ok)
                decisions = decide(
                    probs,
                    threshold=self.threshold,
                    top_k=self.top_k,
                    labels=self.labels,
                    label_thresholds=self.label_thresholds,
                )
                for i, (d, dec) in enumerate(zip(ok, decisions, strict=True)):
                    d.timings_ms["inference"] = per_item
                    d.attempts = max(d.attempts, attempts)
                    results.append(self._result(d, dec))
                    wanted = not self.takes_bytes or (
                        self.capture is not None and self.capture(d.item)
                    )
                    if wanted and d.data is not None and d.image is not None:
                        c = Captured(d.data, content_type_of(d.image.format), probs[i])
                        held.append((results[-1], c))
                    d.data = None
                # The whole batch's room at once, taken only once it is classified: a thread
                # waiting for room must hold none, or a queue smaller than a batch never frees.
                reserve = self.reserve_capture
                if held and (reserve is None or reserve([c for _, c in held], self._stop)):
                    for result, c in held:
                        result.captured = c
        return results + self._failed(ready)

    def _failed(self, ready: list[_Decoded]) -> list[ItemResult]:
        """The results of the items that failed (the others are left out)."""
        results = []
        for d in ready:
            if d.error is not None:
                log.info(
                    "%s failed: %s: %s",
                    d.item.uri,
                    d.error.type,
                    d.error.message,
                    extra={"execution_id": self.execution_id, "item_id": d.item.item_id},
                )
                results.append(self._result(d, d.error))
        return results

    def _result(self, d: _Decoded, outcome: Decision | ErrorInfo) -> ItemResult:
        return item_result(
            d.item.uri,
            outcome,
            threshold=self.threshold,
            model=self.model_ref,
            started_at=d.started_at,
            execution_id=self.execution_id,
            item_id=d.item.item_id,
            image=d.image,
            attempts=d.attempts,
            timings_ms=d.timings_ms,
            metadata=d.item.metadata,
        )
