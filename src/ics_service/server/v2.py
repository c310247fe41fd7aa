"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API): health, metadata and
inference, with Triton's classification, binary tensor data, model repository, model
configuration and statistics extensions (the last two's documents: v2_models).

The model takes one of two inputs per request: `INPUT`, encoded images (BYTES, shape [N] or
[N, 1]), decoded, classified and recorded like /v1/classify results; or `INPUT_TENSOR`, the
model's own input (FP32, [N, 3, H, W] or [N, H, W, 3] as the card says), classified but not
recorded (there is no image). Both go through the service's dynamic batcher. Its output
`probabilities` is FP32 [N, C], or with `"parameters": {"classification": k}` BYTES [N, k]
of "score:index:label".

Errors are `{"error": "message"}` as the protocol writes them: tritonclient reads `error` as a
string (it cannot print the ICS API's `{"type", "message"}` object). This module holds the
routes and the classification; `v2_wire` reads requests and writes responses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from .. import __version__
from ..errors import ItemError, ModelNotFound
from ..modelcard import ModelCard
from .service import ServedModel, Service
from .v2_models import model_config, model_stats, platform_of
from .v2_wire import (
    HEADER_LENGTH,
    IMAGES,
    OUTPUT,
    TENSOR,
    Inputs,
    ProtocolError,
    decompressed,
    encode_response,
    inputs_of,
    outputs_of,
    split_body,
)

log = logging.getLogger(__name__)

SERVER_NAME = "ics"
#: Triton's extensions served, over HTTP and gRPC alike.
EXTENSIONS = [
    "classification",
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
]
router = APIRouter()


# --- health and metadata ------------------------------------------------------------------


def _running(request: Request) -> Service | None:
    service: Service | None = getattr(request.app.state, "service", None)
    return service if service is not None and service.ready else None


def _service(request: Request) -> Service:
    return _checked(_running(request))


def _checked(service: Service | None) -> Service:
    if service is None or not service.ready:
        raise ProtocolError(503, "the model is not loaded yet, or the server is stopping")
    return service


def _model(request: Request, name: str, version: str | None = None) -> ServedModel:
    return served(_running(request), name, version)


def served(service: Service | None, name: str, version: str | None = None) -> ServedModel:
    """The served model `name` (and `version`), or a 404 (503 while the server starts)."""
    try:
        model = _checked(service).model(name)
    except ModelNotFound as e:
        raise ProtocolError(404, str(e)) from None
    return _versioned(model, name, version)


def _using(request: Request, name: str, version: str | None) -> AbstractContextManager[ServedModel]:
    return using(_running(request), name, version)


@contextmanager
def using(service: Service | None, name: str, version: str | None) -> Iterator[ServedModel]:
    """`served`, held for the request (see Service.using)."""
    try:
        with _checked(service).using(name) as model:
            yield _versioned(model, name, version)
    except ModelNotFound as e:
        raise ProtocolError(404, str(e)) from None


def _versioned(model: ServedModel, name: str, version: str | None) -> ServedModel:
    card = model.runtime.card
    if version is not None and version != card.version:
        raise ProtocolError(
            404, f"model {name!r} has no version {version!r}; its versions: [{card.version!r}]"
        )
    return model


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


def model_metadata(card: ModelCard, device: str | None = None) -> dict[str, Any]:
    """The model's metadata; `parameters.device` says where it runs (cpu, cuda:N)."""
    doc: dict[str, Any] = {
        "name": card.name,
        "versions": [card.version],
        "platform": _platform(card),
        "inputs": [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR, "datatype": "FP32", "shape": [-1, *card.input_shape]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(card.labels)]}],
    }
    if device is not None:
        doc["parameters"] = {"device": device}
    return doc


def _platform(card: ModelCard) -> str:
    platform, backend = platform_of(card)
    return platform or backend  # as Triton's metadata names a backend-only model's


# Before /v2/models/{name}, which would take "stats" for a model's name.
@router.get(
    "/v2/models/stats",
    summary="Open Inference Protocol (statistics extension): every served model's statistics",
)
async def all_stats(request: Request) -> dict[str, Any]:
    return stats_of(_running(request), None, None)


@router.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata")
async def metadata(request: Request, name: str) -> dict[str, Any]:
    model = _model(request, name)
    return model_metadata(model.runtime.card, model.device)


@router.get(
    "/v2/models/{name}/versions/{version}", summary="Open Inference Protocol: model metadata"
)
async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    model = _model(request, name, version)
    return model_metadata(model.runtime.card, model.device)


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


# --- model configuration and statistics (Triton's extensions) ----------------------------


@router.get(
    "/v2/models/{name}/config",
    summary="Open Inference Protocol (model configuration extension): Triton's model config",
)
async def config(request: Request, name: str) -> dict[str, Any]:
    return model_config(_model(request, name))


@router.get(
    "/v2/models/{name}/versions/{version}/config",
    summary="Open Inference Protocol (model configuration extension): Triton's model config",
)
async def version_config(request: Request, name: str, version: str) -> dict[str, Any]:
    return model_config(_model(request, name, version))


@router.get(
    "/v2/models/{name}/stats",
    summary="Open Inference Protocol (statistics extension): the model's statistics",
)
async def stats(request: Request, name: str) -> dict[str, Any]:
    return stats_of(_running(request), name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/stats",
    summary="Open Inference Protocol (statistics extension): the model's statistics",
)
async def version_stats(request: Request, name: str, version: str) -> dict[str, Any]:
    return stats_of(_running(request), name, version)


def stats_of(service: Service | None, name: str | None, version: str | None) -> dict[str, Any]:
    """The statistics of the served model `name` (and `version`), or of every served model
    when `name` is None (HTTP and gRPC)."""
    models = [served(service, name, version)] if name else _checked(service).served()
    return model_stats(_checked(service).metrics, models)


# --- the model repository (Triton's extension) -------------------------------------------


def repository_index_of(service: Service | None) -> list[dict[str, str]]:
    """The served models as Triton's repository index lists them (HTTP and gRPC)."""
    return [
        {"name": model.name, "version": model.runtime.card.version, "state": "READY"}
        for model in _checked(service).served()
    ]


async def load_model(service: Service | None, name: str) -> None:
    """Load or reload the registered model `name` (HTTP and gRPC)."""
    await _checked(service).load(name)


async def unload_model(service: Service | None, name: str) -> None:
    """Stop serving `name`; a 404 when it is not served (HTTP and gRPC)."""
    try:
        await _checked(service).unload(name)
    except ModelNotFound as e:
        raise ProtocolError(404, str(e)) from None


@router.post(
    "/v2/repository/index",
    summary="Open Inference Protocol (model repository extension): the models served",
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    return repository_index_of(_running(request))


@router.post(
    "/v2/repository/models/{name}/load",
    summary="Open Inference Protocol (model repository extension): load or reload a model",
)
async def repository_load(request: Request, name: str) -> dict[str, Any]:
    await load_model(_running(request), name)
    return {}


@router.post(
    "/v2/repository/models/{name}/unload",
    summary="Open Inference Protocol (model repository extension): unload a model",
)
async def repository_unload(request: Request, name: str) -> dict[str, Any]:
    await unload_model(_running(request), name)
    return {}


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
    with _using(request, name, None) as model:
        return await _infer(request, model)


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    summary="Open Inference Protocol: classify encoded images (BYTES) or tensors (FP32)",
    openapi_extra=_INFER_DOC,
)
async def version_infer(request: Request, name: str, version: str) -> Response:
    with _using(request, name, version) as model:
        return await _infer(request, model)


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
        "has health, server and model metadata, model readiness, inference, model "
        "configuration, statistics and the model repository (extensions: "
        f"{', '.join(EXTENSIONS)})",
    )


async def _infer(request: Request, model: ServedModel) -> Response:
    card = model.runtime.card
    body = decompressed(
        await request.body(),
        request.headers.get("content-encoding", ""),
        model.settings.max_body_bytes,
    )
    doc, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    inputs = inputs_of(doc, binary, card)
    outputs = outputs_of(doc)
    probs = await classify_inputs(model, inputs)
    return encode_response(doc, card, probs, outputs)


async def classify_inputs(model: ServedModel, inputs: Inputs) -> np.ndarray:
    """Probabilities (N, C) of a request's inputs, within request_timeout_s (HTTP and gRPC)."""
    if inputs.images is not None:
        return await model.bounded(_classify_images(model, inputs.images))
    assert inputs.tensor is not None
    return await model.bounded(_classify_tensor(model, inputs.tensor))


def _in_flight(model: ServedModel) -> int:
    """How many inputs of one request may wait for the model at once: a batch's worth, and
    never the whole queue (a request must not refuse itself with QueueFull)."""
    return max(1, min(model.batcher.max_batch_size, model.settings.max_queue // 2))


class _InputFailed(Exception):
    def __init__(self, index: int, error: ItemError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


async def _classify_images(model: ServedModel, images: list[bytes]) -> np.ndarray:
    """Probabilities (N, C) of encoded images, each recorded as a real-time result.

    At most a batch's worth of a request's images are in flight at once, so a request of many
    small images neither holds all their tensors nor fills the batcher's queue by itself.
    The first failure cancels the rest: it is recorded FAILED, and the request is an error.
    """
    card = model.runtime.card
    probs = np.empty((len(images), len(card.labels)), dtype=np.float32)
    options = model.options()
    slots = asyncio.Semaphore(_in_flight(model))

    async def one(i: int, data: bytes) -> None:
        uri = "request" if len(images) == 1 else f"request[{i}]"
        async with slots:
            outcome = await model.classify(data, uri, options)
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


async def _classify_tensor(model: ServedModel, tensor: np.ndarray) -> np.ndarray:
    """Probabilities (N, C) of model inputs, one row at a time through the batcher (so they
    share batches with other requests), at most a batch's worth of them in flight."""
    probs = np.empty((len(tensor), len(model.runtime.card.labels)), dtype=np.float32)
    slots = asyncio.Semaphore(_in_flight(model))

    async def one(i: int) -> None:
        async with slots:
            probs[i] = await model.infer(tensor[i])

    try:
        async with asyncio.TaskGroup() as group:
            for i in range(len(tensor)):
                group.create_task(one(i))
    except ExceptionGroup as failures:
        raise _first(failures) from None
    return probs
