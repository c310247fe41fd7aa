"""SageMaker's InvokeEndpointAsync end to end: boto3's real `sagemaker-runtime` client against
a real `ics serve`, which reads the input from and writes the answers to a real S3-protocol
server process (moto) and announces them on its SNS topics (read back through SQS)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import httpx
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from awsserver import AwsServer
from ics_service.config import Settings, load_settings
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.server.app import create_app
from ics_service.server.sagemaker_wire import CUSTOM_ATTRIBUTES, JSON_LINES
from ics_service.store import Store
from serving import client_of, finished, serve_process

TOKEN = "test-token-0123456789"
KEY_ID = "AKIAICSTESTKEY000001"
SECRET = "ics/test/secret/0123456789abcdefghijklmn"

T = TypeVar("T")


def encoded(name: str = "coffee", fmt: str = "JPEG", scale: int = 1) -> bytes:
    image = Image.fromarray(load_photo(name))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def sagemaker_runtime(url: str, secret: str = SECRET) -> Any:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )


def subscribed_queue(name: str) -> tuple[str, str]:
    """A new SNS topic and the SQS queue subscribed to it: (topic ARN, queue URL)."""
    topic_arn: str = boto3.client("sns").create_topic(Name=name)["TopicArn"]
    sqs = boto3.client("sqs")
    queue_url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    boto3.client("sns").subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    return topic_arn, queue_url


def notifications(queue_url: str, count: int) -> list[dict[str, Any]]:
    """The alert documents SNS delivered to the queue (its Message, as ICS published it)."""
    sqs = boto3.client("sqs")
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30.0
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} notifications came"
        answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in answer.get("Messages", []):
            got.append(json.loads(json.loads(message["Body"])["Message"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return got


def s3_object(url: str, timeout: float = 30.0) -> bytes:
    """The object at s3://BUCKET/KEY once it exists."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    deadline = time.monotonic() + timeout
    while True:
        try:
            body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body
        except s3.exceptions.NoSuchKey:
            assert time.monotonic() < deadline, f"{url} was not written within {timeout} s"
            time.sleep(0.2)


def in_process(
    settings: Settings, runtime: OnnxRuntime, body: Callable[[httpx.AsyncClient], Awaitable[T]]
) -> T:
    """body(client) against the app in process, its lifespan running."""

    async def go() -> T:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            return await body(client)

    return asyncio.run(go())


@contextmanager
def opened_store(home: Path) -> Iterator[Store]:
    store = Store(Settings(home=home).store_url, create=False)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def topics(aws: AwsServer) -> dict[str, tuple[str, str]]:
    s3 = boto3.client("s3")
    for bucket in ("ics-in", "ics-out"):
        s3.create_bucket(Bucket=bucket)
    return {"success": subscribed_queue("done"), "error": subscribed_queue("failed")}


def serve_env(ics_home: Path, aws: AwsServer, topics: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {
        **os.environ,
        **aws.env(),
        "ICS_API_TOKEN": TOKEN,
        "ICS_SIGV4_ACCESS_KEY_ID": KEY_ID,
        "ICS_SIGV4_SECRET_ACCESS_KEY": SECRET,
        "ICS_ALLOWED_SOURCES": '["s3://ics-in/"]',
        "ICS_SAGEMAKER_ASYNC_OUTPUT_PATH": "s3://ics-out/answers",
        "ICS_SAGEMAKER_ASYNC_FAILURE_PATH": "s3://ics-out/failures/",
        "ICS_SAGEMAKER_ASYNC_SUCCESS_NOTIFY": f"sns://{topics['success'][0]}",
        "ICS_SAGEMAKER_ASYNC_ERROR_NOTIFY": f"sns://{topics['error'][0]}",
    }


@pytest.mark.slow
def test_invoke_endpoint_async_answers_fails_and_refuses(
    ics_home: Path, aws: AwsServer, topics: dict[str, tuple[str, str]]
) -> None:
    s3 = boto3.client("s3")
    coffee = encoded()
    s3.put_object(Bucket="ics-in", Key="coffee.jpg", Body=coffee)
    s3.put_object(Bucket="ics-in", Key="broken.jpg", Body=b"\xff\xd8 not a JPEG")
    with serve_process(env=serve_env(ics_home, aws, topics)) as served:
        client = sagemaker_runtime(served.url)
        asked = client.invoke_endpoint_async(
            EndpointName="ics",
            InputLocation="s3://ics-in/coffee.jpg",
            ContentType="image/jpeg",
            Accept="application/json",
            InferenceId="coffee-1",
            CustomAttributes="trace=abc",
            RequestTTLSeconds=600,
            InvocationTimeoutSeconds=60,
        )
        assert asked["ResponseMetadata"]["HTTPStatusCode"] == 202
        assert asked["InferenceId"] == "coffee-1"
        assert asked["OutputLocation"] == "s3://ics-out/answers/coffee-1.out"
        assert asked["FailureLocation"] == "s3://ics-out/failures/coffee-1.error"

        broken = client.invoke_endpoint_async(
            EndpointName="ics", InputLocation="s3://ics-in/broken.jpg"
        )
        broken_id = broken["InferenceId"]
        assert broken_id and broken["FailureLocation"] == f"s3://ics-out/failures/{broken_id}.error"

        # The answer is the body invoke_endpoint gives for the same image and Accept.
        sync = client.invoke_endpoint(
            EndpointName="ics", ContentType="image/jpeg", Accept="application/json", Body=coffee
        )["Body"].read()
        assert s3_object(asked["OutputLocation"]) == sync
        probs = json.loads(sync)
        assert len(probs) == 1000 and probs.index(max(probs)) == 967  # espresso

        failure = json.loads(s3_object(broken["FailureLocation"]))
        assert failure["error"]["type"] == "InvalidImage"
        assert failure["OriginalStatusCode"] == 422
        assert failure["Message"].startswith("Received client error (422) from model with message")
        assert failure["LogStreamArn"].startswith("/v1/executions/")

        [done] = notifications(topics["success"][1], 1)
        assert done["inferenceId"] == "coffee-1"
        assert done["invocationStatus"] == "Completed"
        assert done["eventName"] == "InferenceResult"
        assert done["requestParameters"] == {
            "contentType": "image/jpeg",
            "endpointName": "ics",
            "inputLocation": "s3://ics-in/coffee.jpg",
        }
        assert done["responseParameters"] == {
            "contentType": "application/json",
            "outputLocation": "s3://ics-out/answers/coffee-1.out",
        }
        [failed] = notifications(topics["error"][1], 1)
        assert failed["inferenceId"] == broken_id
        assert failed["invocationStatus"] == "Failed"
        assert failed["failureReason"].startswith("InvalidImage: Received client error (422)")
        assert failed["responseParameters"]["failureLocation"] == broken["FailureLocation"]

        # The same InferenceId again for the same input: the first inference's locations.
        again = client.invoke_endpoint_async(
            EndpointName="ics", InputLocation="s3://ics-in/coffee.jpg", InferenceId="coffee-1"
        )
        assert again["OutputLocation"] == asked["OutputLocation"]
        # Refusals, as botocore raises them.
        refusals = [
            ({"InputLocation": "s3://elsewhere/x.jpg"}, "Forbidden"),
            (
                {"InputLocation": "s3://ics-in/coffee.jpg", "InferenceId": "../up"},
                "ValidationError",
            ),
            ({"InputLocation": "s3://ics-in/coffee.jpg", "Accept": "image/png"}, "ValidationError"),
            (
                {"InputLocation": "s3://ics-in/coffee.jpg", "CustomAttributes": "top_k=0"},
                "ValidationError",
            ),
        ]
        for extra, code in refusals:
            with pytest.raises(ClientError) as caught:
                client.invoke_endpoint_async(EndpointName="ics", **extra)
            assert caught.value.response["Error"]["Code"] == code, extra
            assert caught.value.response["Error"]["Message"], extra
        with pytest.raises(client.exceptions.ValidationError) as caught:
            client.invoke_endpoint_async(
                EndpointName="ics", InputLocation="s3://ics-in/broken.jpg", InferenceId="coffee-1"
            )
        assert "another input" in str(caught.value)

        # Authentication: unsigned and without a token, refused; a wrong secret, refused.
        plain = httpx.post(
            served.url + "/endpoints/ics/async-invocations",
            headers={"X-Amzn-SageMaker-InputLocation": "s3://ics-in/coffee.jpg"},
            timeout=30,
        )
        assert plain.status_code == 401
        with pytest.raises(ClientError) as caught:
            sagemaker_runtime(served.url, secret="wrong").invoke_endpoint_async(
                EndpointName="ics", InputLocation="s3://ics-in/coffee.jpg"
            )
        assert caught.value.response["Error"]["Code"] == "Forbidden"

    # Each inference is an execution of the store, with its result.
    with opened_store(ics_home) as store:
        execution = store.find_by_name("sagemaker-async-coffee-1")
        assert execution is not None and execution.status.value == "SUCCEEDED"
        [result] = store.results(execution.id)
        assert result.label_index == 967 and result.uri == "s3://ics-in/coffee.jpg"


@pytest.mark.slow
def test_a_server_killed_mid_inference_finishes_it_when_it_starts_again(
    ics_home: Path, aws: AwsServer, topics: dict[str, tuple[str, str]]
) -> None:
    # A large PNG takes long enough to read and decode that the kill comes first.
    boto3.client("s3").put_object(Bucket="ics-in", Key="big.png", Body=encoded(fmt="PNG", scale=6))
    env = serve_env(ics_home, aws, topics)
    with serve_process(env=env) as served:
        asked = sagemaker_runtime(served.url).invoke_endpoint_async(
            EndpointName="ics", InputLocation="s3://ics-in/big.png", InferenceId="big"
        )
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
    with opened_store(ics_home) as store:
        execution = store.find_by_name("sagemaker-async-big")
        assert execution is not None and execution.status.value == "RUNNING"
    with serve_process(env=env):
        answer = json.loads(s3_object(asked["OutputLocation"], timeout=60.0))
        assert len(answer) == 1000
        [done] = notifications(topics["success"][1], 1)
        assert done["inferenceId"] == "big"
    with opened_store(ics_home) as store:
        execution = store.find_by_name("sagemaker-async-big")
        assert execution is not None and execution.status.value == "SUCCEEDED"
        events = [e.type for e in store.history(execution.id)]
        assert "ExecutionResumed" in events


ASYNC_PATH = "/endpoints/ics/async-invocations"


def test_local_inputs_other_formats_and_refusals_in_process(
    ics_home: Path, runtime: OnnxRuntime, aws: AwsServer, tmp_path: Path
) -> None:
    boto3.client("s3").create_bucket(Bucket="ics-out")
    photos = tmp_path / "photos"
    photos.mkdir()
    coffee = encoded()
    (photos / "coffee.jpg").write_bytes(coffee)
    (tmp_path / "secret.jpg").write_bytes(coffee)
    wanted = {
        "X-Amzn-SageMaker-Accept": JSON_LINES,
        CUSTOM_ATTRIBUTES: "top_k=3",
        "X-Amzn-SageMaker-Inference-Id": "local-1",
    }

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        async def ask(location: str, **headers: str) -> httpx.Response:
            return await client.post(
                ASYNC_PATH, headers={"X-Amzn-SageMaker-InputLocation": location, **headers}
            )

        sync = await client.post(
            "/endpoints/ics/invocations",
            content=coffee,
            headers={"Accept": JSON_LINES, CUSTOM_ATTRIBUTES: "top_k=3"},
        )
        local = await ask(str(photos / "coffee.jpg"), **wanted)
        # Finished before the app stops (its stop would abort it).
        assert (await finished(client, "sagemaker-async-local-1"))["status"] == "SUCCEEDED"
        return [
            sync,
            local,
            await ask(str(tmp_path / "secret.jpg")),
            await client.post(ASYNC_PATH, content=coffee),
        ]

    settings = Settings(
        home=ics_home, allowed_sources=[str(photos)], sagemaker_async_output_path="s3://ics-out/a"
    )
    sync, local, outside, inline = in_process(settings, runtime, body)
    assert sync.status_code == 200 and len(sync.text.splitlines()) == 3
    assert local.status_code == 202, local.text
    assert s3_object(local.headers["X-Amzn-SageMaker-OutputLocation"]) == sync.content
    assert (outside.status_code, outside.headers["x-amzn-ErrorType"]) == (403, "Forbidden")
    assert (inline.status_code, inline.headers["x-amzn-ErrorType"]) == (400, "ValidationError")
    assert "InputLocation" in inline.json()["Message"]

    # Without an output path, the server takes no asynchronous invocation and says why.
    async def unconfigured(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            ASYNC_PATH, headers={"X-Amzn-SageMaker-InputLocation": str(photos / "coffee.jpg")}
        )

    refused = in_process(Settings(home=ics_home), runtime, unconfigured)
    assert (refused.status_code, refused.headers["x-amzn-ErrorType"]) == (400, "ValidationError")
    assert "sagemaker_async_output_path" in refused.json()["Message"]


def test_async_settings(tmp_path: Path) -> None:
    for bad in ("/local/folder", "file:///x", "https://host/x", "s3://"):
        with pytest.raises(ValueError, match="not an object storage prefix"):
            Settings(home=tmp_path, sagemaker_async_output_path=bad)
    settings = load_settings(
        environ={
            "ICS_HOME": str(tmp_path),
            "ICS_SAGEMAKER_ASYNC_OUTPUT_PATH": "s3://b/p/",
            "ICS_SAGEMAKER_ASYNC_ERROR_NOTIFY": "sns://arn:aws:sns:us-east-1:123456789012:x",
        }
    ).settings
    assert settings.sagemaker_async_output_path == "s3://b/p"
    assert [s.url for s in settings.sagemaker_async_error_notify] == [
        "sns://arn:aws:sns:us-east-1:123456789012:x"
    ]
