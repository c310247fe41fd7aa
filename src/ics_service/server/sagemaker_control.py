"""The SageMaker API's reads of the served endpoint, which SDK helpers call before they
invoke: `DescribeEndpoint` and `DescribeEndpointConfig`. boto3's `sagemaker` client, given
an `endpoint_url`, posts them to `/` in AWS's JSON 1.1 protocol: the action in
`X-Amz-Target: SageMaker.ACTION`, the parameters as a JSON body.

They answer the served state: any endpoint (or endpoint configuration) name is this server,
as on the runtime routes (`sagemaker`), with status InService; its production variants
(`variants`) with their weights and one instance each; its data capture (`capture`...).
Every other action of the SageMaker API is refused with a 400 that names the two served.
Behind the same credentials as the invocations (a bearer token, or a SigV4 signature by the
configured key: boto3 signs for `sagemaker`, as the runtime client does).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..config import Settings
from .sagemaker_wire import CONTROL_PATH, ERROR_TYPE_HEADER
from .service import Service
from .variants import Variants

router = APIRouter()

TARGET_HEADER = "X-Amz-Target"
TARGET_PREFIX = "SageMaker."
JSON_11 = "application/x-amz-json-1.1"
#: The actions answered.
SERVED = ("DescribeEndpoint", "DescribeEndpointConfig")
#: The account in the ARNs (ICS has none) and the region when the request names none.
ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"
#: A SigV4 credential scope's region (Credential=KEY/DAY/REGION/SERVICE/aws4_request).
_REGION = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/")


@router.post(
    CONTROL_PATH,
    summary="The SageMaker API's DescribeEndpoint and DescribeEndpointConfig (boto3's "
    "`sagemaker` client: JSON 1.1, X-Amz-Target: SageMaker.ACTION)",
    response_description="The served endpoint or endpoint configuration, as SageMaker "
    "describes one.",
    responses={400: {"description": "an action ICS does not serve, or a bad request"}},
)
async def control(request: Request) -> Response:
    target = request.headers.get(TARGET_HEADER, "")
    action = target.removeprefix(TARGET_PREFIX) if target.startswith(TARGET_PREFIX) else None
    served = " and ".join(TARGET_PREFIX + a for a in SERVED)
    if action not in SERVED:
        what = f"the action {target}" if target else "a request without X-Amz-Target"
        return _error(
            "UnknownOperationException",
            f"ICS does not serve {what}: of the SageMaker API it answers only {served} "
            "(of the served endpoint); the endpoint is configured in ics.toml or by `ics "
            "serve`'s flags.",
        )
    try:
        params = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        params = None
    key = "EndpointName" if action == "DescribeEndpoint" else "EndpointConfigName"
    name = params.get(key) if isinstance(params, dict) else None
    if not isinstance(name, str) or not name:
        return _error(
            "ValidationException",
            f"1 validation error detected: {key} must be given, in a JSON object body",
        )
    service: Service = request.app.state.service
    variants: Variants = request.app.state.variants
    region = _region(request)
    if action == "DescribeEndpoint":
        body = describe_endpoint(name, service, variants, region)
    else:
        body = describe_endpoint_config(name, service, variants, region)
    return JSONResponse(body, media_type=JSON_11)


def _error(code: str, message: str) -> JSONResponse:
    # botocore's JSON parser reads the code from __type (or x-amzn-ErrorType), the message
    # from `message`.
    return JSONResponse(
        {"__type": code, "message": message},
        status_code=400,
        media_type=JSON_11,
        headers={ERROR_TYPE_HEADER: code},
    )


def _region(request: Request) -> str:
    match = _REGION.search(request.headers.get("authorization", ""))
    return match[1] if match else DEFAULT_REGION


def _arn(region: str, kind: str, name: str) -> str:
    return f"arn:aws:sagemaker:{region}:{ACCOUNT}:{kind}/{name.lower()}"


def describe_endpoint(
    name: str, service: Service, variants: Variants, region: str
) -> dict[str, Any]:
    """DescribeEndpoint's answer: the endpoint `name` as this server serves it."""
    started = service.started.timestamp()
    body: dict[str, Any] = {
        "EndpointName": name,
        "EndpointArn": _arn(region, "endpoint", name),
        "EndpointConfigName": name,
        "ProductionVariants": [
            {
                "VariantName": v.name,
                "DeployedImages": [
                    {
                        "SpecifiedImage": f"ics:{_version(service, v.model)}",
                        "ResolvedImage": f"ics:{_version(service, v.model)}",
                        "ResolutionTime": started,
                    }
                ],
                "CurrentWeight": v.weight,
                "DesiredWeight": v.weight,
                "CurrentInstanceCount": 1,
                "DesiredInstanceCount": 1,
            }
            for v in variants.all
        ],
        "EndpointStatus": "InService",
        "CreationTime": started,
        "LastModifiedTime": started,
    }
    settings = service.settings
    if settings.capture is not None:
        body["DataCaptureConfig"] = {
            "EnableCapture": True,
            "CaptureStatus": "Stopped" if _capture_failed(service) else "Started",
            "CurrentSamplingPercentage": _percent(settings.capture_sampling),
            "DestinationS3Uri": settings.capture,
        }
    return body


def describe_endpoint_config(
    name: str, service: Service, variants: Variants, region: str
) -> dict[str, Any]:
    """DescribeEndpointConfig's answer: the served variants and data capture, as the
    configuration `name`."""
    body: dict[str, Any] = {
        "EndpointConfigName": name,
        "EndpointConfigArn": _arn(region, "endpoint-config", name),
        "ProductionVariants": [
            {
                "VariantName": v.name,
                "ModelName": v.model,
                "InitialInstanceCount": 1,
                "InitialVariantWeight": v.weight,
            }
            for v in variants.all
        ],
        "CreationTime": service.started.timestamp(),
    }
    capture = _capture_config(service.settings)
    if capture is not None:
        body["DataCaptureConfig"] = capture
    return body


def _capture_config(settings: Settings) -> dict[str, Any] | None:
    if settings.capture is None:
        return None
    modes = {
        "input": ["Input"],
        "output": ["Output"],
        "input_and_output": ["Input", "Output"],
    }[settings.capture_mode]
    return {
        "EnableCapture": True,
        "InitialSamplingPercentage": _percent(settings.capture_sampling),
        "DestinationS3Uri": settings.capture,
        "CaptureOptions": [{"CaptureMode": mode} for mode in modes],
    }


def _percent(sampling: float) -> int | float:
    # SageMaker's percentages are whole numbers; ICS's may not be, and are given as they are.
    return int(sampling) if sampling == int(sampling) else sampling


def _version(service: Service, model: str) -> str:
    served = {m.name: m for m in service.served()}
    found = served.get(model)
    return f"{model}-{found.runtime.card.version}" if found is not None else model


def _capture_failed(service: Service) -> bool:
    return service.capture is not None and service.capture.error is not None
