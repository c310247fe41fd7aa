"""The Open Inference Protocol over gRPC: KServe's `inference.GRPCInferenceService` as Triton
serves it on its own port, for `tritonclient.grpc`.

It serves ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelConfig, ModelStatistics, RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload
with the HTTP routes' models and documents (v2.py, v2_models.py; a JSON document is parsed
into its message): inference goes through the same service and batcher, and the request's
tensors (`contents` or `raw_input_contents`) are read by v2_wire as the HTTP binary tensor
data is. Every other RPC of the service answers UNIMPLEMENTED, saying which exist. The API
token is the `authorization: Bearer TOKEN` metadata (the health RPCs are open, as
/v2/health is); a message over max_body_bytes is refused by gRPC (RESOURCE_EXHAUSTED), as
are RPCs beyond max_connections at once (the HTTP endpoint's cap on connections).

The messages come from Triton's grpc_service.proto (proto/, with its model_config.proto),
compiled into a descriptor set (proto/grpc_service.binpb) and loaded into a pool of their
own: no generated code, so no protobuf version to match, and no clash with tritonclient's
copy of the same messages in the default pool. CONTRIBUTING.md says how to compile it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from .. import __version__
from ..engine.batcher import QueueFull
from ..errors import IcsError
from .connections import connection_limit
from .service import RETRY_AFTER_S, Service
from .v2 import (
    EXTENSIONS,
    SERVER_NAME,
    classify_inputs,
    load_model,
    model_metadata,
    repository_index_of,
    served,
    stats_of,
    unload_model,
    using,
)
from .v2_models import model_config
from .v2_wire import ProtocolError, inputs_of, outputs_of, raw_output, serialize_bytes

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
#: The RPCs answered without the API token, as /v2/health/live and /ready are.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
SERVED = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC status of an HTTP status, as Triton maps them."""
    default = grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT
    return _CODES.get(status, default)


def _pool() -> descriptor_pool.DescriptorPool:
    data = resources.files(__package__).joinpath("proto/grpc_service.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.AddSerializedFile(file.SerializeToString())
    return pool


_POOL = _pool()


def message(name: str) -> Any:
    """The class of the message `inference.NAME`."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"inference.{name}"))


class _Messages:
    """The message classes the served RPCs read and write."""

    def __init__(self) -> None:
        for name in SERVED:
            setattr(self, f"{name}Request", message(f"{name}Request"))
            setattr(self, f"{name}Response", message(f"{name}Response"))

    def __getattr__(self, name: str) -> Any:  # the classes set above, typed as Any
        raise AttributeError(name)


M = _Messages()

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _parameters(params: Any) -> dict[str, Any]:
    """A protobuf map of InferParameter as the JSON parameters the HTTP path reads."""
    out = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = None if choice is None else getattr(param, choice)
    return out


def request_doc(request: Any) -> tuple[dict[str, Any], bytes]:
    """A ModelInferRequest as the HTTP path's JSON inference header and binary data: each
    input's tensor (raw_input_contents, or its typed contents) as binary tensor data."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            400,
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one for "
            "each input, or none",
        )
    specs = []
    binary = b""
    for i, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise ProtocolError(
                    400, f"input {tensor.name}: give raw_input_contents or contents, not both"
                )
            binary = raw[i]
        elif tensor.datatype == "BYTES":
            binary = serialize_bytes(tensor.contents.bytes_contents)
        else:
            binary = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        params = _parameters(tensor.parameters)
        params["binary_data_size"] = len(binary)
        specs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": params,
            }
        )
    doc: dict[str, Any] = {"id": request.id, "inputs": specs}
    params = _parameters(request.parameters)
    params.pop("binary_data_output", None)  # gRPC's outputs are always binary
    doc["parameters"] = params
    if request.outputs:
        doc["outputs"] = [
            {"name": out.name, "parameters": _parameters(out.parameters)} for out in request.outputs
        ]
    return doc, binary


class Endpoint:
    """The served RPCs of a service."""

    def __init__(self, service: Service) -> None:
        self.settings = service.settings
        self.service = service

    async def server_live(self, _request: Any) -> Any:
        return M.ServerLiveResponse(live=True)

    async def server_ready(self, _request: Any) -> Any:
        return M.ServerReadyResponse(ready=self.service.ready)

    async def model_ready(self, request: Any) -> Any:
        # An unknown model is not ready, as tritonclient.http's is_model_ready reads a 404.
        try:
            served(self.service, request.name, request.version or None)
        except ProtocolError:
            return M.ModelReadyResponse(ready=False)
        return M.ModelReadyResponse(ready=True)

    async def server_metadata(self, _request: Any) -> Any:
        return M.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def model_metadata(self, request: Any) -> Any:
        model = served(self.service, request.name, request.version or None)
        doc = model_metadata(model.runtime.card)
        return M.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=doc["inputs"],
            outputs=doc["outputs"],
        )

    async def model_infer(self, request: Any) -> Any:
        # Held for the call: a model swapped meanwhile finishes it before it closes.
        with using(self.service, request.model_name, request.model_version or None) as model:
            card = model.runtime.card
            doc, binary = request_doc(request)
            inputs = inputs_of(doc, binary, card)
            outputs = outputs_of(doc)
            probs = await classify_inputs(model, inputs)
        response = M.ModelInferResponse(
            model_name=card.name, model_version=card.version, id=request.id
        )
        for out in outputs:
            datatype, shape, blob = raw_output(out, card, probs)
            response.outputs.add(name=out.name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(blob)
        return response

    async def model_config(self, request: Any) -> Any:
        model = served(self.service, request.name, request.version or None)
        return _parsed({"config": model_config(model)}, M.ModelConfigResponse())

    async def model_statistics(self, request: Any) -> Any:
        doc = stats_of(self.service, request.name or None, request.version or None)
        return _parsed(doc, M.ModelStatisticsResponse())

    async def repository_index(self, _request: Any) -> Any:
        doc = {"models": repository_index_of(self.service)}
        return _parsed(doc, M.RepositoryIndexResponse())

    async def repository_model_load(self, request: Any) -> Any:
        await load_model(self.service, request.model_name)
        return M.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any) -> Any:
        await unload_model(self.service, request.model_name)
        return M.RepositoryModelUnloadResponse()

    def handlers(self) -> grpc.GenericRpcHandler:
        """The service's handlers: the served RPCs, and UNIMPLEMENTED for the others."""
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in _POOL.FindServiceByName(SERVICE).methods:
            name = method.name
            if name in SERVED:
                snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name)[1:]
                methods[name] = grpc.unary_unary_rpc_method_handler(
                    self._answer(getattr(self, snake)),
                    request_deserializer=getattr(M, f"{name}Request").FromString,
                    response_serializer=_serialize,
                )
            else:
                methods[name] = _refusal(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"ICS's gRPC endpoint does not serve {name}: it serves "
                    f"{', '.join(SERVED)} (Triton's HTTP/REST routes under /v2 are served too)",
                    streaming=method.client_streaming,
                )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _answer(self, rpc: Callable[[Any], Awaitable[Any]]) -> Handler:
        timeout_s = self.settings.request_timeout_s

        async def answer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await rpc(request)
            except ProtocolError as e:
                code, text = code_of(e.status), str(e)
            except IcsError as e:
                code, text = code_of(e.http_status), f"{e.type}: {e}"
            except QueueFull as e:
                code = grpc.StatusCode.UNAVAILABLE
                text = f"the server is busy: {e}; retry in {RETRY_AFTER_S} s"
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                text = f"no answer within request_timeout_s={timeout_s:g}"
            except Exception as e:
                log.exception("gRPC %s failed", getattr(rpc, "__name__", "call"))
                code = grpc.StatusCode.INTERNAL
                text = (
                    f"an internal failure ({type(e).__name__}: a bug in ICS; its traceback is "
                    "in the server's log, please report it)"
                )
            await context.abort(code, text)

        return answer


def _parsed(doc: dict[str, Any], into: Any) -> Any:
    """`into`, filled from the HTTP route's JSON document of the same message."""
    return json_format.ParseDict(doc, into)


def _serialize(response: Any) -> bytes:
    data: bytes = response.SerializeToString()
    return data


def _refusal(
    code: grpc.StatusCode, text: str, *, streaming: bool = False
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that refuses the call with `code` without reading its messages: it takes
    them as a stream (the wire is the same) and reads none, so a refused call's message is
    not gathered in memory first."""
    if streaming:

        async def refuse_stream(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(code, text)
            yield  # an async generator, as a streaming handler is

        return grpc.stream_stream_rpc_method_handler(refuse_stream)

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, text)

    return grpc.stream_unary_rpc_method_handler(refuse)


class Authenticate(grpc.aio.ServerInterceptor):
    """The API token on every RPC but the health ones: `authorization: Bearer TOKEN`."""

    def __init__(self, token: str | None, sigv4: bool) -> None:
        self.token = token.encode() if token else None
        self.sigv4 = sigv4

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method.rsplit("/", 1)[-1]
        if method in OPEN_METHODS and details.method.startswith(f"/{SERVICE}/"):
            return await continuation(details)
        auth = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                auth = value
        scheme, _, credentials = auth.partition(" ")
        if self.token is None:
            text = (
                "this server accepts only AWS SigV4-signed SageMaker invocations over HTTP; "
                "gRPC needs an API token (set api_token or --token-file)"
            )
        elif scheme.lower() != "bearer":
            text = "this server needs an API token: send the metadata `authorization: Bearer TOKEN`"
        # Constant time: a wrong token takes as long to refuse whatever it shares.
        elif hmac.compare_digest(credentials.strip().encode(), self.token):
            return await continuation(details)
        else:
            text = "the API token is wrong"
        return _refusal(grpc.StatusCode.UNAUTHENTICATED, text)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcUnavailable(Exception):
    """The gRPC port cannot be bound."""


async def start_grpc(service: Service, port: int) -> grpc.aio.Server:
    """A started gRPC server of the service on its host and `port`, with the API's token
    (when a token or SigV4 keys guard the API), max_body_bytes as its message limit and
    max_connections as its limit of RPCs at once."""
    settings = service.settings
    token = settings.token
    guarded = token is not None or settings.sigv4_access_key_id is not None
    server = grpc.aio.server(
        maximum_concurrent_rpcs=connection_limit(settings.max_connections),
        interceptors=[Authenticate(token, sigv4=not token)] if guarded else [],
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # Without it a port that another gRPC server holds is bound a second time.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((Endpoint(service).handlers(),))
    address = _address(settings.host, port)
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise GrpcUnavailable(f"cannot serve gRPC on {address}: {e}") from None
    await server.start()
    return server
