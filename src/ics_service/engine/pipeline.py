"""The local executor: decode on a thread pool, overlapped with batched inference.

Decode workers pull items, read and preprocess them and put tensors on a bounded queue;
the inference loop takes whatever is ready (up to batch_size), runs the model once and
emits the results. Pillow, numpy and onnxruntime release the GIL, so the two stages run
in parallel on separate cores, and the bounded queue keeps memory flat for any number of
items.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InferenceError, ItemError
from ..imaging import Preprocessor
from ..models.runtime import ModelRuntime, available_cpus
from ..types import ErrorInfo, ImageInfo, Item, ItemResult, ItemStatus, ModelRef, utcnow
from .decide import decide

log = logging.getLogger(__name__)

Reader = Callable[[str, int], bytes]
Emit = Callable[[list[ItemResult]], None]


@dataclass(slots=True)
class _Decoded:
    item: Item
    started_at: dt.datetime
    tensor: np.ndarray | None = None
    image: ImageInfo | None = None
    error: ErrorInfo | None = None
    attempts: int = 1
    timings_ms: dict[str, float] = field(default_factory=dict)


_DONE = object()


def default_workers(inference_threads: int) -> int:
    """Decode threads: enough to keep inference fed; the OS shares the cores between them."""
    return max(2, available_cpus())


@dataclass
class Pipeline:
    """Runs items through SerializeImageData → ClassifyImage → FilterLowConfidence."""

    runtime: ModelRuntime
    preprocess: Preprocessor
    reader: Reader
    execution_id: str
    threshold: float
    top_k: int
    batch_size: int = 8
    workers: int = 0

    def __post_init__(self) -> None:
        card = self.runtime.card
        self.model_ref = ModelRef(name=card.name, version=card.version)
        self.labels = card.labels
        self.workers = self.workers or default_workers(0)

    def run(self, items: Iterable[Item], emit: Emit, stop: threading.Event | None = None) -> None:
        """Process every item (until stop is set), calling emit with each finished batch."""
        stop = stop or threading.Event()
        it = iter(items)
        lock = threading.Lock()
        q: queue.Queue[object] = queue.Queue(maxsize=self.batch_size * 2 + self.workers)

        def next_item() -> Item | None:
            if stop.is_set():
                return None
            with lock:
                return next(it, None)

        def worker() -> None:
            try:
                while (item := next_item()) is not None:
                    q.put(self._decode(item))
            except BaseException:  # an item iterator that fails must not hang the loop
                log.exception("decode worker crashed")
                stop.set()
                raise
            finally:
                q.put(_DONE)

        threads = [
            threading.Thread(target=worker, name=f"ics-decode-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in threads:
            t.start()
        try:
            self._infer_loop(q, emit)
        finally:
            stop.set()
            # Unblock workers waiting on a full queue, then wait for them.
            while any(t.is_alive() for t in threads):
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
            for t in threads:
                t.join()

    def _decode(self, item: Item) -> _Decoded:
        started = utcnow()
        d = _Decoded(item=item, started_at=started)
        t0 = time.perf_counter()
        try:
            data = self.reader(item.uri, self.preprocess.limits.max_bytes)
            t1 = time.perf_counter()
            d.tensor, d.image = self.preprocess(data)
            t2 = time.perf_counter()
            d.timings_ms = {"read": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3}
        except ItemError as e:
            d.error = e.info()
        except Exception as e:  # a bug or an unexpected library error: fail the item only
            log.exception("unexpected error on %s", item.uri)
            d.error = ErrorInfo(type="InternalError", message=f"{type(e).__name__}: {e}")
        return d

    def _infer_loop(self, q: queue.Queue[object], emit: Emit) -> None:
        card = self.runtime.card
        size = card.input_size
        buf = np.empty((self.batch_size, 3, size, size), dtype=np.float32)
        live = self.workers
        while live:
            ready: list[_Decoded] = []
            msg = q.get()
            while True:
                if msg is _DONE:
                    live -= 1
                else:
                    assert isinstance(msg, _Decoded)
                    ready.append(msg)
                if len(ready) >= self.batch_size or not live:
                    break
                try:
                    msg = q.get_nowait()
                except queue.Empty:
                    break
            if ready:
                emit(self._classify(ready, buf))

    def _classify(self, ready: list[_Decoded], buf: np.ndarray) -> list[ItemResult]:
        results: list[ItemResult] = []
        ok = [d for d in ready if d.error is None]
        for i, d in enumerate(ok):
            buf[i] = d.tensor
            d.tensor = None
        if ok:
            t0 = time.perf_counter()
            try:
                probs = self.runtime.predict(buf[: len(ok)])
            except Exception as e:
                log.exception("inference failed on a batch of %d", len(ok))
                err = InferenceError(f"model {self.model_ref.name} failed: {e}").info()
                for d in ok:
                    d.error = err
                ok = []
            else:
                per_item = (time.perf_counter() - t0) * 1e3 / len(ok)
                decisions = decide(
                    probs, threshold=self.threshold, top_k=self.top_k, labels=self.labels
                )
                for d, dec in zip(ok, decisions, strict=True):
                    d.timings_ms["inference"] = per_item
                    results.append(
                        self._result(
                            d,
                            dec.status,
                            label=dec.label,
                            label_index=dec.index,
                            confidence=dec.confidence,
                            top_k=dec.top_k,
                        )
                    )
        for d in ready:
            if d.error is not None:
                log.info(
                    "%s failed: %s: %s",
                    d.item.uri,
                    d.error.type,
                    d.error.message,
                    extra={"execution_id": self.execution_id, "item_id": d.item.item_id},
                )
                results.append(self._result(d, ItemStatus.FAILED, error=d.error))
        return results

    def _result(self, d: _Decoded, status: ItemStatus, **fields: object) -> ItemResult:
        return ItemResult(
            execution_id=self.execution_id,
            item_id=d.item.item_id,
            uri=d.item.uri,
            status=status,
            threshold=self.threshold,
            model=self.model_ref,
            started_at=d.started_at,
            finished_at=utcnow(),
            image=d.image,
            attempts=d.attempts,
            timings_ms={k: round(v, 3) for k, v in d.timings_ms.items()},
            **fields,  # type: ignore[arg-type]
        )
