"""The ICS API: `POST /v1/classify`, and the health probes."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ..errors import UsageError
from ..redact import redact_uri
from .allowed import allowed_uri
from .jsonbody import BadJson, parse_json
from .service import Options, ServedModel, Service

router = APIRouter()

#: Content types taken as one raw image body.
RAW_TYPES = ("image/", "application/x-image", "application/octet-stream")


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


_RESULT_SCHEMA = {"type": "object", "description": "A result record (see docs/classify.md)."}


@router.post(
    "/v1/classify",
    summary="Classify one image (raw body, base64 or uri) or several (multipart `file` parts)",
    response_description="The result record, or a list of them for a multipart request.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                **{
                    kind: {"schema": {"type": "string", "format": "binary"}}
                    for kind in ("image/*", "application/x-image", "application/octet-stream")
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image_base64": {"type": "string"},
                            "uri": {"type": "string"},
                            "threshold": {"type": "number"},
                            "top_k": {"type": "integer"},
                        },
                    }
                },
            },
        },
        "responses": {
            "200": {"content": {"application/json": {"schema": _RESULT_SCHEMA}}},
            "4XX": {"description": '`{"error": {"type", "message"}}`'},
        },
    },
)
async def classify(
    request: Request,
    threshold: float | None = Query(None, ge=0.0, le=1.0),
    top_k: int | None = Query(None, ge=1, le=1000),
    model: str | None = Query(
        None, description="A served model's name (GET /v1/models); default: the default model."
    ),
) -> Any:
    service = service_of(request)
    with service.using(model) as served:
        return await _classify(request, service, served, threshold, top_k)


async def _classify(
    request: Request,
    service: Service,
    model: ServedModel,
    threshold: float | None,
    top_k: int | None,
) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _classify_parts(request, model, model.options(threshold, top_k))
    if kind == "application/json":
        doc = await _json(request)
        threshold = _field(doc, "threshold", float, threshold)
        top_k = _field(doc, "top_k", int, top_k)
        options = _checked(model, threshold, top_k)
        data, uri = await _json_image(service, doc, request)
    elif kind.startswith(RAW_TYPES) or not kind:
        options = model.options(threshold, top_k)
        data, uri = await request.body(), "request"
    else:
        raise UsageError(
            f"unsupported content type {kind!r}: send the image as the body (image/*, "
            "application/x-image or application/octet-stream), multipart `file` parts, or "
            'JSON {"image_base64": ...} or {"uri": ...}'
        )
    outcome = await model.bounded(model.classify(data, uri, options))
    outcome.raise_error()
    return outcome.result.to_dict()


async def _classify_parts(request: Request, model: ServedModel, options: Options) -> Any:
    async with request.form() as form:  # closes the uploads' spooled files
        parts = form.getlist("file")
        if not parts:
            raise UsageError("a multipart request needs one or more `file` parts")
        results = []
        for part in parts:
            if isinstance(part, str):
                raise UsageError("each `file` part must be a file, not a text field")
            data = await part.read()
            uri = part.filename or "request"
            outcome = await model.bounded(model.classify(data, uri, options))
            results.append(outcome.result.to_dict())
        return results


async def _json(request: Request) -> dict[str, Any]:
    try:
        doc = parse_json(await request.body())
    except BadJson as e:
        raise UsageError(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UsageError('the JSON body must be an object: {"image_base64": ...} or {"uri": ...}')
    return doc


def _field(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{key} must be a number, not {json.dumps(value)}")
    if kind is int and not isinstance(value, int):
        raise UsageError(f"{key} must be a whole number, not {value}")
    return kind(value)


def _checked(model: ServedModel, threshold: float | None, top_k: int | None) -> Options:
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be between 0 and 1, not {threshold}")
    if top_k is not None and not 1 <= top_k <= 1000:
        raise UsageError(f"top_k must be between 1 and 1000, not {top_k}")
    return model.options(threshold, top_k)


async def _json_image(service: Service, doc: dict[str, Any], request: Request) -> tuple[bytes, str]:
    if "image_base64" in doc:
        encoded = doc["image_base64"]
        if not isinstance(encoded, str):
            raise UsageError("image_base64 must be a string of base64")
        try:
            return base64.b64decode(encoded, validate=True), "request"
        except (binascii.Error, ValueError) as e:
            raise UsageError(f"image_base64 is not valid base64: {e}") from None
    if "uri" in doc:
        uri = doc["uri"]
        if not isinstance(uri, str) or not uri:
            raise UsageError("uri must be a non-empty string")
        # Read what was checked: the resolved path, not a symlink that could change since.
        checked = allowed_uri(uri, service.settings.allowed_sources)
        # The result keeps the uri as given, less its credentials (never recorded).
        return await service.read(checked, gone=request.is_disconnected), redact_uri(uri)
    raise UsageError('the JSON body needs "image_base64" or "uri"')


@router.get("/healthz", summary="Liveness: the process answers (and its replica_id, if set)")
async def healthz(request: Request) -> dict[str, str]:
    # Only a name the operator chose: /healthz is open, and the default (host name and
    # process id) is not for strangers to read.
    replica = request.app.state.settings.replica_id
    return {"status": "ok"} if replica is None else {"status": "ok", "replica": replica}


@router.get(
    "/readyz",
    summary="Readiness: the models are loaded",
    responses={503: {"description": "not ready: the models are not loaded"}},
)
async def readyz(request: Request) -> Response:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse(
        {
            "status": "ready",
            "model": service.default_name,
            "device": service.default.device,
            "models": {m.name: "ready" for m in service.served()},
        }
    )


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics(request: Request) -> Response:
    from .metrics import CONTENT_TYPE

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
