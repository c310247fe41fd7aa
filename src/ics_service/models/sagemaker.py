"""A SageMaker endpoint as a model runtime (`sagemaker:ENDPOINT[/VARIANT]`), as the original
ClassifyImage Lambda calls it: boto3's `sagemaker-runtime` `invoke_endpoint` with one
encoded image per invocation.

The region, the endpoint URL and the credentials come from boto3's standard chain
(AWS_DEFAULT_REGION, or AWS_REGION as the other SDKs read it; AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME
or AWS_ENDPOINT_URL; AWS_PROFILE, the instance role...). botocore's own retries are off: the
ClassifyImage retry policy retries throttling, 5xx answers and lost connections
(`EndpointUnavailable`), so the two never multiply. A ModelError of the endpoint, or an
answer ICS cannot read, is the item's `ModelError`, naming the endpoint.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ConfigError, EndpointUnavailable, ModelError, UsageError
from ..modelcard import ModelCard
from .answers import checked, error_of, probabilities_of

#: The prefix of a SageMaker model spec: `sagemaker:ENDPOINT[/VARIANT][?target_model=M]`.
PREFIX = "sagemaker:"
#: SageMaker's rule for endpoint and variant names.
NAME_RULE = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,62}$")
#: Error codes of sagemaker-runtime worth another try: throttling, a model not loaded yet
#: (multi-model endpoints), the service's own failures.
TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "ModelNotReadyException",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalDependencyException",
        "InternalStreamFailure",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


@dataclass(frozen=True)
class Endpoint:
    """Where invocations go: the endpoint, and optionally its variant and target model."""

    name: str
    variant: str | None = None
    #: The model of a multi-model endpoint (boto3's TargetModel, e.g. "model-a.tar.gz").
    target_model: str | None = None

    def __str__(self) -> str:
        spec = PREFIX + self.name + (f"/{self.variant}" if self.variant else "")
        if self.target_model:
            spec += "?target_model=" + urllib.parse.quote(self.target_model, safe="/.-_")
        return spec

    def describe(self) -> str:
        """The endpoint as messages name it."""
        out = f"SageMaker endpoint {self.name}"
        if self.variant:
            out += f" (variant {self.variant})"
        if self.target_model:
            out += f" (target model {self.target_model})"
        return out


def parse_spec(spec: str) -> Endpoint:
    """`sagemaker:ENDPOINT[/VARIANT][?target_model=M]` → Endpoint; UsageError saying what
    is wrong with it."""
    if not spec.startswith(PREFIX):
        raise UsageError(f"{spec!r} is not a SageMaker model: write sagemaker:ENDPOINT[/VARIANT]")
    rest, _, query = spec[len(PREFIX) :].partition("?")
    name, _, variant = rest.partition("/")
    target = None
    if query:
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(params) - {"target_model"})
        if unknown or len(params.get("target_model", [])) != 1:
            raise UsageError(
                f"{spec!r}: after '?' only target_model=MODEL may follow (the model of a "
                "multi-model endpoint, once)"
            )
        target = params["target_model"][0]
    return endpoint_of(name, variant or None, target, spec=spec)


def endpoint_of(
    name: str, variant: str | None = None, target_model: str | None = None, *, spec: str = ""
) -> Endpoint:
    where = f"{spec!r}: " if spec else ""
    if not NAME_RULE.match(name):
        raise UsageError(
            f"{where}{name!r} is not a SageMaker endpoint name (letters, digits and hyphens, "
            "at most 63, starting with a letter or digit)"
        )
    if variant is not None and not NAME_RULE.match(variant):
        raise UsageError(
            f"{where}{variant!r} is not a production variant name (letters, digits and "
            "hyphens, at most 63)"
        )
    if target_model is not None and not 1 <= len(target_model) <= 1024:
        raise UsageError(f"{where}the target model must be 1 to 1024 characters")
    return Endpoint(name, variant, target_model)


def client_of(*, timeout_s: float, concurrency: int) -> Any:
    """A `sagemaker-runtime` client from boto3's standard chain, with botocore's retries off
    (ICS's ClassifyImage policy retries) and a connection per concurrent call.

    ConfigError when the chain gives no region or no credentials, saying where to set them.
    """
    import boto3
    import botocore.config
    from botocore.exceptions import BotoCoreError, NoRegionError

    config = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        max_pool_connections=concurrency,
        user_agent_extra=f"ics/{__version__}",
    )
    # botocore reads AWS_DEFAULT_REGION only; the other SDKs and Lambda set AWS_REGION.
    region = None if os.environ.get("AWS_DEFAULT_REGION") else os.environ.get("AWS_REGION")
    try:
        session = boto3.session.Session(region_name=region or None)
        client = session.client("sagemaker-runtime", config=config)
        credentials = session.get_credentials()
    except NoRegionError:
        raise ConfigError(
            "a SageMaker model needs an AWS region: set AWS_DEFAULT_REGION (or AWS_REGION), "
            "or a region in the AWS profile (AWS_PROFILE, ~/.aws/config)"
        ) from None
    except (BotoCoreError, ValueError) as e:
        raise ConfigError(f"cannot make a SageMaker runtime client: {e}") from None
    if credentials is None:
        raise ConfigError(
            "a SageMaker model needs AWS credentials, and boto3's chain found none: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a role"
        )
    client.meta.events.register("before-parse.sagemaker-runtime.InvokeEndpoint", _read_plain_errors)
    return client


def _read_plain_errors(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    """Give botocore the message of an error answer without SageMaker's error fields.

    botocore reads an error's code from `x-amzn-ErrorType` (or `__type`) and its message from
    `message`; a container or proxy answering `{"error": {"type", "message"}}` (ICS's own
    server) or `{"error": "message"}` would otherwise raise with an empty message.
    """
    status = response_dict.get("status_code", 200)
    headers = {k.lower(): v for k, v in (response_dict.get("headers") or {}).items()}
    body = response_dict.get("body")
    if status < 300 or "x-amzn-errortype" in headers or not isinstance(body, bytes):
        return
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("__type" in doc or "message" in doc or "Message" in doc):
        return  # botocore reads these itself
    kind, message = error_of(body)
    if kind or message:
        customized_response_dict["Error"] = {"Code": kind or str(status), "Message": message}


class SageMakerRuntime:
    """A model card served by a SageMaker endpoint: each image is one `invoke_endpoint`.

    Thread-safe: the engine calls it from `remote_concurrency` threads at once.
    """

    takes = "bytes"
    remote = True
    #: Images per call: SageMaker's runtime API takes one body.
    max_batch = 1

    def __init__(
        self,
        card: ModelCard,
        endpoint: Endpoint,
        *,
        timeout_s: float = 30.0,
        concurrency: int = 8,
        client: Any = None,
    ) -> None:
        self.card = card
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.client = client or client_of(timeout_s=timeout_s, concurrency=concurrency)
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"SageMakerRuntime({self.card.name!r}, {self.endpoint})"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise UsageError(
            f"model {self.card.name} is a SageMaker endpoint: it classifies encoded images, "
            "not tensors"
        )

    def predict_bytes(
        self, images: Sequence[bytes], *, content_types: Sequence[str] | None = None
    ) -> np.ndarray:
        types = content_types or ["application/x-image"] * len(images)
        rows = []
        labels = None
        for body, content_type in zip(images, types, strict=True):
            doc = self.invoke(body, content_type)
            got, labels = probabilities_of(doc, where=self.endpoint.describe())
            if len(got) != 1:
                raise ModelError(
                    f"{self.endpoint.describe()} answered {len(got)} rows of scores for one image"
                )
            rows.append(got[0])
        return checked(
            rows, self.card, where=self.endpoint.describe(), count=len(images), labels=labels
        )

    def labels_of_endpoint(self, image: bytes) -> tuple[int, list[str] | None]:
        """How many classes the endpoint answers for `image` (a JPEG), and their names
        when its answer gives them (`{"probabilities": [...], "labels": [...]}`)."""
        rows, labels = probabilities_of(
            self.invoke(image, "image/jpeg"), where=self.endpoint.describe()
        )
        return len(rows[0]), labels

    def invoke(self, body: bytes, content_type: str) -> Any:
        """One invocation's answer, read as JSON."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        kwargs: dict[str, Any] = {
            "EndpointName": self.endpoint.name,
            "Body": body,
            "ContentType": content_type,
            "Accept": "application/json",
        }
        if self.endpoint.variant:
            kwargs["TargetVariant"] = self.endpoint.variant
        if self.endpoint.target_model:
            kwargs["TargetModel"] = self.endpoint.target_model
        where = self.endpoint.describe()
        try:
            answer = self.client.invoke_endpoint(**kwargs)
            data = answer["Body"].read()
        except ClientError as e:
            raise _client_error(where, e) from None
        except ReadTimeoutError:
            raise EndpointUnavailable(
                f"{where} did not answer within {self.timeout_s:g} s (remote_timeout_s)"
            ) from None
        except (EndpointConnectionError, ConnectionClosedError) as e:
            raise EndpointUnavailable(f"{where} cannot be reached: {e}") from None
        except BotoCoreError as e:  # a connection lost mid-answer, a bad endpoint URL...
            raise EndpointUnavailable(f"{where}: {type(e).__name__}: {e}") from None
        try:
            return json.loads(data)
        except ValueError:
            kind = answer.get("ContentType") or "no content type"
            raise ModelError(
                f"{where} answered {len(data)} bytes of {kind} that are not JSON; ICS reads a "
                'JSON array of probabilities or {"predictions": [...]}'
            ) from None

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self.client.close()


def _client_error(where: str, e: Any) -> Exception:
    """The ItemError of a ClientError: transient ones (throttling, 5xx, 429) are
    EndpointUnavailable, retried; the rest are ModelError."""
    error = e.response.get("Error", {})
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "").strip()
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    said = f"{code}: {message}" if message and code != str(status) else message or code
    if code in TRANSIENT_CODES or status >= 500 or status == 429:
        what = "is throttling" if "Throttl" in code or status == 429 else f"answered {status}"
        return EndpointUnavailable(f"{where} {what}: {said}")
    if code == "ModelError":
        original = e.response.get("OriginalStatusCode")
        more = f" (the model answered {original})" if original else ""
        return ModelError(f"{where}: ModelError{more}: {message or 'no message'}")
    return ModelError(f"{where} refused the image ({status} {said})")
