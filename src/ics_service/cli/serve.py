"""`ics serve`: the HTTP service, on uvicorn."""

from __future__ import annotations

import logging
import math
import signal
import socket
from typing import Any

import click

from ..config import ALL_MODELS, CPU_MAX_BATCH, CUDA_MAX_BATCH, default, owner_of
from ..errors import EnvironmentUnavailable
from .alerts import notify_option
from .app import common_options, device_option, load_cli_settings, main
from .capture import capture_options

log = logging.getLogger("ics_service.cli")

#: Loggers whose lines a client can cause, one per request: uvicorn's (malformed requests,
#: upgrades), the server's lines about what a request asked, and the gRPC endpoint's.
THROTTLED_LOGGERS = ("uvicorn.error", "ics_service.server.clients", "ics_service.server.v2_grpc")


@main.command()
@click.option("--host", help=f"Address to bind (default {default('host')}).")
@click.option("--port", type=int, help=f"Port to listen on (default {default('port')}).")
@click.option(
    "--grpc-port",
    type=int,
    help="Port of the gRPC endpoint (the Open Inference Protocol's, for tritonclient.grpc); "
    "0 turns it off (default: the HTTP port + 1, as Triton's 8000 and 8001).",
)
@click.option(
    "-m",
    "--model",
    multiple=True,
    help=f"Model to serve (default {default('model')}); repeat it to serve several, the first "
    "being the default (for requests that name none); `all`: every registered model.",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="NAME=MODEL[:WEIGHT]",
    help="A production variant of the SageMaker endpoint: MODEL (served, as by --model) under "
    "the variant NAME, with a WEIGHT (default 1); repeat it for several: invocations without "
    "a TargetVariant split at random by weight. Default: one variant, AllTraffic "
    "(--capture-variant), serving the default model.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="File holding the API token every request must carry (or ICS_API_TOKEN).",
)
@click.option(
    "--max-batch-size",
    type=int,
    help=f"Most requests classified in one model run (default {CPU_MAX_BATCH} on the CPU, "
    f"{CUDA_MAX_BATCH} on a CUDA device).",
)
@click.option(
    "--max-delay-ms",
    type=float,
    help="Most time a request waits for others to fill its batch, when another batch is "
    f"running (default {default('max_delay_ms'):g}); with one inference worker, a server's "
    "default, batches form from what arrives while the model runs.",
)
@click.option("--workers", "decode_workers", type=int, help="Decode threads (default: automatic).")
@device_option
@capture_options
@notify_option
@common_options
def serve(**kwargs: Any) -> None:
    """Serve classification over HTTP until SIGINT or SIGTERM.

    \b
    Routes:
      POST /v1/classify                 an image (raw body, multipart, base64 or uri);
                                        ?model=NAME for another model than the default
      GET  /v1/models                   the models served; POST /v1/models/NAME/load
                                        (or reload) and /unload, without failing requests
      POST /v1/executions               a batch execution; GET /v1/executions[/ID[/results
                                        |/history]], POST /v1/executions/ID/cancel
      GET  /ping, POST /invocations     the SageMaker container contract, and
      POST /endpoints/NAME/invocations  the SageMaker runtime API (boto3; TargetVariant
           [-response-stream]           and TargetModel), and its response stream
      POST /                            the SageMaker API's DescribeEndpoint and
                                        DescribeEndpointConfig (boto3 `sagemaker`)
      /v2/...                           the Open Inference Protocol (tritonclient)
      GET  /healthz, /readyz            liveness and readiness
      GET  /metrics                     Prometheus metrics
      GET  /docs                        the OpenAPI description
    and on --grpc-port (the HTTP port + 1 unless set; 0: off) the Open Inference Protocol's
    gRPC service, inference.GRPCInferenceService (tritonclient.grpc).

    Binds 127.0.0.1 unless --host says otherwise; also a SageMaker container's `serve`
    command (port 8080). On SIGTERM it stops accepting, finishes the requests in flight,
    records their results and exits 0.
    """
    import uvicorn

    from ..alerts.dispatcher import Alerting
    from ..capture import check_capture_folder
    from ..logs import Throttle
    from ..server import create_app
    from ..server.app import load_models
    from ..server.connections import connection_limit, guarded_protocol
    from ..server.sigv4 import verifier_of
    from ..store import Store

    loaded = load_cli_settings(_models_of(kwargs))
    settings = loaded.settings
    # A token that cannot guard anything (empty, an unreadable file) stops start-up here,
    # before the model loads, as does a SigV4 key without its secret.
    _ = settings.token
    verifier_of(settings)
    check_capture_folder(settings)
    # A subscription that cannot work: a usage error now.
    alerting = Alerting(
        settings,
        direct=[*settings.sagemaker_async_success_notify, *settings.sagemaker_async_error_notify],
    )
    # Opened here, not in the app's start-up, so that a store that cannot be reached or a
    # model that is missing is a one-line error with its exit code, not uvicorn's traceback.
    _check_grpc_port(settings.host, settings.port, settings.served_grpc_port)
    store = Store(settings.store_url)
    # A line per malformed request (uvicorn's), or per request of a kind strangers can send,
    # would let them grow the log without bound: past a few a minute, a summary line.
    throttle = Throttle()
    throttled = [logging.getLogger(name) for name in THROTTLED_LOGGERS]
    for logger in throttled:
        logger.addFilter(throttle)
    try:
        alerting.attach(store)
        runtimes = load_models(settings)
        grpc_port = settings.served_grpc_port
        # A threshold set in a file, the environment or a flag is every model's default;
        # else each model's own card's (or the setting's default).
        chosen = loaded.sources["threshold"] != "default" and not loaded.sources[
            "threshold"
        ].startswith("card ")
        app = create_app(
            settings,
            runtimes=runtimes,
            store=store,
            grpc_port=grpc_port,
            card_thresholds=not chosen,
        )
        for runtime in runtimes:
            device = getattr(getattr(runtime, "device", None), "name", "cpu")
            log.info(
                "serving %s %s on %s at http://%s:%d, %s, replica %s",
                runtime.card.name,
                runtime.card.version,
                device,
                settings.host,
                settings.port,
                f"gRPC at {settings.host}:{grpc_port}" if grpc_port else "gRPC off",
                owner_of(settings),
            )
        # uvicorn handles SIGINT and SIGTERM while it serves (a graceful shutdown), then
        # raises them again for the handlers it found: ignored, so the exit is a clean 0.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        try:
            uvicorn.run(
                app,
                host=settings.host,
                port=settings.port,
                http=guarded_protocol(
                    settings.header_timeout_s,
                    max_connections=connection_limit(settings.max_connections),
                    metrics=app.state.metrics,
                ),
                # No route is a WebSocket: an upgrade is answered as plain HTTP.
                ws="none",
                # X-Forwarded-For from the trusted proxies only (uvicorn's own default
                # believes any local process, which could then pose as any address).
                proxy_headers=bool(settings.trusted_proxies),
                forwarded_allow_ips=settings.trusted_proxies or None,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
            )
        except SystemExit as e:
            # uvicorn exits 3 when it cannot start (a port in use, an address not here),
            # which is ICS's code for a bug: say what it is instead.
            if e.code in (0, None):
                raise
            raise EnvironmentUnavailable(
                f"cannot serve on {settings.host}:{settings.port} (the reason is on the line "
                "above); choose another --port or --host"
            ) from None
    finally:
        throttle.close()
        for logger in throttled:
            logger.removeFilter(throttle)
        alerting.close()
        store.close()


def _check_grpc_port(host: str, port: int, grpc_port: int) -> None:
    """Refuse, before the model loads, a gRPC port that is the HTTP one or is taken."""
    if not grpc_port:
        return
    if grpc_port == port:
        raise EnvironmentUnavailable(
            f"--grpc-port {grpc_port} is the HTTP port: choose another (0 turns gRPC off)"
        )
    try:
        infos = socket.getaddrinfo(host, grpc_port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        raise EnvironmentUnavailable(
            f"cannot serve gRPC on {host}:{grpc_port} ({e.strerror or e}); choose another "
            "--grpc-port (0 turns gRPC off) or --host"
        ) from None


def _models_of(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The flags as settings: `--model A --model B` is model A, the default, and
    serve_models [B]; `--model all` alone keeps the default model and serves every other."""
    flags = dict(kwargs)
    models = list(flags.pop("model", None) or ())
    if models:
        if models[0] != ALL_MODELS:
            flags["model"] = models.pop(0)
        flags["serve_models"] = models
    if not flags.get("variants"):
        flags.pop("variants", None)  # unset: ics.toml's or the environment's hold
    else:
        flags["variants"] = list(flags["variants"])
    return flags
