"""The server's dynamic batcher: a lone request runs on the session over every core, work
under load on the shared single-thread session, with the same answers either way."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ics_service.engine.batcher import Batcher
from ics_service.imaging import Limits, Preprocessor
from ics_service.modelcard import ModelCard
from ics_service.models.runtime import OnnxRuntime


class Counted:
    """A real runtime that also counts the batches it ran."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.card: ModelCard = inner.card
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(len(batch))
        return self.inner.predict(batch)


def _inputs(runtime: OnnxRuntime, photos: Path) -> list[np.ndarray]:
    pre = Preprocessor(runtime.card, Limits())
    return [pre(p.read_bytes())[0] for p in sorted(photos.glob("*.jpg"))]


def test_a_lone_request_runs_on_the_solo_session(runtime: OnnxRuntime, photos: Path) -> None:
    shared = Counted(OnnxRuntime(runtime.card, runtime.path, threads=1))
    solo = Counted(OnnxRuntime(runtime.card, runtime.path, threads=2))
    batcher = Batcher(
        shared, solo=solo, max_batch_size=8, max_delay_s=0.005, max_queue=64, workers=2
    )
    try:
        tensors = _inputs(runtime, photos)
        for tensor in tensors[:3]:  # one at a time: the server is idle each time
            probs = batcher.submit(tensor).result(timeout=60)
            expected = runtime.predict(tensor[None])[0]
            np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert solo.batches == [1, 1, 1]
        assert shared.batches == []
    finally:
        batcher.close()


def test_under_load_the_workers_share_the_single_thread_session(
    runtime: OnnxRuntime, photos: Path
) -> None:
    shared = Counted(OnnxRuntime(runtime.card, runtime.path, threads=1))
    solo = Counted(OnnxRuntime(runtime.card, runtime.path, threads=2))
    batcher = Batcher(
        shared, solo=solo, max_batch_size=8, max_delay_s=0.005, max_queue=256, workers=2
    )
    try:
        tensors = _inputs(runtime, photos) * 6
        # Submitted far faster than one inference: while the first batch runs, the other
        # worker takes what waits, with a worker running.
        futures = [batcher.submit(t) for t in tensors]
        got = np.stack([f.result(timeout=120) for f in futures])
    finally:
        batcher.close()
    expected = runtime.predict(np.stack(tensors))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sum(shared.batches) + sum(solo.batches) == len(tensors)
    assert shared.batches  # the load ran on the single-thread session
    assert sum(shared.batches) > sum(solo.batches)
