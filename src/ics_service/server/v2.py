"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API): health, metadata and
inference, with Triton's classification and binary tensor data extensions.

The model takes one of two inputs per request: `INPUT`, encoded images (BYTES, shape [N] or
[N, 1]), decoded, classified and recorded like /v1/classify results; or `INPUT_TENSOR`, the
model's own input (FP32, [N, 3, H, W] as the card says), classified but not recorded (there is
no image). Both go through the service's dynamic batcher. Its output `probabilities` is FP32
[N, C], or with `"parameters": {"classification": k}` BYTES [N, k] of "score:index:label".

Errors are `{"error": "message"}` as the protocol writes them: tritonclient reads `error` as a
string (it cannot print the ICS API's `{"type", "message"}` object).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from .. import __version__
from ..errors import ItemError
from ..modelcard import ModelCard
from ..policies import decide
from .jsonbody import BadJson, parse_json
from .service import Service

log = logging.getLogger(__name__)

SERVER_NAME = "ics"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["classification", "binary_tensor_data"]
#: The input of encoded images (JPEG, PNG... bytes), one element per image.
IMAGES = "INPUT"
#: The input of preprocessed images: the model's own input tensor.
TENSOR = "INPUT_TENSOR"
#: Images (or tensors) one request may hold.
MAX_INPUTS = 256
OUTPUT = "probabilities"
#: Binary tensor data extension: the length of the JSON header that starts the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
_U32 = struct.Struct("<I")


class ProtocolError(Exception):
    """An error of this protocol, answered `{"error": message}` with its HTTP status (by the
    app's handler, as every error: see errors.py)."""

    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


router = APIRouter()


# --- health and metadata ------------------------------------------------------------------


def _running(request: Request) -> Service | None:
    service: Service | None = getattr(request.app.state, "service", None)
    return service if service is not None and service.ready else None


def _model(request: Request, name: str, version: str | None = None) -> Service:
    """The service of the model `name` (and `version`), or a 404 (503 while it loads)."""
    service = _running(request)
    if service is None:
        raise ProtocolError(503, "the model is not loaded yet, or the server is stopping")
    card = service.runtime.card
    if name != card.name:
        raise ProtocolError(404, f"unknown model {name!r}: this server serves {card.name!r}")
    if version is not None and version != card.version:
        raise ProtocolError(
            404, f"model {name!r} has no version {version!r}; its versions: [{card.version!r}]"
        )
    return service


@router.get("/v2/health/live", summary="Open Inference Protocol: the server is live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Open Inference Protocol: the server is ready (its model is loaded)",
    responses={503: {"description": "not ready: the model is not loaded"}},
)
async def ready(request: Request) -> Response:
    ok = _running(request) is not None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2", summary="Open Inference Protocol: server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def model_metadata(card: ModelCard) -> dict[str, Any]:
    size = card.input_size
    return {
        "name": card.name,
        "versions": [card.version],
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(card.labels)]}],
    }


@router.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata")
async def metadata(request: Request, name: str) -> dict[str, Any]:
    return model_metadata(_model(request, name).runtime.card)


@router.get(
    "/v2/models/{name}/versions/{version}", summary="Open Inference Protocol: model metadata"
)
async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return model_metadata(_model(request, name, version).runtime.card)


@router.get("/v2/models/{name}/ready", summary="Open Inference Protocol: the model is ready")
async def model_ready(request: Request, name: str) -> dict[str, Any]:
    _model(request, name)
    return {"name": name, "ready": True}


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    summary="Open Inference Protocol: the model is ready",
)
async def version_ready(request: Request, name: str, version: str) -> dict[str, Any]:
    _model(request, name, version)
    return {"name": name, "ready": True}


# --- inference ----------------------------------------------------------------------------

_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"{HEADER_LENGTH} bytes of JSON, then the binary tensors",
            },
        },
    }
}


@router.post(
    "/v2/models/{name}/infer",
    summary="Open Inference Protocol: classify encoded images (BYTES) or tensors (FP32)",
    openapi_extra=_INFER_DOC,
)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, _model(request, name))


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    summary="Open Inference Protocol: classify encoded images (BYTES) or tensors (FP32)",
    openapi_extra=_INFER_DOC,
)
async def version_infer(request: Request, name: str, version: str) -> Response:
    return await _infer(request, _model(request, name, version))


@router.api_route(
    "/v2/{rest:path}",
    methods=["GET", "POST", "PUT", "DELETE"],
    include_in_schema=False,
)
async def unsupported(request: Request, rest: str) -> Response:
    # Answered here so tritonclient reads a message (Starlette's 404 and 405 have no `error`).
    allowed = sorted(
        method
        for route in router.routes
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] == Match.PARTIAL
        for method in route.methods or ()
    )
    if allowed:
        raise ProtocolError(
            405,
            f"{request.method} is not allowed on /v2/{rest}: use {', '.join(allowed)}",
            Allow=", ".join(allowed),
        )
    raise ProtocolError(
        404,
        f"{request.method} /v2/{rest} is not part of ICS's Open Inference Protocol API: it "
        "has health, server and model metadata, model readiness and inference (extensions: "
        f"{', '.join(EXTENSIONS)})",
    )


@dataclass(frozen=True)
class Inputs:
    """One request's input: encoded images, or the model's input tensor."""

    images: list[bytes] | None = None
    tensor: np.ndarray | None = None


@dataclass(frozen=True)
class Output:
    """A requested output: `classes` > 0 for the classification extension."""

    name: str
    classes: int
    binary: bool


async def _infer(request: Request, service: Service) -> Response:
    card = service.runtime.card
    body = _decompressed(
        await request.body(),
        request.headers.get("content-encoding", ""),
        service.settings.max_body_bytes,
    )
    doc, binary = _split(body, request.headers.get(HEADER_LENGTH))
    inputs = _inputs(doc, binary, card)
    outputs = _outputs(doc)
    if inputs.images is not None:
        probs = await service.bounded(_classify_images(service, inputs.images))
    else:
        assert inputs.tensor is not None
        probs = await service.bounded(_classify_tensor(service, inputs.tensor))
    return _response(doc, card, probs, outputs)


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before tritonclient's `request_compression_algorithm`, at most
    `limit` bytes once inflated (the body limit holds for what it inflates to)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(
            400, f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(400, f"the {encoding} body cannot be inflated: {e}") from None
    if len(out) > limit:
        raise ProtocolError(413, f"the inflated request body is over max_body_bytes={limit:,}")
    if not inflater.eof:
        raise ProtocolError(400, f"the {encoding} body is truncated")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary data after it."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise ProtocolError(
                400,
                f"{HEADER_LENGTH} must be a length within the body (0 to {len(body)} bytes), "
                f"not {header_length!r}",
            )
    try:
        doc = parse_json(body[:size])
    except BadJson as e:
        hint = "" if header_length is not None else f" (binary tensors need {HEADER_LENGTH})"
        raise ProtocolError(400, f"the inference request is not valid JSON: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, 'the inference request must be a JSON object: {"inputs": [...]}')
    return doc, body[size:]


def _parameters(where: str, doc: dict[str, Any]) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(400, f"{where}: parameters must be a JSON object")
    return params


def _inputs(doc: dict[str, Any], binary: bytes, card: ModelCard) -> Inputs:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(
            400,
            f'the request needs "inputs": one input, either {IMAGES} (BYTES, encoded images) '
            f"or {TENSOR} (FP32 {_expected(card)})",
        )
    (spec,) = inputs
    name = spec.get("name")
    shape = spec.get("shape")
    datatype = spec.get("datatype")
    if name not in (IMAGES, TENSOR):
        raise ProtocolError(
            400, f"unknown input {name!r}: this model's inputs are {IMAGES} and {TENSOR}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(400, f"input {name}: shape must be a list of sizes, not {shape!r}")
    want = "BYTES" if name == IMAGES else "FP32"
    if datatype != want:
        raise ProtocolError(400, f"input {name}: datatype must be {want}, not {datatype!r}")
    raw = _binary_data(name, spec, binary)
    if name == IMAGES:
        return Inputs(images=_images(spec, shape, raw))
    return Inputs(tensor=_tensor(spec, shape, raw, card))


def _binary_data(name: str, spec: dict[str, Any], binary: bytes) -> bytes | None:
    params = _parameters(f"input {name}", spec)
    if "shared_memory_region" in params:
        raise ProtocolError(400, f"input {name}: shared memory is not supported; send the data")
    size = params.get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(
                400, f"{len(binary)} bytes of binary data but no input has a binary_data_size"
            )
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ProtocolError(400, f"input {name}: binary_data_size must be a size in bytes")
    if size != len(binary):
        raise ProtocolError(
            400,
            f"input {name}: binary_data_size is {size} but {len(binary)} bytes of binary data "
            "follow the JSON header",
        )
    if "data" in spec:
        raise ProtocolError(400, f"input {name}: give either data or binary_data_size, not both")
    return binary


def _check_count(name: str, shape: list[int]) -> None:
    # Each input costs a task and a row of probabilities: empty elements must not add up.
    if shape and shape[0] > MAX_INPUTS:
        raise ProtocolError(
            400, f"input {name}: {shape[0]} inputs in one request; at most {MAX_INPUTS}"
        )


def _images(spec: dict[str, Any], shape: list[int], raw: bytes | None) -> list[bytes]:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ProtocolError(
            400, f"input {IMAGES}: shape must be [N] or [N, 1] (one image each), not {shape}"
        )
    _check_count(IMAGES, shape)
    if raw is not None:
        images = _deserialize(raw)
    else:
        data = spec.get("data")
        if not isinstance(data, list):
            raise ProtocolError(400, f"input {IMAGES}: needs data or binary_data_size")
        strings = list(_flat(data))
        if not all(isinstance(s, str) for s in strings):
            raise ProtocolError(400, f"input {IMAGES}: JSON data of BYTES must be strings")
        images = [s.encode("utf-8", "surrogatepass") for s in strings]
    if len(images) != shape[0]:
        raise ProtocolError(
            400, f"input {IMAGES}: shape {shape} says {shape[0]} images but {len(images)} came"
        )
    return images


def _deserialize(raw: bytes) -> list[bytes]:
    """BYTES elements of the binary tensor data extension: 4-byte little-endian length, bytes."""
    out: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(400, f"input {IMAGES}: binary data ends inside a length prefix")
        (n,) = _U32.unpack_from(raw, at)
        at += 4
        if at + n > len(raw):
            raise ProtocolError(
                400, f"input {IMAGES}: element {len(out)} says {n} bytes but fewer remain"
            )
        out.append(raw[at : at + n])
        at += n
    return out


def _flat(data: list[Any]) -> Iterator[Any]:
    for x in data:
        if isinstance(x, list):
            yield from _flat(x)
        else:
            yield x


def _expected(card: ModelCard) -> str:
    return f"[-1, 3, {card.input_size}, {card.input_size}]"


def _tensor(
    spec: dict[str, Any], shape: list[int], raw: bytes | None, card: ModelCard
) -> np.ndarray:
    size = card.input_size
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise ProtocolError(
            400,
            f"input {TENSOR}: shape {shape} does not match the model's input {_expected(card)} "
            f"(N images, RGB, {size}x{size}, normalised as the model card says)",
        )
    _check_count(TENSOR, shape)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise ProtocolError(
                400, f"input {TENSOR}: shape {shape} needs {count * 4} bytes, not {len(raw)}"
            )
        tensor = np.frombuffer(raw, dtype="<f4")
    else:
        data = spec.get("data")
        if not isinstance(data, list):
            raise ProtocolError(400, f"input {TENSOR}: needs data or binary_data_size")
        try:
            tensor = np.asarray(data, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError):
            raise ProtocolError(400, f"input {TENSOR}: data must be numbers") from None
        if tensor.size != count:
            raise ProtocolError(
                400, f"input {TENSOR}: shape {shape} needs {count} numbers, not {tensor.size}"
            )
    if not np.isfinite(tensor).all():
        raise ProtocolError(400, f"input {TENSOR}: data has NaN or infinite values")
    return tensor.reshape(shape)


def _outputs(doc: dict[str, Any]) -> list[Output]:
    binary_default = _parameters("the request", doc).get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError(400, "binary_data_output must be true or false")
    requested = doc.get("outputs")
    if not requested:
        return [Output(OUTPUT, 0, binary_default)]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError(400, 'outputs must be a list of {"name": ...} objects')
    outputs = []
    for spec in requested:
        name = spec.get("name")
        if name != OUTPUT:
            raise ProtocolError(400, f"unknown output {name!r}: this model's output is {OUTPUT}")
        params = _parameters(f"output {name}", spec)
        if "shared_memory_region" in params:
            raise ProtocolError(400, f"output {name}: shared memory is not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(400, f"output {name}: binary_data must be true or false")
        classes = params.get("classification", 0)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
            raise ProtocolError(
                400, f"output {name}: classification must be a whole number of classes (k > 0)"
            )
        outputs.append(Output(name, classes, binary))
    return outputs


def _in_flight(service: Service) -> int:
    """How many inputs of one request may wait for the model at once: a batch's worth, and
    never the whole queue (a request must not refuse itself with QueueFull)."""
    settings = service.settings
    return max(1, min(settings.max_batch_size, settings.max_queue // 2))


class _InputFailed(Exception):
    def __init__(self, index: int, error: ItemError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


async def _classify_images(service: Service, images: list[bytes]) -> np.ndarray:
    """Probabilities (N, C) of encoded images, each recorded as a real-time result.

    At most a batch's worth of a request's images are in flight at once, so a request of many
    small images neither holds all their tensors nor fills the batcher's queue by itself.
    The first failure cancels the rest: it is recorded FAILED, and the request is an error.
    """
    card = service.runtime.card
    probs = np.empty((len(images), len(card.labels)), dtype=np.float32)
    options = service.options()
    slots = asyncio.Semaphore(_in_flight(service))

    async def one(i: int, data: bytes) -> None:
        uri = "request" if len(images) == 1 else f"request[{i}]"
        async with slots:
            outcome = await service.classify(data, uri, options)
            if outcome.error is not None:
                raise _InputFailed(i, outcome.error)
            probs[i] = outcome.raise_error()

    try:
        async with asyncio.TaskGroup() as group:
            for i, data in enumerate(images):
                group.create_task(one(i, data))
    except ExceptionGroup as failures:
        raise _first(failures) from None
    return probs


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    """The error to answer: the failed input of lowest index, or else the first error."""
    errors = list(_leaves(group))
    failed = sorted((e for e in errors if isinstance(e, _InputFailed)), key=lambda e: e.index)
    if not failed:
        return errors[0]
    e = failed[0].error
    # Image errors are the client's (400, as Triton answers); the model's keep their 5xx.
    status = e.http_status if e.http_status >= 500 else 400
    return ProtocolError(status, f"input {IMAGES}[{failed[0].index}]: {e.type}: {e}")


def _leaves(group: BaseExceptionGroup[Exception]) -> Iterator[Exception]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


async def _classify_tensor(service: Service, tensor: np.ndarray) -> np.ndarray:
    """Probabilities (N, C) of model inputs, one row at a time through the batcher (so they
    share batches with other requests), at most a batch's worth of them in flight."""
    probs = np.empty((len(tensor), len(service.runtime.card.labels)), dtype=np.float32)
    slots = asyncio.Semaphore(_in_flight(service))

    async def one(i: int) -> None:
        async with slots:
            probs[i] = await service.predict(tensor[i])

    try:
        async with asyncio.TaskGroup() as group:
            for i in range(len(tensor)):
                group.create_task(one(i))
    except ExceptionGroup as failures:
        raise _first(failures) from None
    return probs


def _response(
    doc: dict[str, Any], card: ModelCard, probs: np.ndarray, outputs: list[Output]
) -> Response:
    entries = []
    blobs = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name}
        blob = b""
        if out.classes:
            k = min(out.classes, probs.shape[1])
            rows = decide(probs, threshold=0.0, top_k=k, labels=card.labels)
            # Triton's classification strings: value (as C++ std::to_string), index, label.
            strings = [f"{p.confidence:f}:{p.index}:{p.label}" for d in rows for p in d.top_k]
            entry.update(datatype="BYTES", shape=[len(probs), k])
            if out.binary:
                blob = b"".join(_U32.pack(len(b)) + b for b in (s.encode() for s in strings))
            else:
                entry["data"] = strings
        else:
            entry.update(datatype="FP32", shape=list(probs.shape))
            if out.binary:
                blob = probs.astype("<f4", copy=False).tobytes()
            else:
                entry["data"] = probs.reshape(-1).tolist()
        if out.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        entries.append(entry)
    header: dict[str, Any] = {"model_name": card.name, "model_version": card.version}
    if isinstance(doc.get("id"), str):
        header["id"] = doc["id"]
    header["outputs"] = entries
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(encoded, media_type="application/json")
    return Response(
        encoded + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(encoded))},
    )
