"""Error responses, in the one place that chooses their shape by the request's path.

The Open Inference Protocol's errors (/v2) are `{"error": "message"}`: tritonclient reads
`error` as a string and cannot print an object. Everywhere else (the ICS API, SageMaker)
they are `{"error": {"type", "message"}}`; on the SageMaker routes, that and SageMaker's
own error (the `x-amzn-ErrorType` header, `Message`..., with SageMaker's status: see
`sagemaker_wire.aws_error`; `__type` too on the SageMaker API's `/`). The app's exception
handlers and the wrappers (token, body limit) all answer through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from .sagemaker_wire import CONTROL_PATH, AwsError, aws_error, speaks_sagemaker

#: Paths of the Open Inference Protocol.
PROTOCOL_PREFIX = "/v2"


def request_path(scope: Mapping[str, Any]) -> str:
    """The request's path inside the app (without the root path a proxy mounts it under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def speaks_protocol(path: str) -> bool:
    """Whether errors on this path take the Open Inference Protocol's shape."""
    return path.startswith(PROTOCOL_PREFIX)


def error_body(path: str, kind: str, message: str, *, named: bool = False) -> dict[str, Any]:
    """The error document for a request to `path`.

    `named`: the kind is a domain error's type (InvalidImage...), which the status alone
    does not tell; the protocol's string then starts with it, as it has no `type` field.
    """
    if speaks_protocol(path):
        return {"error": f"{kind}: {message}" if named else message}
    return {"error": {"type": kind, "message": message}}


def error_answer(
    path: str, status: int, kind: str, message: str, *, method: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """The status, encoded body and headers of an error, for the wrappers that answer with
    plain ASGI messages."""
    if speaks_sagemaker(path, method):
        aws = aws_error(status, kind, message)
        return aws.status, json.dumps(_aws_body(path, aws)).encode(), aws.headers()
    return status, json.dumps(error_body(path, kind, message)).encode(), {}


def error_response(
    path: str,
    status: int,
    kind: str,
    message: str,
    *,
    named: bool = False,
    headers: Mapping[str, str] | None = None,
    method: str | None = None,
) -> JSONResponse:
    if speaks_sagemaker(path, method):
        aws = aws_error(status, kind, message)
        return JSONResponse(
            _aws_body(path, aws), status_code=aws.status, headers=aws.headers(headers)
        )
    return JSONResponse(
        error_body(path, kind, message, named=named),
        status_code=status,
        headers=None if headers is None else dict(headers),
    )


def _aws_body(path: str, aws: AwsError) -> dict[str, Any]:
    # The SageMaker API's JSON 1.1 errors: botocore's JSON parser takes the code from
    # `__type` (the runtime's rest-json parser, from x-amzn-ErrorType).
    return {"__type": aws.code, **aws.body} if path == CONTROL_PATH else aws.body


def invalid_request_status(path: str) -> int:
    """A request that fails validation: 400 in the protocol (as Triton answers), else 422."""
    return 400 if speaks_protocol(path) else 422
