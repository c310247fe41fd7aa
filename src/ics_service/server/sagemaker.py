"""The SageMaker container contract (`GET /ping`, `POST /invocations`) and the SageMaker
runtime API path `POST /endpoints/{name}/invocations`, which boto3's
`sagemaker-runtime.invoke_endpoint(EndpointName=name, ...)` posts to when given an
`endpoint_url`. Any endpoint name is this server's one model.

- `/ping`: 200 `{"status": "ready", "model": NAME}` once the model is loaded (503 before).
  Open without a token, as SageMaker's health check sends none.
- Invocations: the body is one encoded image, whatever image content type the client claims
  (image/*, application/x-image, application/octet-stream, or none): the decoder goes by the
  bytes, not the label. The answer is the model's whole softmax, a JSON array of floats (1000
  for ImageNet), in the model's class order, as the original ClassifyImage Lambda reads it.
- `Accept`: absent, `*/*`, `application/*` or `application/json` (q > 0) gets the JSON
  array; anything else is refused with 406 before the image is classified, as SageMaker has
  only the one answer format here.
- Every invocation is classified like `POST /v1/classify` (the default threshold and top k)
  and recorded in the store as an item of the day's real-time execution (when
  `record_realtime` is on), with the request path as its uri; an image that cannot be read is
  recorded FAILED and answered 4xx with `{"error": {"type", "message"}}`.
- With an API token configured, invocations take `Authorization: Bearer TOKEN` or, when
  sigv4_access_key_id / sigv4_secret_access_key are set, a valid AWS SigV4 signature by
  that key (see `sigv4`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import UsageError
from .service import Service
from .v1 import readyz

router = APIRouter()

#: Media ranges whose answer is the JSON array of probabilities.
JSON_RANGES = frozenset({"*/*", "application/*", "application/json"})

_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/x-image": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "content": {
                "application/json": {"schema": {"type": "array", "items": {"type": "number"}}}
            }
        },
        "406": {"description": "`Accept` excludes application/json"},
        "4XX": {"description": '`{"error": {"type", "message"}}`'},
    },
}


class NotAcceptable(UsageError):
    http_status = 406


@router.get(
    "/ping",
    summary="SageMaker health check: 200 once the model is loaded",
    responses={503: {"description": "not ready: the model is not loaded"}},
)
async def ping(request: Request) -> Response:
    return await readyz(request)


def _invocation(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return router.post(
        path,
        summary="Class probabilities of one image (raw body), as a SageMaker endpoint answers",
        response_description="The whole softmax, a JSON array of floats in class order.",
        openapi_extra=_OPENAPI,
    )


@_invocation("/invocations")
async def invocations(request: Request) -> Response:
    return await _invoke(request)


@_invocation("/endpoints/{name}/invocations")
async def endpoint_invocations(request: Request, name: str) -> Response:
    return await _invoke(request)


async def _invoke(request: Request) -> Response:
    service: Service = request.app.state.service
    _check_accept(request.headers.get("accept"))
    data = await request.body()
    uri = request.url.path
    outcome = await service.bounded(service.classify(data, uri, service.options()))
    probs = outcome.raise_error()
    return Response(json.dumps(probs.tolist()), media_type="application/json")


def _check_accept(accept: str | None) -> None:
    """Refuse (406) an Accept header that admits no JSON answer."""
    if accept is None or not accept.strip():
        return
    for media_range in accept.split(","):
        kind, *params = (p.strip() for p in media_range.split(";"))
        if kind.lower() in JSON_RANGES and _quality(params) > 0:
            return
    raise NotAcceptable(
        f"cannot answer Accept: {accept}: the answer is application/json "
        "(a JSON array of class probabilities)"
    )


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0
