"""The SNS alert channel: `sns://arn:aws:sns:REGION:ACCOUNT:TOPIC`, published with boto3.

Credentials come from the standard AWS chain (environment, shared files, instance or task
role). The endpoint is `endpoint_url` when given, else what botocore itself reads
(`AWS_ENDPOINT_URL_SNS`, `AWS_ENDPOINT_URL`, the config file), else AWS's.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import UsageError
from ..policies import transient_status
from .delivery import DeliveryError, NotFromHere
from .documents import clip

SCHEME = "sns://"

_ARN = re.compile(
    r"arn:(?P<partition>aws(?:-[a-z]+)*):sns:(?P<region>[a-z]{2,5}(?:-[a-z0-9]+)+-\d+):"
    r"(?P<account>\d{12}):(?P<topic>[A-Za-z0-9_-]{1,256}(?:\.fifo)?)"
)

#: SNS rejects a longer Subject.
MAX_SUBJECT = 100

#: Error codes SNS (and AWS in general) answers when trying again later may succeed.
_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "KMSThrottling",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

#: The alert fields sent as message attributes, so subscribers can filter on them.
_ATTRIBUTES = ("kind", "execution_id")

# Errors from AWS may quote the endpoint; a URL's user:password must not reach a log.
_USERINFO = re.compile(r"//[^/@\s]*@")


def _one_line(text: str, limit: int = 300) -> str:
    text = _USERINFO.sub("//", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def subject_of(title: str) -> str:
    """The title as an SNS Subject: ASCII, one line, at most 100 characters."""
    # NFKD splits accented letters into letter + accent, so "é" keeps its "e".
    ascii_only = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    # SNS rejects control characters and line breaks, and a Subject that starts with a space.
    text = " ".join("".join(c if c.isprintable() else " " for c in ascii_only).split())
    return clip(text, MAX_SUBJECT) if text else "ICS alert"


class SnsChannel:
    """Publishes each alert to one SNS topic: the JSON document as the message."""

    def __init__(self, url: str, *, timeout_s: float, endpoint_url: str | None = None) -> None:
        arn = url[len(SCHEME) :] if url.startswith(SCHEME) else ""
        match = _ARN.fullmatch(arn)
        if match is None:
            raise UsageError(
                f"bad SNS alert channel {url!r}: expected sns://arn:aws:sns:REGION:ACCOUNT:TOPIC "
                "(for example sns://arn:aws:sns:eu-west-1:123456789012:ics-alerts)"
            )
        self.url = url
        self.topic_arn = arn
        self.fifo = arn.endswith(".fifo")
        config = Config(
            # botocore applies each separately: halves keep one send within timeout_s.
            connect_timeout=timeout_s / 2,
            read_timeout=timeout_s / 2,
            # One attempt: the dispatcher retries with the Notify policy, and a botocore
            # retry loop inside it would stretch the timeout of this send.
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        try:
            self.client = boto3.session.Session().client(
                "sns", region_name=match["region"], endpoint_url=endpoint_url, config=config
            )
        except (BotoCoreError, ValueError) as exc:
            raise UsageError(f"SNS alert channel {url}: {_one_line(str(exc))}") from None

    def shown(self) -> str:
        return self.url

    def close(self) -> None:
        self.client.close()

    def send(
        self, alert: Mapping[str, Any], title: str, body: str, *, timeout_s: float | None = None
    ) -> None:
        """Publish `alert` as JSON; `body` is not sent (the message is the document).
        botocore sets timeouts per client, so `timeout_s` cannot shorten this send's."""
        attributes = {
            name: {"DataType": "String", "StringValue": str(alert[name])}
            for name in _ATTRIBUTES
            # SNS rejects an attribute with an empty value.
            if alert.get(name) not in (None, "")
        }
        request: dict[str, Any] = {
            "TopicArn": self.topic_arn,
            "Subject": subject_of(title),
            "Message": json.dumps(alert),
            "MessageAttributes": attributes,
        }
        if self.fifo:
            # A FIFO topic requires a group; SNS then drops a repeat of the same alert_id.
            request["MessageGroupId"] = str(alert.get("execution_id") or "ics")
            if alert.get("alert_id"):
                request["MessageDeduplicationId"] = str(alert["alert_id"])
        try:
            self.client.publish(**request)
        except ClientError as exc:
            raise _client_error(self.topic_arn, exc) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            # Connection refused or reset, DNS failure, connect or read timeout.
            raise DeliveryError(
                f"SNS at {self.client.meta.endpoint_url} cannot be reached: {_one_line(str(exc))}"
            ) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            # Another process on the store (with a role or a profile) may publish it.
            raise NotFromHere(
                f"no usable AWS credentials to publish to {self.topic_arn} ({_one_line(str(exc))}):"
                " set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role"
            ) from None
        except BotoCoreError as exc:
            raise DeliveryError(
                f"SNS publish to {self.topic_arn} failed: {_one_line(str(exc))}", transient=False
            ) from None


def _client_error(topic_arn: str, exc: ClientError) -> DeliveryError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    message = _one_line(str(error.get("Message") or exc))
    transient = code in _TRANSIENT_CODES or transient_status(status)
    if code == "NotFound":
        hint = ": create the topic or fix the ARN"
    elif code in ("AuthorizationError", "AccessDenied", "AccessDeniedException"):
        hint = ": grant sns:Publish on the topic to these credentials"
    elif code in ("InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException"):
        hint = ": check the AWS credentials"
    else:
        hint = ""
    return DeliveryError(
        f"SNS refused the publish to {topic_arn} ({code}, HTTP {status}): {message}{hint}",
        transient=transient,
    )
