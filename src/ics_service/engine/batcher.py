"""Dynamic batching in front of the model, for requests that arrive one at a time.

Each inference worker takes the oldest waiting input and whatever else is already waiting
(up to `max_batch_size`). While another worker is running the model, it also waits for
more up to `max_delay_s` after the oldest input arrived: the cores are busy then, so a
fuller batch costs no time. When the others are idle, it runs at once: on a CPU a batch is
no cheaper per image than a single input, so a lone request never waits for company. The
queue is bounded: `submit` refuses work beyond `max_queue` instead of letting memory grow.

With a `solo` runtime (the same model on a session over every core), a batch that finds
no other worker running and nothing else waiting runs on it: a lone request gets every
core, while under load each worker's single-thread session keeps its own core busy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..errors import InferenceError, ItemError
from ..models.runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """One successful model run: its size and where its time went (Triton's statistics)."""

    size: int
    #: The inputs' waits in the queue, summed: from `submit` to the run's start.
    queued_s: float
    #: Copying the inputs into the batch's tensor.
    input_s: float
    #: The model itself.
    infer_s: float
    #: Splitting the probabilities into the inputs' rows (before they are handed out).
    output_s: float


#: Called after each successful model run, before its inputs get their probabilities.
OnBatch = Callable[[BatchTimes], None]


class QueueFull(Exception):
    """More inputs are waiting for the model than the queue holds."""


@dataclass(slots=True)
class _Job:
    tensor: np.ndarray
    future: Future[np.ndarray]
    arrived: float


_CLOSE = object()


class Batcher:
    """Class probabilities for single inputs (the card's input_shape), computed in dynamic
    batches."""

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        solo: ModelRuntime | None = None,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        workers: int = 1,
        on_batch: OnBatch | None = None,
    ) -> None:
        self.runtime = runtime
        self.solo = solo
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch
        self.workers = workers
        self._q: queue.Queue[_Job | object] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._running = 0  # workers running the model now
        self._threads = [
            threading.Thread(target=self._loop, name=f"ics-batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Inputs waiting for the model."""
        return self._q.qsize()

    def submit(self, tensor: np.ndarray) -> Future[np.ndarray]:
        """Queue one input; its future gets the probabilities (C,) or the model's error."""
        job = _Job(tensor, Future(), time.monotonic())
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._q.maxsize} inputs are already waiting for the model") from None
        return job.future

    def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        for _ in self._threads:
            self._q.put(_CLOSE)
        for t in self._threads:
            t.join()

    def _loop(self) -> None:
        buf = np.empty((self.max_batch_size, *self.runtime.card.input_shape), dtype=np.float32)
        while True:
            first = self._q.get()
            if first is _CLOSE:
                return
            assert isinstance(first, _Job)
            jobs = [first]
            closing = False
            deadline = first.arrived + self.max_delay_s
            while len(jobs) < self.max_batch_size:
                wait = deadline - time.monotonic() if self._others_busy() else 0.0
                try:
                    more = self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if more is _CLOSE:
                    closing = True
                    break
                assert isinstance(more, _Job)
                jobs.append(more)
            with self._lock:
                alone = self._running == 0 and self._q.empty()
                self._running += 1
            runtime = self.solo if alone and self.solo is not None else self.runtime
            try:
                self._run(runtime, jobs, buf)
            finally:
                with self._lock:
                    self._running -= 1
            if closing:
                return

    def _others_busy(self) -> bool:
        with self._lock:
            return self._running > 0

    def _run(self, runtime: ModelRuntime, jobs: list[_Job], buf: np.ndarray) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        now = time.monotonic()
        t0 = time.perf_counter()
        for i, job in enumerate(live):
            buf[i] = job.tensor
        t1 = time.perf_counter()
        try:
            probs = runtime.predict(buf[: len(live)])
        except Exception as e:
            error = e if isinstance(e, ItemError) else InferenceError(f"the model failed: {e}")
            log.error("inference failed on a batch of %d: %s", len(live), e)
            for job in live:
                job.future.set_exception(error)
            return
        t2 = time.perf_counter()
        rows = list(probs)
        if len(rows) != len(live):
            error = InferenceError(f"the model gave {len(rows)} outputs for {len(live)} inputs")
            for job in live:
                job.future.set_exception(error)
            return
        if self.on_batch is not None:
            queued = sum(now - job.arrived for job in live)
            t3 = time.perf_counter()
            self.on_batch(BatchTimes(len(live), queued, t1 - t0, t2 - t1, t3 - t2))
        for job, row in zip(live, rows, strict=True):
            job.future.set_result(row)
