"""A model behind the Open Inference Protocol (KServe v2: Triton, KServe, MLServer, another
`ics serve`) as a model runtime: `v2:http(s)://HOST:PORT/v2/models/NAME[/versions/V]`.

The model's metadata says what to send: a BYTES input gets the encoded images (the server
decodes them; ICS has decoded each first, so a broken one never leaves), an FP32 input of
shape [N, 3, H, W] or [N, H, W, 3] gets the card's preprocessed tensors. Each call sends a
batch, as the binary tensor data extension's body when the server offers it (BYTES need it:
image bytes are not JSON strings), else as JSON. Answers 5xx, 429 and lost connections are
`EndpointUnavailable` (retried by the ClassifyImage policy); other refusals and answers that
do not fit the card are `ModelError`, naming the URL.
"""

from __future__ import annotations

import json
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__, fetch
from ..errors import EndpointUnavailable, EnvironmentUnavailable, ModelError, UsageError
from ..modelcard import ModelCard
from .answers import checked, error_of

#: The prefix of a v2 model spec.
PREFIX = "v2:"
#: The binary tensor data extension: the length of the JSON header that starts the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
#: The largest answer read (a header and the probabilities of a batch).
MAX_ANSWER_BYTES = 64 << 20
_U32 = struct.Struct("<I")
_FLOATS = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


@dataclass(frozen=True)
class ModelUrl:
    """A v2 model's URL and the server's, split out."""

    #: .../v2/models/NAME or .../v2/models/NAME/versions/V (metadata; + /infer to infer).
    url: str
    #: .../v2 (server metadata: the extensions).
    server: str
    name: str
    version: str | None

    def describe(self) -> str:
        return f"v2 model {self.url}"


def parse_url(spec: str) -> ModelUrl:
    """`v2:URL` or the URL itself → ModelUrl; UsageError saying what is wrong with it."""
    url = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"{spec!r} is not a v2 model URL: write v2:http(s)://HOST:PORT/v2/models/NAME"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError(
            f"{spec!r}: a v2 model URL has no user, password, query or fragment: "
            "v2:http(s)://HOST:PORT/v2/models/NAME[/versions/VERSION]"
        )
    path = parts.path.rstrip("/")
    head, sep, tail = path.rpartition("/v2/models/")
    pieces = tail.split("/") if sep else []
    if (
        not sep
        or not pieces[0]
        or len(pieces) not in (1, 3)
        or (len(pieces) == 3 and (pieces[1] != "versions" or not pieces[2]))
    ):
        raise UsageError(
            f"{spec!r} does not name a model: its path must end /v2/models/NAME or "
            "/v2/models/NAME/versions/VERSION"
        )
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, head, "", ""))
    return ModelUrl(
        url=urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")),
        server=base + "/v2",
        name=urllib.parse.unquote(pieces[0]),
        version=urllib.parse.unquote(pieces[2]) if len(pieces) == 3 else None,
    )


@dataclass(frozen=True)
class Metadata:
    """What ICS reads of a v2 model's (and its server's) metadata."""

    input_name: str
    #: "BYTES" (encoded images) or "FP32" (preprocessed tensors).
    datatype: str
    #: The input's shape, the batch axis first (-1: any).
    shape: tuple[int, ...]
    output_name: str
    #: Classes the output has, when its shape says (else read from the answer).
    classes: int | None
    #: The server offers the binary tensor data extension.
    binary: bool
    platform: str = ""
    #: The extensions the server's metadata names.
    extensions: tuple[str, ...] = ()

    @property
    def layout(self) -> str:
        """NCHW or NHWC for an FP32 input; "" for BYTES."""
        if self.datatype != "FP32":
            return ""
        return "NCHW" if self.shape[1] == 3 else "NHWC"

    @property
    def input_size(self) -> int | None:
        """The side of an FP32 input's square images."""
        if self.datatype != "FP32":
            return None
        return self.shape[2] if self.layout == "NCHW" else self.shape[1]

    @property
    def max_batch(self) -> int | None:
        return None if self.shape[0] < 0 else self.shape[0]


class _Client:
    """GET and POST to one v2 server under a deadline, as ItemErrors naming the model."""

    def __init__(self, where: str, timeout_s: float) -> None:
        self.where = where
        self.timeout_s = timeout_s
        self.fetcher = fetch.Fetcher(allow_link_local=True, user_agent=f"ics/{__version__}")

    def call(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> tuple[dict[str, str], bytes]:
        """The answer's headers and body; EndpointUnavailable or ModelError when it is not a
        success."""
        deadline = fetch.Deadline(self.timeout_s)
        try:
            with self.fetcher.open(
                method, url, deadline=deadline, headers=headers, content=content
            ) as reply:
                body = reply.body(MAX_ANSWER_BYTES)
        except fetch.FetchError as e:
            if e.transient:
                raise EndpointUnavailable(f"{self.where} cannot be reached: {e}") from None
            raise ModelError(f"{self.where}: {e}") from None
        if reply.status == 200:
            return reply.headers, body
        said = error_of(body)[1] or reply.reason
        if reply.transient:
            raise EndpointUnavailable(f"{self.where} answered {reply.status}: {said}")
        raise ModelError(f"{self.where} refused the request ({reply.status}: {said})")

    def json(self, url: str) -> Any:
        _, body = self.call("GET", url)
        try:
            return json.loads(body)
        except ValueError:
            raise ModelError(f"{self.where}: {url} did not answer JSON") from None

    def close(self) -> None:
        self.fetcher.close()


def read_metadata(model: ModelUrl, client: _Client) -> Metadata:
    """The model's input, output and the server's extensions, from their metadata; a
    ModelError (or EndpointUnavailable) saying what ICS cannot use."""
    where = model.describe()
    doc = client.json(model.url)
    try:
        server = client.json(model.server)
    except ModelError:  # a server without server metadata: no extensions known
        server = {}
    extensions = server.get("extensions", []) if isinstance(server, dict) else []
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not outputs:
        raise ModelError(f"{where}: its metadata has no inputs and outputs lists")
    usable = [i for i in inputs if isinstance(i, dict) and _usable_input(i)]
    if not usable:
        described = ", ".join(
            f"{i.get('name')} {i.get('datatype')} {i.get('shape')}"
            for i in inputs
            if isinstance(i, dict)
        )
        raise ModelError(
            f"{where} takes no input ICS can send ({described or 'none'}): ICS sends BYTES "
            "[-1] or [-1, 1] (encoded images) or FP32 [-1, 3, H, W] or [-1, H, W, 3]"
        )
    if len(inputs) > 1 and not any(i.get("datatype") == "BYTES" for i in usable):
        raise ModelError(
            f"{where} takes {len(inputs)} inputs; ICS sends one (BYTES images or an FP32 tensor)"
        )
    # Encoded images where offered: the server knows its own preprocessing best.
    chosen = next((i for i in usable if i["datatype"] == "BYTES"), usable[0])
    output = next(
        (o for o in outputs if isinstance(o, dict) and o.get("datatype") in _FLOATS), None
    )
    if output is None:
        raise ModelError(f"{where} has no floating-point output (FP16, FP32 or FP64) to read")
    out_shape = output.get("shape")
    classes = (
        out_shape[-1]
        if isinstance(out_shape, list)
        and out_shape
        and isinstance(out_shape[-1], int)
        and out_shape[-1] > 0
        else None
    )
    binary = BINARY_EXTENSION in extensions
    if chosen["datatype"] == "BYTES" and not binary:
        raise ModelError(
            f"{where} takes BYTES but its server does not offer the {BINARY_EXTENSION} "
            "extension: image bytes cannot be sent as JSON strings"
        )
    return Metadata(
        input_name=str(chosen["name"]),
        datatype=str(chosen["datatype"]),
        shape=tuple(chosen["shape"]),
        output_name=str(output["name"]),
        classes=classes,
        binary=binary,
        platform=str(doc.get("platform", "")),
        extensions=tuple(str(x) for x in extensions),
    )


def _usable_input(spec: dict[str, Any]) -> bool:
    shape = spec.get("shape")
    if not isinstance(spec.get("name"), str) or not isinstance(shape, list):
        return False
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return False
    dims: list[int] = shape
    if spec.get("datatype") == "BYTES":
        return len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)
    if spec.get("datatype") == "FP32" and len(dims) == 4:
        square = (dims[1] == 3 and dims[2] == dims[3] > 0) or (
            dims[3] == 3 and dims[1] == dims[2] > 0
        )
        return square and dims[0] != 0
    return False


class V2Runtime:
    """A model card served over the Open Inference Protocol; one request per batch.

    Thread-safe: the engine calls it from `remote_concurrency` threads at once.
    """

    remote = True

    def __init__(
        self,
        card: ModelCard,
        model: ModelUrl,
        *,
        timeout_s: float = 30.0,
        metadata: Metadata | None = None,
    ) -> None:
        self.model = model
        self.where = model.describe()
        self.client = _Client(self.where, timeout_s)
        try:
            self.meta = metadata or read_metadata(model, self.client)
        except EndpointUnavailable as e:
            self.client.close()
            raise EnvironmentUnavailable(
                f"{e}; ICS reads the model's metadata before it classifies: is the server up?"
            ) from None
        except ModelError as e:
            self.client.close()
            raise UsageError(str(e)) from None
        except BaseException:
            self.client.close()
            raise
        self.card = card
        #: "bytes": encoded images (BYTES input), else preprocessed tensors.
        self.takes = "bytes" if self.meta.datatype == "BYTES" else "tensor"
        self.max_batch = self.meta.max_batch
        self._infer_url = model.url + "/infer"

    def __repr__(self) -> str:
        return f"V2Runtime({self.card.name!r}, {self.model.url})"

    def check_card(self, card: ModelCard) -> None:
        """UsageError when the card's preprocessing cannot make the model's input (checked
        when the runtime is opened: `remote.open_remote`)."""
        size = self.meta.input_size
        if size is not None and card.input_size != size:
            raise UsageError(
                f"{self.where} takes {size}x{size} images, but model {card.name}'s card says "
                f"input_size = {card.input_size}"
            )
        layout = getattr(card, "layout", "NCHW")
        if self.meta.layout and layout != self.meta.layout:
            raise UsageError(
                f"{self.where} takes {self.meta.layout} tensors, but model {card.name}'s card "
                f"says layout = {layout}"
            )
        # Else the labels are learned from the server once it is open (remote.open_remote).
        known = card.classes is not None or card.labels_path is not None or bool(card.labels_file)
        if known and self.meta.classes is not None and self.meta.classes != len(card.labels):
            raise UsageError(
                f"{self.where} answers {self.meta.classes} class scores, but model "
                f"{card.name} has {len(card.labels)} labels: give the model's labels file"
            )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self.takes != "tensor":
            raise UsageError(f"{self.where} takes encoded images, not tensors")
        tensor = np.ascontiguousarray(batch, dtype="<f4")
        spec: dict[str, Any] = {
            "name": self.meta.input_name,
            "datatype": "FP32",
            "shape": list(tensor.shape),
        }
        if self.meta.binary:
            return self._infer(spec, tensor.tobytes(), len(tensor))
        spec["data"] = tensor.reshape(-1).tolist()
        return self._infer(spec, None, len(tensor))

    def predict_bytes(
        self, images: Sequence[bytes], *, content_types: Sequence[str] | None = None
    ) -> np.ndarray:
        if self.takes != "bytes":
            raise UsageError(f"{self.where} takes FP32 tensors, not encoded images")
        shape = [len(images)] if len(self.meta.shape) == 1 else [len(images), 1]
        spec = {"name": self.meta.input_name, "datatype": "BYTES", "shape": shape}
        raw = b"".join(_U32.pack(len(image)) + image for image in images)
        return self._infer(spec, raw, len(images))

    def _infer(self, spec: dict[str, Any], raw: bytes | None, count: int) -> np.ndarray:
        out: dict[str, Any] = {"name": self.meta.output_name}
        if self.meta.binary:
            out["parameters"] = {"binary_data": True}
        if raw is not None:
            spec["parameters"] = {"binary_data_size": len(raw)}
        doc = {"inputs": [spec], "outputs": [out]}
        header = json.dumps(doc, separators=(",", ":")).encode()
        if raw is None:
            headers = {"Content-Type": "application/json"}
            body = header
        else:
            headers = {
                "Content-Type": "application/octet-stream",
                HEADER_LENGTH: str(len(header)),
            }
            body = header + raw
        got_headers, answer = self.client.call(
            "POST", self._infer_url, headers=headers, content=body
        )
        scores = self._scores(got_headers, answer, count)
        return checked(scores, self.card, where=self.where, count=count)

    def _scores(self, headers: dict[str, str], answer: bytes, count: int) -> np.ndarray:
        length = headers.get(HEADER_LENGTH.lower())
        size = len(answer)
        if length is not None:
            if not length.isdigit() or int(length) > len(answer):
                raise ModelError(f"{self.where} answered a bad {HEADER_LENGTH}: {length!r}")
            size = int(length)
        try:
            doc = json.loads(answer[:size])
        except ValueError:
            raise ModelError(f"{self.where} answered something that is not JSON") from None
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        if not isinstance(outputs, list):
            raise ModelError(f"{self.where} answered no outputs")
        at = size
        for entry in outputs:
            if not isinstance(entry, dict):
                raise ModelError(f"{self.where} answered an output that is not an object")
            params = entry.get("parameters") or {}
            blob_size = params.get("binary_data_size") if isinstance(params, dict) else None
            blob = None
            if blob_size is not None:
                if not isinstance(blob_size, int) or at + blob_size > len(answer):
                    raise ModelError(f"{self.where} answered a bad binary_data_size")
                blob = answer[at : at + blob_size]
                at += blob_size
            if entry.get("name") == self.meta.output_name:
                return self._array(entry, blob, count)
        raise ModelError(f"{self.where} answered without its output {self.meta.output_name}")

    def _array(self, entry: dict[str, Any], blob: bytes | None, count: int) -> np.ndarray:
        dtype = _FLOATS.get(str(entry.get("datatype")))
        shape = entry.get("shape")
        if dtype is None or not isinstance(shape, list):
            raise ModelError(
                f"{self.where} answered output {self.meta.output_name} as "
                f"{entry.get('datatype')} {shape}; ICS reads FP16, FP32 or FP64 scores"
            )
        try:
            if blob is not None:
                arr = np.frombuffer(blob, dtype=dtype)
            else:
                arr = np.asarray(entry.get("data"), dtype=np.float64).reshape(-1)
            return arr.astype(np.float32).reshape(count, -1)
        except (ValueError, TypeError):
            raise ModelError(
                f"{self.where} answered output {self.meta.output_name} with shape {shape} "
                f"that does not hold {count} rows of scores"
            ) from None

    def labels_of_server(self, image: bytes) -> list[str] | None:
        """The model's labels, asked of a server that offers the classification extension
        (Triton with a labels file, ICS): one inference of `image` (or of a zero tensor)
        with every class named. None when the server cannot name them."""
        classes = self.meta.classes
        if not classes or "classification" not in self.meta.extensions:
            return None
        if self.takes == "bytes":
            spec: dict[str, Any] = {"name": self.meta.input_name, "datatype": "BYTES"}
            spec["shape"] = [1] if len(self.meta.shape) == 1 else [1, 1]
            raw = _U32.pack(len(image)) + image
        else:
            shape = [1, *self.meta.shape[1:]]
            spec = {"name": self.meta.input_name, "datatype": "FP32", "shape": shape}
            raw = np.zeros(shape, dtype="<f4").tobytes()
        if not self.meta.binary:
            return None
        spec["parameters"] = {"binary_data_size": len(raw)}
        out = {"name": self.meta.output_name, "parameters": {"classification": classes}}
        header = json.dumps({"inputs": [spec], "outputs": [out]}).encode()
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
        _, answer = self.client.call("POST", self._infer_url, headers=headers, content=header + raw)
        try:
            doc = json.loads(answer)
            strings = doc["outputs"][0]["data"]
            named = {}
            for text in strings:
                _, index, label = str(text).split(":", 2)
                named[int(index)] = label
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if sorted(named) != list(range(classes)):
            return None
        return [named[i] for i in range(classes)]

    def close(self) -> None:
        self.client.close()
