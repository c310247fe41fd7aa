"""The Open Inference Protocol's wire format: a request's JSON and binary tensor data (the
extension's body layout, compression, BYTES and FP32 inputs) read into `Inputs` and the
`Output`s asked for, and probabilities written back as the response, as numbers or as the
classification extension's "score:index:label" strings.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi.responses import Response

from ..modelcard import ModelCard
from ..policies import decide
from .jsonbody import BadJson, parse_json

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


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
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


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
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


def inputs_of(doc: dict[str, Any], binary: bytes, card: ModelCard) -> Inputs:
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
    return str([-1, *card.input_shape])


def _tensor(
    spec: dict[str, Any], shape: list[int], raw: bytes | None, card: ModelCard
) -> np.ndarray:
    size = card.input_size
    if len(shape) != 4 or shape[1:] != list(card.input_shape):
        raise ProtocolError(
            400,
            f"input {TENSOR}: shape {shape} does not match the model's input {_expected(card)} "
            f"(N images, {card.channels}, {size}x{size}, {card.layout}, normalised as the "
            "model card says)",
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


def outputs_of(doc: dict[str, Any]) -> list[Output]:
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


def raw_output(out: Output, card: ModelCard, probs: np.ndarray) -> tuple[str, list[int], bytes]:
    """The output's datatype, shape and binary tensor data (as the binary tensor data
    extension and gRPC's raw_output_contents carry it)."""
    if out.classes:
        k = min(out.classes, probs.shape[1])
        strings = _class_strings(probs, card, k)
        return "BYTES", [len(probs), k], serialize_bytes(s.encode() for s in strings)
    return "FP32", list(probs.shape), probs.astype("<f4", copy=False).tobytes()


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as binary tensor data: each a 4-byte little-endian length, then it."""
    return b"".join(_U32.pack(len(b)) + b for b in elements)


def _class_strings(probs: np.ndarray, card: ModelCard, k: int) -> list[str]:
    rows = decide(probs, threshold=0.0, top_k=k, labels=card.labels)
    # Triton's classification strings: value (as C++ std::to_string), index, label.
    return [f"{p.confidence:f}:{p.index}:{p.label}" for d in rows for p in d.top_k]


def encode_response(
    doc: dict[str, Any], card: ModelCard, probs: np.ndarray, outputs: list[Output]
) -> Response:
    entries = []
    blobs = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name}
        if out.binary:
            datatype, shape, blob = raw_output(out, card, probs)
            entry.update(datatype=datatype, shape=shape)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.classes:
            k = min(out.classes, probs.shape[1])
            entry.update(datatype="BYTES", shape=[len(probs), k])
            entry["data"] = _class_strings(probs, card, k)
        else:
            entry.update(datatype="FP32", shape=list(probs.shape))
            entry["data"] = probs.reshape(-1).tolist()
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
