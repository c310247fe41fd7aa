"""Data capture in SageMaker Model Monitor's format: the record, the writer, the reader.

Every classified item (or a deterministic sample of them) becomes one JSON Lines record
under `{DEST}/{endpoint}/{variant}/yyyy/mm/dd/hh/`, written off the inference path.
"""

from ..types import Captured
from .reader import CaptureRecord, capture_files, iter_records
from .record import MODES, inference_id_of, is_sampled
from .writer import CaptureWriter, check_capture_folder, open_capture

__all__ = [
    "MODES",
    "CaptureRecord",
    "CaptureWriter",
    "Captured",
    "capture_files",
    "check_capture_folder",
    "inference_id_of",
    "is_sampled",
    "iter_records",
    "open_capture",
]
