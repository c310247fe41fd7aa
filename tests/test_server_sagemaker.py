"""The SageMaker protocol: `/ping`, `/invocations` and `/endpoints/{name}/invocations`, in
process and end to end with boto3's real `sagemaker-runtime` client, SigV4 included."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.parsers
import botocore.session
import httpx
import numpy as np
import pytest
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import ChecksumMismatch, EventStream
from botocore.exceptions import ClientError
from PIL import Image

from ics_service.config import Settings
from ics_service.engine.execution import REALTIME_PREFIX
from ics_service.errors import ConfigError
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.server.app import create_app
from ics_service.server.errors import error_response
from ics_service.server.sagemaker_wire import CSV, JSON, JSON_LINES, payload_parts
from ics_service.server.sigv4 import Verifier, verifier_of
from ics_service.store import Store
from ics_service.types import ItemResult, ItemStatus
from serving import client_of, error_of, serve_process

T = TypeVar("T")

ESPRESSO = 967
TOKEN = "test-token-0123456789"
KEY_ID = "AKIAICSTESTKEY000001"
SECRET = "ics/test/secret/0123456789abcdefghijklmn"
ENDPOINT = "/endpoints/ics/invocations"


def encoded(name: str = "coffee", fmt: str = "JPEG", **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_photo(name)).save(buf, fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee_jpeg() -> bytes:
    return encoded(quality=95)


def check_probabilities(probs: Any) -> np.ndarray:
    """The answer is the whole softmax of the coffee photo: espresso comes first."""
    assert isinstance(probs, list)
    assert len(probs) == 1000
    assert all(isinstance(p, float) for p in probs)
    arr = np.asarray(probs)
    assert abs(arr.sum() - 1.0) < 1e-3
    assert arr.min() >= 0.0
    assert int(arr.argmax()) == ESPRESSO
    return arr


def in_process(
    settings: Settings, runtime: OnnxRuntime, body: Callable[[httpx.AsyncClient], Awaitable[T]]
) -> T:
    """body(client) against the app in process, its lifespan running."""

    async def go() -> T:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            return await body(client)

    return asyncio.run(go())


def realtime_results(settings: Settings) -> list[ItemResult]:
    """The real-time results recorded in the settings' store (of every day: a test may
    run over midnight), oldest first."""
    store = Store(settings.store_url)
    try:
        days = [
            e
            for e in store.list_executions()
            if e.name is not None and e.name.startswith(REALTIME_PREFIX)
        ]
        assert days, "no real-time execution was recorded"
        days.sort(key=lambda e: e.name or "")
        return [r for e in days for r in store.results(e.id)]
    finally:
        store.close()


def sigv4_headers(
    url: str,
    body: bytes,
    *,
    key_id: str = KEY_ID,
    secret: str = SECRET,
    service: str = "sagemaker",
    region: str = "us-east-1",
    at: dt.datetime | None = None,
) -> dict[str, str]:
    """The headers botocore's own SigV4 signer gives a POST of body to url at a given time."""
    request = AWSRequest(
        method="POST", url=url, data=body, headers={"Content-Type": "application/x-image"}
    )
    timestamp = (at or dt.datetime.now(dt.UTC)).strftime(SIGV4_TIMESTAMP)
    request.context["timestamp"] = timestamp
    request.headers["X-Amz-Date"] = timestamp
    auth = SigV4Auth(Credentials(key_id, secret), service, region)
    signature = auth.signature(
        auth.string_to_sign(request, auth.canonical_request(request)), request
    )
    signed = auth.signed_headers(auth.headers_to_sign(request))
    return {
        "Content-Type": "application/x-image",
        "X-Amz-Date": timestamp,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={auth.scope(request)}, "
        f"SignedHeaders={signed}, Signature={signature}",
    }


# --- in process -------------------------------------------------------------------------


def test_ping_and_invocations_whatever_the_image_content_type(
    ics_home: Path, runtime: OnnxRuntime, coffee_jpeg: bytes
) -> None:
    settings = Settings(home=ics_home)
    png = encoded(fmt="PNG")
    cases = [
        ("/invocations", "image/jpeg", coffee_jpeg),
        ("/invocations", "application/x-image", coffee_jpeg),
        ("/invocations", "application/octet-stream", coffee_jpeg),
        ("/invocations", None, coffee_jpeg),
        ("/invocations", "image/png", png),
        # The label is the client's claim; the decoder goes by the bytes.
        ("/invocations", "image/jpeg", png),
        (ENDPOINT, "application/x-image", coffee_jpeg),
        ("/endpoints/another-name/invocations", "image/png", png),
    ]

    async def body(client: httpx.AsyncClient) -> None:
        ping = await client.get("/ping")
        assert ping.status_code == 200
        assert ping.json() == {
            "status": "ready",
            "model": "efficientnet-lite0",
            "device": "cpu",
            "models": {"efficientnet-lite0": "ready"},
        }
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"/ping", "/invocations", "/endpoints/{name}/invocations"} <= set(paths)
        answers = {}
        for path, kind, data in cases:
            headers = {} if kind is None else {"Content-Type": kind}
            r = await client.post(path, content=data, headers=headers)
            assert r.status_code == 200, (path, kind, r.text)
            assert r.headers["content-type"] == "application/json"
            answers[(path, kind, data is png)] = check_probabilities(r.json())
        # The same bytes give the same probabilities, whatever they were called.
        jpeg = answers[("/invocations", "image/jpeg", False)]
        np.testing.assert_allclose(
            answers[(ENDPOINT, "application/x-image", False)], jpeg, atol=1e-5
        )
        np.testing.assert_allclose(
            answers[("/invocations", "image/jpeg", True)],
            answers[("/invocations", "image/png", True)],
            atol=1e-5,
        )

    in_process(settings, runtime, body)

    # Real-time SageMaker calls are classified and recorded, like /v1/classify results.
    results = realtime_results(settings)
    assert len(results) == len(cases)
    assert sorted(r.uri for r in results) == sorted(path for path, _, _ in cases)
    for r in results:
        assert r.status in (ItemStatus.SUCCEEDED, ItemStatus.LOW_CONFIDENCE)
        assert r.label_index == ESPRESSO
        assert r.image is not None
        assert r.image.format in ("JPEG", "PNG")


def test_a_bad_image_is_a_4xx_error_and_recorded_failed(
    ics_home: Path, runtime: OnnxRuntime, coffee_jpeg: bytes
) -> None:
    settings = Settings(home=ics_home)
    bad = {
        "garbage": b"this is not an image at all",
        "empty": b"",
        "truncated": coffee_jpeg[:200],
    }

    async def body(client: httpx.AsyncClient) -> dict[str, tuple[httpx.Response, Any]]:
        out = {}
        for name, data in bad.items():
            r = await client.post(
                ENDPOINT, content=data, headers={"Content-Type": "application/x-image"}
            )
            # SageMaker's ModelError points at ICS's record of the request.
            record = (await client.get(r.json()["LogStreamArn"])).json()["results"]
            out[name] = (r, record)
        # The server still answers a good image afterwards.
        r = await client.post("/invocations", content=coffee_jpeg)
        check_probabilities(r.json())
        return out

    errors = in_process(settings, runtime, body)
    for name, (r, record) in errors.items():
        assert r.status_code == 424, (name, r.text)
        assert r.headers["x-amzn-ErrorType"] == "ModelError"
        error = error_of(r)
        assert error["type"] in ("InvalidImage", "UnsupportedFormat"), (name, error)
        assert error["message"]
        doc = r.json()
        assert doc["OriginalStatusCode"] in (415, 422)
        assert doc["OriginalMessage"] == f"{error['type']}: {error['message']}"
        assert doc["Message"].startswith(f"Received client error ({doc['OriginalStatusCode']})")
        assert doc["LogStreamArn"] in doc["Message"]
        assert [(x["uri"], x["status"], x["error"]) for x in record] == [
            (ENDPOINT, "FAILED", error)
        ]
    failed = [r for r in realtime_results(settings) if r.status is ItemStatus.FAILED]
    assert len(failed) == len(bad)
    assert all(r.uri == ENDPOINT and r.error is not None for r in failed)


@pytest.mark.parametrize(
    ("accept", "media"),
    [
        ("application/json", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        ("text/html, application/json;q=0.5", JSON),
        ("Application/JSON; charset=utf-8", JSON),
        ("text/csv", CSV),
        ("application/json;q=0, text/csv", CSV),
        ("application/jsonlines", JSON_LINES),
        ("application/json;q=0.5, application/jsonlines", JSON_LINES),
        ("application/x-npy", None),
        ("text/html", None),
    ],
)
def test_accept(
    ics_home: Path, runtime: OnnxRuntime, coffee_jpeg: bytes, accept: str, media: str | None
) -> None:
    async def body(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/invocations", content=coffee_jpeg, headers={"Accept": accept})

    r = in_process(Settings(home=ics_home), runtime, body)
    if media is None:
        assert r.status_code == 400, r.text
        assert r.headers["x-amzn-ErrorType"] == "ValidationError"
        error = error_of(r)
        assert error["type"] == "NotAcceptable"
        assert r.json()["Message"] == error["message"]
        assert all(m in error["message"] for m in (JSON, JSON_LINES, CSV))
        return
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0] == media
    check_probabilities(parsed(media, r.content))


def parsed(media: str, body: bytes) -> Any:
    """The probabilities (a list in class order) or rows (dicts) of an answer in `media`."""
    if media == JSON:
        return json.loads(body)
    if media == JSON_LINES:
        rows = [json.loads(line) for line in body.decode().splitlines()]
    else:
        rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert all(set(row) == {"index", "label", "probability"} for row in rows), rows[:2]
    if len(rows) < 1000:
        return [
            {**r, "index": int(r["index"]), "probability": float(r["probability"])} for r in rows
        ]
    assert [int(r["index"]) for r in rows] == list(range(1000))
    return [float(r["probability"]) for r in rows]


def test_custom_attributes(ics_home: Path, runtime: OnnxRuntime, coffee_jpeg: bytes) -> None:
    settings = Settings(home=ics_home)
    cases = [
        # (CustomAttributes, Accept, status)
        ("top_k=3", JSON, 200),
        ("trace-id=abc; top_k=2 , threshold=0.99", CSV, 200),
        ("threshold=0.5,top_k=1", JSON_LINES, 200),
        ("trace-id=abc", JSON, 200),
        ("top_k=abc", JSON, 400),
        ("top_k=0", JSON, 400),
        ("top_k=1001", JSON, 400),
        ("threshold=2", JSON, 400),
        ("threshold=high", JSON, 400),
    ]

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(
                ENDPOINT,
                content=coffee_jpeg,
                headers={"X-Amzn-SageMaker-Custom-Attributes": attributes, "Accept": accept},
            )
            for attributes, accept, _ in cases
        ]

    answers = in_process(settings, runtime, body)
    for (attributes, _, status), r in zip(cases, answers, strict=True):
        assert r.status_code == status, (attributes, r.text)
        if status == 200:  # echoed as sent
            assert r.headers["X-Amzn-SageMaker-Custom-Attributes"] == attributes
        else:
            assert r.headers["x-amzn-ErrorType"] == "ValidationError"
            assert attributes.split("=")[0] in error_of(r)["message"]
    top3, top2, top1, everything = (
        parsed(a, r.content) for (_, a, _), r in zip(cases[:4], answers[:4], strict=True)
    )
    assert top3[0]["index"] == ESPRESSO and len(top3) == 3
    assert top3[0]["label"] == "espresso" and top3[0]["probability"] > 0.9
    assert [row["index"] for row in top2] == [row["index"] for row in top3[:2]]
    assert [row["index"] for row in top1] == [ESPRESSO]
    check_probabilities(everything)
    # threshold: the decision the request is recorded with (espresso is about 0.96).
    results = realtime_results(settings)
    assert [(r.threshold, r.status, len(r.top_k)) for r in results] == [
        (settings.threshold, ItemStatus.SUCCEEDED, 3),
        (0.99, ItemStatus.LOW_CONFIDENCE, 2),
        (0.5, ItemStatus.SUCCEEDED, 1),
        (settings.threshold, ItemStatus.SUCCEEDED, settings.top_k),
    ]


def test_sigv4_in_process(ics_home: Path, runtime: OnnxRuntime, coffee_jpeg: bytes) -> None:
    settings = Settings(
        home=ics_home,
        api_token=TOKEN,
        sigv4_access_key_id=KEY_ID,
        sigv4_secret_access_key=SECRET,
    )
    url = f"http://ics.test{ENDPOINT}"
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=16)
    cases: list[tuple[str, str, bytes, dict[str, str], int]] = [
        ("signed", ENDPOINT, coffee_jpeg, sigv4_headers(url, coffee_jpeg), 200),
        (
            "signed, query",
            f"{ENDPOINT}?b=x%20y&a=1",
            coffee_jpeg,
            sigv4_headers(f"{url}?b=x%20y&a=1", coffee_jpeg),
            200,
        ),
        (
            "signed, container path",
            "/invocations",
            coffee_jpeg,
            sigv4_headers("http://ics.test/invocations", coffee_jpeg),
            200,
        ),
        ("bearer", ENDPOINT, coffee_jpeg, {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("none", ENDPOINT, coffee_jpeg, {}, 401),
        ("wrong secret", ENDPOINT, coffee_jpeg, sigv4_headers(url, coffee_jpeg, secret="x"), 403),
        (
            "unknown key",
            ENDPOINT,
            coffee_jpeg,
            sigv4_headers(url, coffee_jpeg, key_id="AKIAUNKNOWN000000000"),
            403,
        ),
        ("service s3", ENDPOINT, coffee_jpeg, sigv4_headers(url, coffee_jpeg, service="s3"), 403),
        ("stale", ENDPOINT, coffee_jpeg, sigv4_headers(url, coffee_jpeg, at=stale), 403),
        ("ahead", ENDPOINT, coffee_jpeg, sigv4_headers(url, coffee_jpeg, at=ahead), 403),
        ("other body", ENDPOINT, coffee_jpeg[:-1], sigv4_headers(url, coffee_jpeg), 403),
        (
            "other endpoint",
            "/endpoints/other/invocations",
            coffee_jpeg,
            sigv4_headers(url, coffee_jpeg),
            403,
        ),
        (
            "other query",
            f"{ENDPOINT}?a=2",
            coffee_jpeg,
            sigv4_headers(f"{url}?a=1", coffee_jpeg),
            403,
        ),
        (
            # A valid signature authorises the SageMaker paths only.
            "signed, v1 path",
            "/v1/classify",
            coffee_jpeg,
            sigv4_headers("http://ics.test/v1/classify", coffee_jpeg),
            403,
        ),
    ]

    async def body(client: httpx.AsyncClient) -> list[tuple[str, int, httpx.Response]]:
        out = []
        for name, path, data, headers, status in cases:
            out.append((name, status, await client.post(path, content=data, headers=headers)))
        out.append(("ping", 200, await client.get("/ping")))
        return out

    for name, status, r in in_process(settings, runtime, body):
        assert r.status_code == status, (name, r.text)
        if name == "ping":
            continue
        if status == 200:
            check_probabilities(r.json())
        else:
            assert error_of(r)["type"] == ("Forbidden" if status == 403 else "Unauthorized")


def test_the_body_limit_holds_before_a_signature_is_checked(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    # Checking a signature reads the body: the limit must stop a flood first, and what the
    # headers alone rule out is refused unread.
    settings = Settings(
        home=ics_home,
        api_token=TOKEN,
        sigv4_access_key_id=KEY_ID,
        sigv4_secret_access_key=SECRET,
        max_body_bytes=1_000_000,
    )
    flood = b"\0" * 30_000_000
    made_up = {"Authorization": "AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host, Signature=0"}
    # A real signature by the configured key, of another body: only the body can refute it.
    plausible = sigv4_headers(f"http://ics.test{ENDPOINT}", b"another body")

    async def post(client: httpx.AsyncClient) -> list[httpx.Response]:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(flood), 1 << 20):
                yield flood[i : i + (1 << 20)]

        return [
            await client.post(ENDPOINT, content=flood, headers=made_up),
            await client.post(ENDPOINT, content=chunks(), headers=made_up),
            await client.post(ENDPOINT, content=flood, headers=plausible),
            await client.post(ENDPOINT, content=chunks(), headers=plausible),
        ]

    statuses = [
        (r.status_code, r.headers["x-amzn-ErrorType"], error_of(r)["type"])
        for r in in_process(settings, runtime, post)
    ]
    assert statuses == [
        (413, "ValidationError", "RequestTooLarge"),  # by its Content-Length
        (403, "Forbidden", "Forbidden"),  # chunked, but the made-up signature cannot be valid
        (413, "ValidationError", "RequestTooLarge"),
        # while it streams, before the signature is checked
        (413, "ValidationError", "RequestTooLarge"),
    ]


def clock_at(moment: dt.datetime) -> Callable[[], dt.datetime]:
    return lambda: moment


def test_sigv4_verifier_scope_region_and_clock(coffee_jpeg: bytes) -> None:
    url = f"http://ics.test{ENDPOINT}"
    now = dt.datetime.now(dt.UTC)

    def scope_of(headers: dict[str, str], path: str = ENDPOINT) -> dict[str, Any]:
        raw = [(b"host", b"ics.test")]
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": raw,
        }

    signed = scope_of(sigv4_headers(url, coffee_jpeg, region="eu-west-1", at=now))
    assert Verifier(KEY_ID, SECRET)(signed, coffee_jpeg)
    assert Verifier(KEY_ID, SECRET, region="eu-west-1")(signed, coffee_jpeg)
    assert not Verifier(KEY_ID, SECRET, region="us-east-1")(signed, coffee_jpeg)
    # 15 minutes of skew either way are allowed, not more.
    for minutes, valid in ((14, True), (-14, True), (16, False), (-16, False)):
        verifier = Verifier(KEY_ID, SECRET, clock=clock_at(now + dt.timedelta(minutes=minutes)))
        assert verifier(signed, coffee_jpeg) is valid, minutes
    # GET, a claimed payload hash that is not the body's, and an Authorization header that
    # is not SigV4 are all refused.
    assert not Verifier(KEY_ID, SECRET)({**signed, "method": "GET"}, coffee_jpeg)
    unsigned = scope_of(
        {**sigv4_headers(url, coffee_jpeg, at=now), "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    )
    assert not Verifier(KEY_ID, SECRET)(unsigned, coffee_jpeg)
    assert not Verifier(KEY_ID, SECRET)(scope_of({"Authorization": "Bearer x"}), coffee_jpeg)


def test_sigv4_settings(tmp_path: Path) -> None:
    assert verifier_of(Settings(home=tmp_path)) is None
    verifier = verifier_of(
        Settings(home=tmp_path, sigv4_access_key_id=KEY_ID, sigv4_secret_access_key=SECRET)
    )
    assert verifier is not None
    assert SECRET not in repr(verifier)
    with pytest.raises(ConfigError, match="sigv4_secret_access_key"):
        verifier_of(Settings(home=tmp_path, sigv4_access_key_id=KEY_ID))


# --- end to end: boto3 against a real `ics serve` ---------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """boto3 reads AWS_* variables and ~/.aws: nothing of the machine's may leak in."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


def sagemaker_runtime(url: str, key_id: str = KEY_ID, secret: str = SECRET) -> Any:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        # One attempt: a refusal must show as it is, not after retries.
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )


def invoke(client: Any, body: bytes, **extra: str) -> Any:
    response = client.invoke_endpoint(
        EndpointName="ics", ContentType="application/x-image", Body=body, **extra
    )
    assert response["ContentType"] == "application/json"
    return json.loads(response["Body"].read())


def status_of(error: ClientError) -> int:
    status: int = error.response["ResponseMetadata"]["HTTPStatusCode"]
    return status


@pytest.mark.slow
def test_boto3_invoke_endpoint_with_token_and_sigv4(
    ics_home: Path, aws_env: None, coffee_jpeg: bytes
) -> None:
    env = {
        **os.environ,
        "ICS_API_TOKEN": TOKEN,
        "ICS_SIGV4_ACCESS_KEY_ID": KEY_ID,
        "ICS_SIGV4_SECRET_ACCESS_KEY": SECRET,
    }
    with serve_process(env=env) as served:
        check_probabilities(invoke(sagemaker_runtime(served.url), coffee_jpeg))

        for client in (
            sagemaker_runtime(served.url, secret="not-the-secret"),
            sagemaker_runtime(served.url, key_id="AKIAUNKNOWN000000000"),
        ):
            with pytest.raises(ClientError) as caught:
                invoke(client, coffee_jpeg)
            assert status_of(caught.value) == 403
            # botocore reads the code and the message the server gives.
            assert caught.value.response["Error"] == {
                "Code": "Forbidden",
                "Message": "the AWS SigV4 signature is not valid",
            }

        # Unsigned and unauthenticated: refused; the health check stays open.
        plain = httpx.post(served.url + ENDPOINT, content=coffee_jpeg, timeout=30)
        assert plain.status_code == 401
        assert httpx.get(served.url + "/ping", timeout=30).status_code == 200
        bearer = httpx.post(
            served.url + ENDPOINT,
            content=coffee_jpeg,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        check_probabilities(bearer.json())
        # Still healthy, and still answering signed requests, after the refusals.
        check_probabilities(invoke(sagemaker_runtime(served.url), coffee_jpeg))
        assert served.proc.poll() is None


@pytest.mark.slow
def test_boto3_invoke_endpoint_without_token(
    ics_home: Path, aws_env: None, coffee_jpeg: bytes
) -> None:
    with serve_process(env=dict(os.environ)) as served:
        client = sagemaker_runtime(served.url, key_id="AKIAANYKEY0000000000", secret="any")
        check_probabilities(invoke(client, coffee_jpeg))
        check_probabilities(invoke(client, encoded(fmt="PNG"), Accept="application/json"))
        with pytest.raises(client.exceptions.ValidationError) as caught:
            invoke(client, coffee_jpeg, Accept="application/x-npy")
        assert status_of(caught.value) == 400
        with pytest.raises(client.exceptions.ModelError) as caught:
            invoke(client, b"not an image")
        assert status_of(caught.value) == 424
        assert httpx.get(served.url + "/ping", timeout=30).status_code == 200

    results = realtime_results(Settings(home=ics_home))
    assert [r.uri for r in results] == [ENDPOINT] * 3
    assert [r.label_index for r in results[:2]] == [ESPRESSO, ESPRESSO]
    assert results[2].status is ItemStatus.FAILED


# --- SageMaker's wire format, read by botocore's own parsers ----------------------------


def sagemaker_model() -> Any:
    return botocore.session.get_session().get_service_model("sagemaker-runtime")


@pytest.mark.parametrize(
    ("status", "kind", "code", "aws_status"),
    [
        (400, "NotAcceptable", "ValidationError", 400),
        (413, "RequestTooLarge", "ValidationError", 413),
        (408, "RequestTimeout", "ValidationError", 408),
        (422, "InvalidRequest", "ValidationError", 400),
        (422, "InvalidImage", "ModelError", 424),
        (413, "ImageTooLarge", "ModelError", 424),
        (500, "InferenceError", "ModelError", 424),
        (504, "Timeout", "ModelError", 424),
        (503, "QueueFull", "ThrottlingException", 503),
        (503, "ServerBusy", "ThrottlingException", 503),
        (503, "ModelUnavailable", "ServiceUnavailable", 503),
        (503, "DecodeCancelled", "ServiceUnavailable", 503),
        (503, "ModelNotPrepared", "ModelNotReadyException", 429),
        (503, "StoreLost", "InternalFailure", 500),
        (500, "InternalError", "InternalFailure", 500),
        (403, "Forbidden", "Forbidden", 403),
    ],
)
def test_errors_as_botocore_parses_them(status: int, kind: str, code: str, aws_status: int) -> None:
    message = f"what went wrong ({kind})"
    response = error_response(ENDPOINT, status, kind, message, headers={"Retry-After": "1"})
    model = sagemaker_model()
    headers = {k.lower(): v for k, v in response.headers.items()}
    wire: dict[str, Any] = {
        "status_code": response.status_code,
        "headers": headers,
        "body": bytes(response.body),
    }
    parser = botocore.parsers.create_parser("rest-json")
    parsed = parser.parse(wire, model.operation_model("InvokeEndpoint").output_shape)
    assert response.status_code == aws_status
    assert parsed["Error"]["Code"] == code
    assert headers["retry-after"] == "1"
    error_shape = model.shape_for_error_code(code)
    if code == "ModelError":
        assert error_shape is not None
        fields = parser.parse(wire, error_shape)
        assert fields["OriginalStatusCode"] == status
        assert fields["OriginalMessage"] == f"{kind}: {message}"
        assert parsed["Error"]["Message"] == fields["Message"]
        side = "client" if status < 500 else "server"
        assert fields["Message"].startswith(f"Received {side} error ({status}) from model")
        assert "LogStreamArn" not in fields  # nothing was recorded
    else:
        assert parsed["Error"]["Message"] == message
        # Every code but ICS's own (kept) and throttling is a modeled exception of boto3.
        modeled = code not in ("Forbidden", "ThrottlingException")
        assert (error_shape is not None) is modeled, code


def test_response_stream_framing_as_botocore_reads_it() -> None:
    model = sagemaker_model()
    shape = model.operation_model("InvokeEndpointWithResponseStream").output_shape
    body_shape = shape.members["Body"]
    # The parser botocore's rest-json parser gives the EventStream of a streamed body.
    parser = botocore.parsers.EventStreamJSONParser()

    class Raw:
        """The raw body botocore's EventStream reads: chunks as they come off the socket."""

        def __init__(self, data: bytes) -> None:
            self.data = data

        def stream(self) -> Iterator[bytes]:
            for i in range(0, len(self.data), 1000):  # boundaries that split messages
                yield self.data[i : i + 1000]

        def close(self) -> None:
            pass

    def events(data: bytes) -> Any:
        return EventStream(Raw(data), body_shape, parser, "InvokeEndpointWithResponseStream")

    answer = json.dumps(list(np.linspace(0, 1, 3000))).encode()
    parts = b"".join(payload_parts(answer, size=4096))
    got = [event["PayloadPart"]["Bytes"] for event in events(parts)]
    assert len(got) == -(-len(answer) // 4096) and b"".join(got) == answer
    assert [e["PayloadPart"]["Bytes"] for e in events(b"".join(payload_parts(b"")))] == [b""]

    # A flipped bit fails botocore's CRC check.
    broken = bytearray(b"".join(payload_parts(b"[1]")))
    broken[-6] ^= 1
    with pytest.raises(ChecksumMismatch):
        list(events(bytes(broken)))


# --- end to end: every SageMaker error, CustomAttributes, Accept and the response stream --


def png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 30)).save(buf, "PNG")
    return buf.getvalue()


def streamed(client: Any, body: bytes, **extra: str) -> tuple[Any, list[bytes]]:
    """The response of invoke_endpoint_with_response_stream and its payload parts."""
    response = client.invoke_endpoint_with_response_stream(
        EndpointName="ics", ContentType="application/x-image", Body=body, **extra
    )
    return response, [event["PayloadPart"]["Bytes"] for event in response["Body"]]


@pytest.mark.slow
def test_boto3_sees_sagemaker_errors_attributes_formats_and_streams(
    ics_home: Path, aws_env: None, coffee_jpeg: bytes
) -> None:
    env = {
        **os.environ,
        # One input at a time with room for one waiting: a burst overflows the queue.
        "ICS_MAX_QUEUE": "1",
        "ICS_MAX_BATCH_SIZE": "1",
        "ICS_INFERENCE_WORKERS": "1",
        "ICS_INFERENCE_THREADS": "1",
        "ICS_MAX_PIXELS": "1000000",
    }
    with serve_process(env=env) as served:
        client = boto3.client(
            "sagemaker-runtime",
            endpoint_url=served.url,
            region_name="us-east-1",
            aws_access_key_id="AKIAANYKEY0000000000",
            aws_secret_access_key="any",
            config=botocore.config.Config(
                retries={"total_max_attempts": 1}, max_pool_connections=32
            ),
        )
        # CustomAttributes: echoed, top_k understood; Accept honoured.
        response = client.invoke_endpoint(
            EndpointName="ics",
            ContentType="application/x-image",
            Body=coffee_jpeg,
            Accept=CSV,
            CustomAttributes="trace=42,top_k=2",
        )
        assert response["CustomAttributes"] == "trace=42,top_k=2"
        assert response["ContentType"] == f"{CSV}; charset=utf-8"
        top2 = parsed(CSV, response["Body"].read())
        assert top2[0]["index"] == ESPRESSO and len(top2) == 2

        # ValidationError: the request, whatever the image.
        with pytest.raises(client.exceptions.ValidationError) as bad_request:
            invoke(client, coffee_jpeg, CustomAttributes="top_k=many")
        assert "top_k='many'" in bad_request.value.response["Error"]["Message"]
        with pytest.raises(client.exceptions.ValidationError) as bad_accept:
            invoke(client, coffee_jpeg, Accept="image/png")
        assert bad_accept.value.response["Error"]["Message"].startswith(
            "cannot answer Accept: image/png"
        )

        # ModelError: an image the model cannot take, pointing at ICS's record of it.
        with pytest.raises(client.exceptions.ModelError) as not_an_image:
            invoke(client, b"not an image")
        error = not_an_image.value.response
        assert error["OriginalStatusCode"] == 422
        assert error["OriginalMessage"].startswith("InvalidImage: ")
        assert error["Error"]["Message"].startswith("Received client error (422) from model")
        record = httpx.get(served.url + error["LogStreamArn"], timeout=30).json()["results"]
        assert [(r["status"], r["error"]["type"]) for r in record] == [("FAILED", "InvalidImage")]
        with pytest.raises(client.exceptions.ModelError) as too_large:
            invoke(client, png_of(1100, 1000))
        assert too_large.value.response["OriginalStatusCode"] == 413
        assert "max_pixels" in too_large.value.response["OriginalMessage"]

        # The response stream: the answer in payload parts, attributes echoed.
        response, parts = streamed(client, coffee_jpeg, CustomAttributes="trace=7")
        assert response["ContentType"] == JSON and response["CustomAttributes"] == "trace=7"
        assert len(parts) > 1
        check_probabilities(json.loads(b"".join(parts)))
        response, parts = streamed(client, coffee_jpeg, Accept=JSON_LINES)
        assert response["ContentType"] == JSON_LINES
        check_probabilities(parsed(JSON_LINES, b"".join(parts)))
        # Errors before the stream starts are the call's own.
        with pytest.raises(client.exceptions.ModelError):
            streamed(client, b"not an image")
        with pytest.raises(client.exceptions.ValidationError):
            streamed(client, coffee_jpeg, Accept="image/png")

        # ThrottlingException when the queue is full, with Retry-After.
        throttled = []
        for _ in range(3):
            with ThreadPoolExecutor(32) as pool:
                outcomes = list(pool.map(lambda _: _try(client, coffee_jpeg), range(32)))
            throttled = [e for e in outcomes if e is not None]
            if throttled:
                break
        assert throttled, "no request of three bursts of 32 was throttled"
        for e in throttled:
            assert e.response["Error"]["Code"] == "ThrottlingException", e.response
            assert e.response["Error"]["Message"].startswith("the server is busy")
            assert e.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"

        # InternalFailure: ICS's own failure (its store is gone).
        (ics_home / "ics.db").unlink()
        with pytest.raises(client.exceptions.InternalFailure) as internal:
            invoke(client, coffee_jpeg)
        assert (
            "was deleted while this process used it" in internal.value.response["Error"]["Message"]
        )


def _try(client: Any, body: bytes) -> ClientError | None:
    try:
        invoke(client, body)
    except ClientError as e:
        return e
    return None
