"""SageMaker runtime's wire format on the SageMaker routes (see `sagemaker`): errors as
botocore reads them, `CustomAttributes`, the answer in the format `Accept` asks for, and the
event stream of InvokeEndpointWithResponseStream.

Errors. botocore's rest-json parser takes the error's code from the `x-amzn-ErrorType`
header and its message from the body's `Message` (or `message`); the fields of a modeled
error (ModelError's `OriginalStatusCode`...) from the body too. ICS's own
`{"error": {"type", "message"}}` stays in the body beside them, with ICS's precise type
(InvalidImage...). ICS's errors map to SageMaker's as `aws_error` says.

Event stream. Each message is: total length and headers length (big-endian uint32), the
CRC-32 of those 8 bytes, the headers (name length byte, name, type 7 = string, value length
uint16, value), the payload, and the CRC-32 of everything before it (botocore's
`eventstream.EventStreamBuffer` checks both).
"""

from __future__ import annotations

import csv
import io
import json
import re
import struct
from binascii import crc32
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ItemError, UsageError
from ..types import ItemResult, Prediction

#: The SageMaker container's invocation path, and the runtime API's (InvokeEndpoint,
#: InvokeEndpointWithResponseStream and InvokeEndpointAsync).
INVOCATION_PATHS = re.compile(
    r"/invocations|/endpoints/[^/]+/(?:invocations(?:-response-stream)?|async-invocations)"
)

#: Where botocore reads an error's code.
ERROR_TYPE_HEADER = "x-amzn-ErrorType"
#: The request's CustomAttributes, echoed in the answer (boto3's `CustomAttributes`).
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
#: The streaming call's Accept and answer content type (its HTTP Content-Type is the stream's).
STREAM_ACCEPT = "X-Amzn-SageMaker-Accept"
STREAM_CONTENT_TYPE = "X-Amzn-SageMaker-Content-Type"
EVENT_STREAM = "application/vnd.amazon.eventstream"
#: Most bytes of the answer in one PayloadPart event.
PART_BYTES = 8192
#: SageMaker's limit on CustomAttributes (1,024 visible US-ASCII characters).
MAX_CUSTOM_ATTRIBUTES = 1024

JSON = "application/json"
JSON_LINES = "application/jsonlines"
CSV = "text/csv"
#: Media ranges (lower case) → the answer's media type; the first is the default.
MEDIA_RANGES = {
    "*/*": JSON,
    "application/*": JSON,
    JSON: JSON,
    JSON_LINES: JSON_LINES,
    "application/x-jsonlines": JSON_LINES,
    "text/*": CSV,
    CSV: CSV,
}

#: ICS error types answered under their own code and status (401/403 of the signature check,
#: an unknown target model).
KEPT = frozenset({"Unauthorized", "Forbidden", "ModelNotFound"})
#: The server is full: retry after Retry-After.
THROTTLED = frozenset({"QueueFull", "ServerBusy"})
#: The model cannot answer yet.
NOT_READY = frozenset({"ModelNotPrepared"})
#: Statuses of a request refused as it arrives, kept under ValidationError.
TRANSPORT_STATUSES = frozenset({408, 413})
#: The model's answer did not come: it failed on the batch, a remote model refused it (its
#: ModelError), or it did not come within request_timeout_s.
MODEL_FAILED = frozenset({"InferenceError", "Timeout", "ModelError"})


class BadRequest(UsageError):
    """A request SageMaker's rules refuse (ValidationError on the SageMaker routes)."""


class NotAcceptable(BadRequest):
    http_status = 406


#: The SageMaker API's path (JSON 1.1: every action is a POST to /; `sagemaker_control`).
CONTROL_PATH = "/"


def speaks_sagemaker(path: str, method: str | None = None) -> bool:
    """Whether errors on this path take SageMaker's wire format: the runtime's routes, and
    a POST to the SageMaker API's `/` (a GET of `/` is the console's page). botocore reads
    both from x-amzn-ErrorType and `Message`."""
    if path == CONTROL_PATH:
        return method == "POST"
    return INVOCATION_PATHS.fullmatch(path) is not None


def _item_errors() -> dict[str, type[ItemError]]:
    """ItemError and its subclasses, by name (an item's recorded error type)."""
    kinds: dict[str, type[ItemError]] = {}
    todo: list[type[ItemError]] = [ItemError]
    while todo:
        cls = todo.pop()
        kinds[cls.__name__] = cls
        todo += cls.__subclasses__()
    return kinds


def _item_kinds() -> frozenset[str]:
    return frozenset(_item_errors())


def status_of(kind: str) -> int:
    """The HTTP status of a recorded item error's type (500 for a type ICS does not know)."""
    cls = _item_errors().get(kind)
    return 500 if cls is None else cls.http_status


# --- errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsError:
    """An error as SageMaker answers it: its code (x-amzn-ErrorType), status and body."""

    code: str
    status: int
    body: dict[str, Any]

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**(extra or {}), ERROR_TYPE_HEADER: self.code}


def aws_error(status: int, kind: str, message: str, *, record: str | None = None) -> AwsError:
    """SageMaker's error for ICS's (its status, type and message).

    - ValidationError (400): a request ICS cannot take whatever its image (a bad Accept or
      CustomAttributes...): every other 4xx. A body over max_body_bytes (413) or slower
      than body_timeout_s (408) keeps its status.
    - ModelError (424): the model could not take the image (not an image, too large...),
      failed on it, or gave no answer in time; `OriginalStatusCode` and `OriginalMessage`
      are ICS's own, `LogStreamArn` the path of the request's record (`record`), if any.
    - ThrottlingException (503, Retry-After kept): the queue is full.
    - ModelNotReadyException (429): the model is not ready; ServiceUnavailable (503): the
      model runtime is unavailable for now, or the server is stopping.
    - InternalFailure (500): anything else of 5xx (the store failed, a bug).
    - 401/403 of authentication and 404 of an unknown target model keep ICS's type and status.
    """
    ics = {"type": kind, "message": message}
    if kind in KEPT:
        return AwsError(kind, status, {"Message": message, "error": ics})
    if kind in THROTTLED:
        return AwsError("ThrottlingException", 503, {"Message": message, "error": ics})
    if kind in NOT_READY:
        return AwsError("ModelNotReadyException", 429, {"Message": message, "error": ics})
    items = _item_kinds()
    if kind in items and status == 503:
        return AwsError("ServiceUnavailable", 503, {"Message": message, "error": ics})
    if kind in MODEL_FAILED or (kind in items and status < 500):
        return model_error(status, kind, message, record=record)
    if status >= 500:
        return AwsError("InternalFailure", 500, {"Message": message, "error": ics})
    # A body refused as too large or too slow keeps its status, which HTTP clients act on.
    kept = status if status in TRANSPORT_STATUSES else 400
    return AwsError("ValidationError", kept, {"Message": message, "error": ics})


def model_error(status: int, kind: str, message: str, *, record: str | None) -> AwsError:
    """ModelError (424), worded as SageMaker words a container's error."""
    side = "client" if status < 500 else "server"
    original = f"{kind}: {message}"
    where = (
        f"See {record} (ICS's record of this request) for more information."
        if record is not None
        else "ICS did not record it (record_realtime is off); its request log has the line."
    )
    body: dict[str, Any] = {
        "Message": f'Received {side} error ({status}) from model with message "{original}". '
        + where,
        "OriginalStatusCode": status,
        "OriginalMessage": original,
        "error": {"type": kind, "message": message},
    }
    if record is not None:
        body["LogStreamArn"] = record
    return AwsError("ModelError", 424, body)


def record_of(result: ItemResult) -> str | None:
    """The API path of a recorded request's result (None when it was not recorded)."""
    if not result.execution_id or not result.item_id.isdigit():
        return None
    return f"/v1/executions/{result.execution_id}/results?after={int(result.item_id) - 1}&limit=1"


# --- CustomAttributes ----------------------------------------------------------------


@dataclass(frozen=True)
class Attributes:
    """What ICS understands of a request's CustomAttributes: `top_k=N` (the answer holds the N
    most probable classes) and `threshold=X` (the confidence the decision is taken at)."""

    raw: str | None = None
    threshold: float | None = None
    top_k: int | None = None


def custom_attributes(raw: str | None, classes: int) -> Attributes:
    """The attributes of a CustomAttributes header: `key=value` pairs separated by `,` or
    `;`. Other keys are the client's own and pass unread; a bad top_k or threshold is a
    BadRequest."""
    if raw is None:
        return Attributes()
    if len(raw) > MAX_CUSTOM_ATTRIBUTES or not raw.isascii():
        raise BadRequest(
            f"CustomAttributes must be at most {MAX_CUSTOM_ATTRIBUTES:,} US-ASCII characters"
        )
    threshold: float | None = None
    top_k: int | None = None
    for pair in re.split(r"[,;]", raw):
        key, sep, value = pair.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "top_k":
            if not sep or not value.isdigit() or not 1 <= int(value) <= classes:
                raise BadRequest(
                    f"CustomAttributes top_k={value!r}: give a whole number from 1 to {classes} "
                    "(the answer holds that many of the most probable classes)"
                )
            top_k = int(value)
        elif key == "threshold":
            try:
                threshold = float(value)
            except ValueError:
                threshold = None
            if threshold is None or not 0.0 <= threshold <= 1.0:
                raise BadRequest(
                    f"CustomAttributes threshold={value!r}: give a number from 0 to 1 (the "
                    "top confidence at or above which an image is SUCCEEDED)"
                )
    return Attributes(raw, threshold, top_k)


# --- Accept and the answer -----------------------------------------------------------


def negotiate(accept: str | None) -> str:
    """The answer's media type for an Accept header (the most preferred one ICS can give);
    NotAcceptable when it admits none."""
    if accept is None or not accept.strip():
        return JSON
    best: tuple[float, str] | None = None
    for media_range in accept.split(","):
        kind, *params = (p.strip() for p in media_range.split(";"))
        media = MEDIA_RANGES.get(kind.lower())
        quality = _quality(params)
        if media is not None and quality > 0 and (best is None or quality > best[0]):
            best = (quality, media)
    if best is None:
        raise NotAcceptable(
            f"cannot answer Accept: {accept}: the class probabilities come as "
            f"{JSON} (the default), {JSON_LINES} or {CSV}"
        )
    return best[1]


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def render(
    media: str, probs: np.ndarray, top: Sequence[Prediction] | None, labels: Sequence[str]
) -> bytes:
    """The answer in `media`: without `top`, every class's probability in class order (in
    JSON the bare array of floats, as the original ClassifyImage Lambda reads it); with
    `top` (the top_k CustomAttributes asked for), those classes, most probable first. JSON
    Lines and CSV have one row per class: index, label, probability."""
    if top is not None:
        rows = [(p.index, p.label, p.confidence) for p in top]
    elif media == JSON:
        return json.dumps(probs.tolist()).encode()
    else:
        rows = list(zip(range(len(probs)), labels, probs.tolist(), strict=True))
    if media == JSON:
        return json.dumps([_row(*row) for row in rows]).encode()
    if media == JSON_LINES:
        return "".join(json.dumps(_row(*row)) + "\n" for row in rows).encode()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("index", "label", "probability"))
    writer.writerows(rows)
    return out.getvalue().encode()


def _row(index: int, label: str, probability: float) -> dict[str, Any]:
    return {"index": index, "label": label, "probability": probability}


# --- event stream --------------------------------------------------------------------


def event_message(headers: Iterable[tuple[str, str]], payload: bytes) -> bytes:
    """One event-stream message of string headers and a payload."""
    encoded = b"".join(
        struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v
        for n, v in ((name.encode(), value.encode()) for name, value in headers)
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", crc32(message))


def payload_parts(answer: bytes, size: int = PART_BYTES) -> Iterator[bytes]:
    """The answer as PayloadPart events of at most `size` bytes each (at least one)."""
    for start in range(0, max(len(answer), 1), size):
        yield event_message(
            [
                (":event-type", "PayloadPart"),
                (":content-type", "application/octet-stream"),
                (":message-type", "event"),
            ],
            answer[start : start + size],
        )
