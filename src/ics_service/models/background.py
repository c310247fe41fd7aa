"""Opening a prepared model on a thread, while the caller imports what its store needs.

onnxruntime builds a session (reading the file, optimising the graph) in C++ without the
GIL: on a thread it costs a command's start-up nothing while the main thread imports
SQLAlchemy (measured: a 60 ms session alongside a 130 ms SQLAlchemy import took
130 ms). Only the session is built there. onnxruntime itself is imported first, on the
caller's thread, so that the thread imports nothing; and a model that is not
prepared yet is prepared as before, by `result()` on the caller's thread (that imports
torch); so is a model of another kind than ONNX opened.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..modelcard import ModelCard
from .device import CPU, Device
from .digests import check_sha256
from .factory import load_runtime, onnx_file
from .remote import RemoteOptions
from .runtime import ModelRuntime, OnnxRuntime


class RuntimeLoading:
    """A model runtime being opened; `result()` waits for it and raises what opening raised."""

    def __init__(
        self,
        card: ModelCard,
        models_dir: Path,
        *,
        threads: int = 0,
        device: Device = CPU,
        remote: RemoteOptions | None = None,
    ) -> None:
        self.card = card
        self.device = device
        self._remote = remote
        self._runtime: ModelRuntime | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._models_dir, self._threads = models_dir, threads
        path = onnx_file(card, models_dir)
        if card.kind != "onnx" or not path.is_file():
            # result() prepares it, or opens a runtime of another kind (or says why it
            # cannot): the caller checks its other settings first.
            return
        import onnxruntime  # noqa: F401  # here, not on the thread (see the module's doc)

        self._thread = threading.Thread(
            target=self._open, args=(path, threads), name="ics-model-open", daemon=True
        )
        self._thread.start()

    def _open(self, path: Path, threads: int) -> None:
        try:
            check_sha256(self.card, path)  # hashlib lets the caller's thread run meanwhile
            self._runtime = OnnxRuntime(self.card, path, threads=threads, device=self.device)
        except BaseException as e:  # raised by result(), in the caller's thread
            self._error = e

    def result(self) -> ModelRuntime:
        if self._thread is None and self._runtime is None:
            self._runtime = load_runtime(
                self.card,
                self._models_dir,
                threads=self._threads,
                device=self.device,
                remote=self._remote,
            )
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._runtime is not None
        return self._runtime
