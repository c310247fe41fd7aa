"""The FastAPI app: the service, its routers (one module per protocol), error responses,
and the wrappers (authentication, body limit and deadline, request log)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, sources
from ..config import ALL_MODELS, Settings
from ..engine.batcher import QueueFull
from ..engine.watch import WatcherPresence
from ..errors import IcsError, UsageError
from ..models.runtime import ModelRuntime
from ..store import Store
from ..store.watched import WatchState
from . import (
    docs,
    events,
    executions,
    reviews,
    sagemaker,
    sagemaker_async,
    sagemaker_control,
    served,
    v1,
    v2,
)
from .batches import Batches
from .console import install as install_console
from .console import is_console_path
from .errors import error_response, invalid_request_status, request_path, speaks_protocol
from .guards import (
    OPEN_PATHS,
    Authenticate,
    BodyBudget,
    BodyDeadline,
    BodyLimit,
    BudgetedBodies,
    RequestLog,
)
from .metrics import Metrics
from .sagemaker_wire import CONTROL_PATH, speaks_sagemaker
from .service import RETRY_AFTER_S, Loader, Service, plan_serving
from .sigv4 import verifier_of
from .v2_wire import ProtocolError
from .variants import Variants

log = logging.getLogger("ics_service.server")


def create_app(
    settings: Settings,
    *,
    runtime: ModelRuntime | None = None,
    runtimes: Sequence[ModelRuntime] = (),
    store: Store | None = None,
    loader: Loader | None = None,
    grpc_port: int = 0,
    card_thresholds: bool = False,
) -> FastAPI:
    """The ASGI app of `ics serve`: models and store are opened at start-up unless given.

    `runtime`: the one model served; `runtimes`: the models served, the default first;
    neither: the settings' (`served_models`). `loader` opens a model by name for `POST
    /v1/models/NAME/load` (by default from the settings' model home). `card_thresholds`:
    each model's default threshold is its card's own (else the setting's default), not
    the settings' threshold (which the default model's card may have set). With a
    `grpc_port`, the Open Inference Protocol's gRPC endpoint is served on it beside.
    """
    metrics = Metrics()
    given = [runtime] if runtime is not None else list(runtimes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sources.configure(settings)  # `uri` inputs on S3 or HTTP read with these settings
        own_store = store is None
        opened_store = store or Store(settings.store_url)
        models = given or load_models(settings)
        service = Service(
            settings,
            models,
            opened_store,
            metrics,
            loader=loader or functools.partial(load_model, settings),
            card_thresholds=card_thresholds,
        )
        app.state.service = service
        grpc_server = None
        try:
            variants = Variants.of(settings, service.default_name)
            variants.check_served([m.name for m in service.served()])
            app.state.variants = variants
            metrics.track_variants(v.name for v in variants.all)
            if grpc_port:
                from .v2_grpc import start_grpc  # grpcio loads only when gRPC is served

                grpc_server = await start_grpc(service, grpc_port)
            batches = Batches(service, sinks_for=[sagemaker_async.sinks_for])
            app.state.batches = batches
            presence: WatcherPresence | None = None
            try:
                # The S3 events watcher runs while the server does: `ics watch forget`
                # refuses to forget it meanwhile.
                presence = WatcherPresence(
                    WatchState(opened_store, events.EVENTS_WATCHER), batches.owner
                )
                events.resume_unfinished(batches)
                yield
            finally:
                # Blocking waits, off the event loop: requests may still be finishing.
                await asyncio.to_thread(batches.close)
                if presence is not None:
                    await asyncio.to_thread(presence.close)
        finally:
            if grpc_server is not None:
                # Its calls in flight finish (or are cancelled) before the service closes.
                await grpc_server.stop(settings.request_timeout_s)
            await asyncio.to_thread(service.close)
            if own_store:
                opened_store.close()

    app = FastAPI(
        title="ICS, the Image Classification Service",
        version=__version__,
        lifespan=lifespan,
        # ICS serves /docs itself, from local files (docs.py); ReDoc would load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    for module in (
        v1,
        served,
        sagemaker,
        sagemaker_async,
        sagemaker_control,
        v2,
        executions,
        events,
        reviews,
        docs,
    ):
        app.include_router(module.router)

    # One set of handlers for every route: errors.py shapes the answer for the path (the
    # Open Inference Protocol's on /v2, ICS's elsewhere).
    @app.exception_handler(IcsError)
    async def ics_error(request: Request, e: IcsError) -> JSONResponse:
        return error_response(
            _path(request),
            e.http_status,
            e.type,
            str(e),
            named=True,
            headers=sagemaker.invoked_headers(request),
            method=request.method,
        )

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, e: ProtocolError) -> JSONResponse:
        return error_response(
            _path(request),
            e.status,
            "ProtocolError",
            str(e),
            headers=e.headers,
            method=request.method,
        )

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return error_response(
            _path(request),
            503,
            "QueueFull",
            f"the server is busy: {e}",
            headers=sagemaker.invoked_headers(request, {"Retry-After": str(RETRY_AFTER_S)}),
            method=request.method,
        )

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> Response:
        # What no handler above takes is a bug: SageMaker's clients read it as InternalFailure;
        # elsewhere Starlette's own answer. The traceback is logged either way.
        path = _path(request)
        if not speaks_sagemaker(path, request.method):
            return PlainTextResponse("Internal Server Error", status_code=500)
        return error_response(
            path,
            500,
            "InternalError",
            (
                f"an internal failure ({type(e).__name__}: a bug in ICS; its traceback is in the "
                "server's log, please report it)"
            ),
            headers=sagemaker.invoked_headers(request),
            method=request.method,
        )

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, _e: TimeoutError) -> JSONResponse:
        return error_response(
            _path(request),
            504,
            "Timeout",
            f"no answer within request_timeout_s={settings.request_timeout_s:g}",
            headers=sagemaker.invoked_headers(request),
            method=request.method,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        path = _path(request)
        return error_response(
            path, invalid_request_status(path), "InvalidRequest", problems, method=request.method
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        # FastAPI's own answer (`{"detail": ...}`) but on /v2, where clients read `error`,
        # and on SageMaker's routes, where they read `Message`.
        path = _path(request)
        if not speaks_protocol(path) and not speaks_sagemaker(path, request.method):
            return await http_exception_handler(request, e)
        return error_response(
            path,
            e.status_code,
            "HTTPError",
            str(e.detail),
            headers=e.headers,
            method=request.method,
        )

    # The last added runs first: the body deadline and limit hold before the signature check
    # reads a body. Any credential configured is enforced: SigV4 keys alone admit only
    # signed SageMaker invocations.
    token = settings.token
    sigv4 = verifier_of(settings)
    # The docs page and its assets hold no data; the API description it reads does, unless
    # the operator makes it public (docs_public).
    open_paths = OPEN_PATHS | docs.OPEN_PATHS
    if settings.docs_public:
        open_paths |= {"/openapi.json"}
    # "token": the page asks for it. "closed": SigV4 keys without a token guard the API, and
    # a browser can sign nothing: the page says docs_public is what opens it.
    if settings.docs_public or (not token and sigv4 is None):
        app.state.docs_access = "public"
    else:
        app.state.docs_access = "token" if token else "closed"
    # Bodies read for clients that have not proved who they are share one budget, of which
    # one address holds a quarter at most, or one largest body if that is more.
    budget = BodyBudget(
        settings.unauthenticated_body_memory,
        per_client=max(settings.unauthenticated_body_memory // 4, settings.max_body_bytes),
    )
    install_console(app, settings, closed=sigv4 is not None)
    if token or sigv4 is not None:
        app.add_middleware(
            Authenticate,
            token=token,
            sigv4=sigv4,
            open_paths=open_paths,
            budget=budget,
            # SNS can send only the user and password of its endpoint URL (HTTP Basic).
            basic_paths={"/v1/events"},
            # POST / is the SageMaker API's (DescribeEndpoint...), guarded as invocations are.
            self_guarded=lambda method, path: (
                is_console_path(path) and not (method == "POST" and path == CONTROL_PATH)
            ),
        )
    else:
        # No credential: every body is a stranger's, held from its first byte to its answer.
        app.add_middleware(BudgetedBodies, budget=budget)
    if token is None and sigv4 is not None:
        log.warning(
            "SigV4 keys are set but no API token: only SigV4-signed SageMaker invocations "
            "are served (every other route but the health checks answers 401)"
        )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)

    # Added last, so outermost: it sees every answer, the wrappers' refusals included.
    app.add_middleware(RequestLog, metrics=metrics, logger=log)
    return app


def _path(request: Request) -> str:
    return request_path(request.scope)


def served_models(settings: Settings) -> list[str]:
    """The names of the models `ics serve` serves: `model` (the default) first, then
    `serve_models` in their order, then the models of the `variants`. "all" stands for every
    registered model (bundled and added) that can run without being prepared first: a
    bundled model not yet prepared is left out, with a warning saying how to prepare it."""
    from ..models import all_cards
    from ..models.factory import onnx_file

    names = [settings.model]
    for name in settings.serve_models:
        if name != ALL_MODELS:
            names.append(name)
            continue
        for card in all_cards(settings):
            if card.kind == "onnx" and not onnx_file(card, settings.models_dir).is_file():
                if card.name not in names:
                    log.warning(
                        "--model all: %s is not prepared, so not served (`ics models prepare "
                        "%s` prepares it)",
                        card.name,
                        card.name,
                    )
                continue
            names.append(card.name)
    names += [variant.model for variant in settings.variants]
    return list(dict.fromkeys(names))


def load_models(settings: Settings) -> list[ModelRuntime]:
    """The served models (`served_models`), opened, the default first. A model that "all"
    brought in and that cannot be served here (a remote model sent encoded images, a file
    gone) is left out with a warning saying why; a model named is served or stops start-up."""
    named = {settings.model, *settings.serve_models, *(v.model for v in settings.variants)}
    runtimes = []
    for name in served_models(settings):
        try:
            runtimes.append(load_model(settings, name))
        except IcsError as e:
            if name in named:
                raise
            log.warning("--model all: %s is not served: %s", name, e)
    return runtimes


def load_model(settings: Settings, name: str | None = None) -> ModelRuntime:
    """A model (by default the settings' `model`), planned for serving (by default a
    single-thread session shared by one inference worker per core; the service adds a
    session on every core for a lone request). Its card and file are read from disk."""
    from ..models import get_card, load_runtime
    from ..models.device import device_for

    threads, _ = plan_serving(settings)
    from ..models.remote import RemoteOptions
    from ..models.runtime import takes_bytes

    card = get_card(settings.model if name is None else name, settings)
    device = device_for(card.kind, card.name, settings.device)
    runtime = load_runtime(
        card,
        settings.models_dir,
        threads=threads,
        device=device,
        remote=RemoteOptions.of(settings),
    )
    if takes_bytes(runtime):
        runtime.close()  # type: ignore[attr-defined]
        raise UsageError(
            f"ics serve cannot serve {card.name}: it is a remote model sent encoded images "
            "(a SageMaker endpoint or a v2 model taking BYTES), which the server's batcher "
            "cannot feed; classify with it (`ics classify --model ...`), or serve a local one"
        )
    return runtime
