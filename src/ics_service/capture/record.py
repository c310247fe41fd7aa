"""One capture record, exactly as SageMaker Model Monitor's data capture writes it.

```
{"captureData": {
   "endpointInput":  {"observedContentType": "image/jpeg", "mode": "INPUT",
                      "data": BASE64 OF THE ORIGINAL BYTES, "encoding": "BASE64"},
   "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                      "data": "[p0, p1, ...]", "encoding": "JSON"}},
 "eventMetadata": {"eventId": UUID, "inferenceId": "EXECUTION_ID/ITEM_ID",
                   "inferenceTime": "2026-11-29T18:20:01.123Z"},
 "eventVersion": "0"}
```

A mode that leaves a half out leaves its key out, as SageMaker does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from PIL import Image

from ..types import isoformat

Mode = Literal["input", "output", "input_and_output"]
MODES: tuple[Mode, ...] = ("input", "output", "input_and_output")
OUTPUT_CONTENT_TYPE = "application/json"
EVENT_VERSION = "0"


def inference_id_of(execution_id: str, item_id: str) -> str:
    """The inferenceId of an item: its execution and item ids, as `EXECUTION_ID/ITEM_ID`."""
    return f"{execution_id}/{item_id}"


def is_sampled(inference_id: str, percent: float) -> bool:
    """Whether the item is captured at `percent` (0 to 100): decided by a hash of its
    inference id, so a resumed execution captures the same items as the first run would."""
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(inference_id.encode("utf-8")).digest()[:8], "big")
    return h < percent / 100.0 * 2**64


def content_type_of(image_format: str | None) -> str:
    """The MIME type of a decoded image's format (JPEG → image/jpeg)."""
    if image_format:
        mime = Image.MIME.get(image_format.upper())
        if mime:
            return mime
    return "application/octet-stream"


def output_data(probs: Sequence[float]) -> str:
    """The probabilities as the SageMaker route answers them: a JSON array of floats."""
    return json.dumps(list(probs))


def capture_record(
    *,
    inference_id: str,
    inference_time: dt.datetime,
    mode: Mode,
    data: bytes,
    content_type: str,
    probs: Sequence[float],
) -> dict[str, Any]:
    """The record of one item, holding what `mode` captures."""
    capture: dict[str, Any] = {}
    if mode in ("input", "input_and_output"):
        capture["endpointInput"] = {
            "observedContentType": content_type,
            "mode": "INPUT",
            "data": base64.b64encode(data).decode("ascii"),
            "encoding": "BASE64",
        }
    if mode in ("output", "input_and_output"):
        capture["endpointOutput"] = {
            "observedContentType": OUTPUT_CONTENT_TYPE,
            "mode": "OUTPUT",
            "data": output_data(probs),
            "encoding": "JSON",
        }
    return {
        "captureData": capture,
        "eventMetadata": {
            "eventId": str(uuid.uuid4()),
            "inferenceId": inference_id,
            "inferenceTime": isoformat(inference_time.astimezone(dt.UTC)),
        },
        "eventVersion": EVENT_VERSION,
    }


def encode(record: dict[str, Any]) -> bytes:
    """One JSON line."""
    return json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"
