"""The SageMaker container contract (`GET /ping`, `POST /invocations`) and the SageMaker
runtime API paths `POST /endpoints/{name}/invocations` and
`POST /endpoints/{name}/invocations-response-stream`, which boto3's `sagemaker-runtime`
`invoke_endpoint` and `invoke_endpoint_with_response_stream` (EndpointName=name) post to when
given an `endpoint_url`. Any endpoint name is this server. An invocation goes to a
production variant (see `variants`: the one `X-Amzn-SageMaker-Target-Variant` names, or one
chosen by weight), named in the answer's `X-Amzn-Invoked-Production-Variant`; the model is
the variant's, or the one that the `X-Amzn-SageMaker-Target-Model` header names (boto3's
`TargetModel`, as a multi-model endpoint is invoked); a model not served is a 404
(`ModelNotFound`, its type in `x-amzn-ErrorType`).

- `/ping`: 200 `{"status": "ready", "model": DEFAULT, "models": {NAME: "ready"...}}` once the
  models are loaded (503 before).
  Open without a token, as SageMaker's health check sends none.
- Invocations: the body is one encoded image, whatever image content type the client claims
  (image/*, application/x-image, application/octet-stream, or none): the decoder goes by the
  bytes, not the label. The answer is the model's whole softmax in the model's class order:
  by default a JSON array of floats (1000 for ImageNet), as the original ClassifyImage
  Lambda reads it; `Accept` may ask for application/jsonlines or text/csv instead (see
  `sagemaker_wire.render`), and a `CustomAttributes` of `top_k=N` for the N most probable
  classes only, `threshold=X` for the decision's threshold. CustomAttributes come back as
  sent.
- The response stream answers the same, as PayloadPart events of an AWS event stream.
- Every invocation is classified like `POST /v1/classify` and recorded in the store as an
  item of the day's real-time execution (when `record_realtime` is on), with the request
  path as its uri.
- Errors are SageMaker runtime's (`sagemaker_wire.aws_error`): boto3 raises them as
  `client.exceptions.ModelError`, `ValidationError`... with ICS's message; an image that
  cannot be read is recorded FAILED and answered ModelError (424).
- With an API token configured, invocations take `Authorization: Bearer TOKEN` or, when
  sigv4_access_key_id / sigv4_secret_access_key are set, a valid AWS SigV4 signature by
  that key (see `sigv4`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import sagemaker_wire as wire
from .service import ServedModel, Service
from .v1 import readyz
from .variants import INVOKED_VARIANT, TARGET_VARIANT, Variants

router = APIRouter()

#: The header of a multi-model endpoint's target (boto3's `TargetModel`).
TARGET_MODEL = "X-Amzn-SageMaker-Target-Model"

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
                "application/json": {"schema": {"type": "array", "items": {"type": "number"}}},
                "application/jsonlines": {},
                "text/csv": {},
            }
        },
        "400": {"description": "ValidationError: a bad Accept or CustomAttributes"},
        "424": {"description": "ModelError: the model could not take the image"},
        "4XX": {
            "description": "SageMaker's error (x-amzn-ErrorType; `Message`...), with ICS's "
            '`{"error": {"type", "message"}}`'
        },
    },
}


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
    return await _invoke(request, request.headers.get("accept"))


@_invocation("/endpoints/{name}/invocations")
async def endpoint_invocations(request: Request, name: str) -> Response:
    return await _invoke(request, request.headers.get("accept"))


@router.post(
    "/endpoints/{name}/invocations-response-stream",
    summary="Class probabilities of one image (raw body), as an AWS event stream of "
    "PayloadPart events (InvokeEndpointWithResponseStream)",
    response_description="application/vnd.amazon.eventstream",
    openapi_extra={**_OPENAPI, "responses": {"200": {"content": {wire.EVENT_STREAM: {}}}}},
)
async def endpoint_invocations_stream(request: Request, name: str) -> Response:
    answer = await _invoke(request, request.headers.get(wire.STREAM_ACCEPT))
    if answer.status_code != 200:  # an error before the stream starts: the call's own
        return answer
    headers = {wire.STREAM_CONTENT_TYPE: answer.media_type or wire.JSON}
    for name in (wire.CUSTOM_ATTRIBUTES, INVOKED_VARIANT):
        if name in answer.headers:
            headers[name] = answer.headers[name]
    return StreamingResponse(
        _parts(bytes(answer.body)), media_type=wire.EVENT_STREAM, headers=headers
    )


async def _parts(answer: bytes) -> AsyncIterator[bytes]:
    """The answer's PayloadPart events. The image is classified before the stream starts,
    so that its errors are the call's own (ModelError...), as SageMaker answers a container
    that fails before it streams: nothing is left to fail once the stream has started."""
    for part in wire.payload_parts(answer):
        yield part


async def _invoke(request: Request, accept: str | None) -> Response:
    service: Service = request.app.state.service
    variants: Variants = request.app.state.variants
    endpoint = request.path_params.get("name", service.settings.capture_endpoint)
    variant = variants.pick(request.headers.get(TARGET_VARIANT), endpoint)
    # Errors raised from here on name the variant too (see `invoked_headers`).
    request.state.invoked_variant = variant.name
    service.metrics.variant_invocations.labels(variant.name).inc()
    media = wire.negotiate(accept)
    with service.using(request.headers.get(TARGET_MODEL) or variant.model) as model:
        answer = await _classify(request, model, media)
    answer.headers[INVOKED_VARIANT] = variant.name
    return answer


def invoked_headers(request: Request, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """`headers`, and the invoked variant's header once an invocation has chosen one."""
    out = dict(headers or {})
    variant = getattr(request.state, "invoked_variant", None)
    if variant is not None:
        out[INVOKED_VARIANT] = variant
    return out


async def _classify(request: Request, model: ServedModel, media: str) -> Response:
    raw = request.headers.get(wire.CUSTOM_ATTRIBUTES)
    labels = model.runtime.card.labels
    attributes = wire.custom_attributes(raw, len(labels))
    data = await request.body()
    uri = request.url.path
    options = model.options(attributes.threshold, attributes.top_k)
    outcome = await model.bounded(model.classify(data, uri, options))
    headers = {} if raw is None else {wire.CUSTOM_ATTRIBUTES: raw}
    if outcome.error is not None:
        e = outcome.error
        aws = wire.aws_error(e.http_status, e.type, str(e), record=wire.record_of(outcome.result))
        return JSONResponse(aws.body, status_code=aws.status, headers=aws.headers(headers))
    assert outcome.probs is not None
    top = None if attributes.top_k is None else outcome.result.top_k
    answer = wire.render(media, outcome.probs, top, labels)
    return Response(answer, media_type=media, headers=headers)
