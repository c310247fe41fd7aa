"""The served models, in the ICS API: `GET /v1/models`, and `POST /v1/models/{name}/load` and
`/unload`.

Load opens a registered model (its card and file read from disk again) beside the one
serving under that name, if any, and switches to it: requests from then on go to the new
one, while those in flight finish on the old one, which then closes. No request in flight
fails. Unload stops serving a model the same way; the default model (routes that name none
use it) cannot be unloaded, only reloaded. They are guarded as every other route is: by the
API token when one is configured.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .service import ServedModel, Service

router = APIRouter()


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _described(service: Service, model: ServedModel) -> dict[str, Any]:
    card = model.runtime.card
    return {
        "name": card.name,
        "version": card.version,
        "default": card.name == service.default_name,
        "description": card.description,
        "labels": len(card.labels),
    }


@router.get("/v1/models", summary="The models served; the default answers requests naming none")
async def models(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {
        "default": service.default_name,
        "models": [_described(service, m) for m in service.served()],
    }


@router.post(
    "/v1/models/{name}/load",
    summary="Load a registered model, or reload a served one from disk (swapped in place: "
    "requests in flight finish on the old one)",
    responses={404: {"description": "no registered model of that name"}},
)
async def load(request: Request, name: str) -> dict[str, Any]:
    service = _service(request)
    model, replaced = await service.load(name)
    return {**_described(service, model), "replaced": replaced}


@router.post(
    "/v1/models/{name}/unload",
    summary="Stop serving a model (requests in flight finish); not the default one",
    responses={
        404: {"description": "no served model of that name"},
        409: {"description": "the default model cannot be unloaded"},
    },
)
async def unload(request: Request, name: str) -> dict[str, Any]:
    await _service(request).unload(name)
    return {"name": name, "unloaded": True}
