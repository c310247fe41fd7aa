"""The LitServe peer: the same ONNX file behind LitServe with dynamic batching (max batch 8,
5 ms timeout: FIELD-NOTES), answering one raw JPEG body per request as ICS's /v1/classify
does.

Decoding uses ICS's own Preprocessor (draft JPEG decode, the model card's resize, crop and
normalisation), so the comparison is between the serving layers, not the image code.
LitServe parses a request body as JSON or a form only, so a small ASGI middleware in its
API process wraps a raw image body as `{"image_base64": ...}`; the LitAPI decodes it.

    python -m benchmarks.litserve_peer MODEL_JSON --port P [--max-batch-size 8]
                                       [--batch-timeout 0.005]

Serves POST /v1/classify (and LitServe's GET /health) on 127.0.0.1 until terminated.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as
# an object to build its route.
import argparse
import base64
import json
from typing import Any

import litserve as ls
import numpy as np
from pydantic import BaseModel

from ics_service.models.runtime import softmax

from .common import ModelInfo, session

ROUTE = "/v1/classify"
RAW_TYPES = (b"image/", b"application/x-image", b"application/octet-stream")


class RawImageAsJson:
    """ASGI middleware: a raw image body becomes `{"image_base64": ...}` JSON."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != ROUTE:
            await self.app(scope, receive, send)
            return
        kind = dict(scope.get("headers", [])).get(b"content-type", b"")
        if kind and not kind.startswith(RAW_TYPES):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = json.dumps({"image_base64": base64.b64encode(b"".join(chunks)).decode()}).encode()
        headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                message: dict[str, Any] = await receive()
                return message
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


class ImageRequest(BaseModel):
    image_base64: str


class ClassifyAPI(ls.LitAPI):  # type: ignore[misc]
    """ICS's decode, the ONNX model, top-1 and the threshold; LitServe does the batching.

    At module level: LitServe pickles it into its inference worker process.
    """

    def __init__(self, model_json: str, threshold: float, **options: Any) -> None:
        super().__init__(**options)
        self.model_json = model_json
        self.threshold = threshold

    def setup(self, device: str) -> None:
        from ics_service.imaging import Limits, Preprocessor
        from ics_service.models import get_card

        self.info = ModelInfo.load(self.model_json)
        self.card = get_card(self.info.name)
        self.preprocess = Preprocessor(self.card, Limits())
        self.session = session(self.info.path)
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request: ImageRequest) -> np.ndarray:
        tensor, _ = self.preprocess(base64.b64decode(request.image_base64))
        return tensor

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {self.input_name: x})
        probs: np.ndarray = softmax(out) if self.info.logits else out
        return probs

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        index = int(output.argmax())
        confidence = float(output[index])
        return {
            "label_index": index,
            "label": self.card.labels[index],
            "confidence": confidence,
            "status": "SUCCEEDED" if confidence >= self.threshold else "LOW_CONFIDENCE",
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="LitServe serving the ONNX model, batched.")
    p.add_argument("model_json")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    p.add_argument("--threshold", type=float, default=0.94)
    args = p.parse_args(argv)
    api = ClassifyAPI(
        args.model_json,
        args.threshold,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path=ROUTE,
    )
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=1,
        middlewares=[RawImageAsJson],
    )
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
