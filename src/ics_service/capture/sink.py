"""Capture as a result sink of a batch execution (see engine/recording.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import EnvironmentUnavailable
from ..types import ItemResult
from .record import inference_id_of
from .writer import CaptureWriter


@dataclass
class CaptureSink:
    """Hands the sampled items of every finished batch to the capture writer."""

    writer: CaptureWriter

    def write(self, results: Sequence[ItemResult]) -> None:
        for r in results:
            if r.captured is not None:
                # The pipeline took the item's room when it kept the bytes (reserve).
                self.writer.submit(
                    inference_id_of(r.execution_id, r.item_id),
                    r.finished_at,
                    r.captured,
                    reserved=True,
                )
                r.captured = None  # the image bytes are not kept a moment longer
        self._check()

    def close(self) -> None:
        self.writer.close()
        self._check()

    def _check(self) -> None:
        if self.writer.error is not None:
            raise EnvironmentUnavailable(
                f"data capture to {self.writer.root} failed: {self.writer.error}"
            )
