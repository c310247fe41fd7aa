"""The SNS alert channel against a real receiver: moto's SNS server (its own process)
delivering to an SQS queue."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from awsserver import AwsServer
from ics_service.alerts.delivery import DeliveryError
from ics_service.alerts.sns import SnsChannel, subject_of
from ics_service.errors import UsageError

ALERT: dict[str, Any] = {
    "version": 1,
    "alert_id": "3f1c2a9e-0000-4000-8000-000000000001",
    "kind": "low_confidence",
    "execution_id": "exec-20261129-1",
    "item_id": "item-7",
    "uri": "file:///photos/chelsea.jpg",
    "threshold": 0.94,
    "confidence": 0.37,
    "top_k": [{"label": "tiger cat", "index": 282, "confidence": 0.37}],
    "error": None,
    "model": {"name": "efficientnet-lite0", "version": "1"},
    "timestamp": "2026-11-29T18:00:00Z",
}
TITLE = "ICS: low confidence on chelsea.jpg"
BODY = "chelsea.jpg: tiger cat at 0.37, below the threshold 0.94.\nExecution exec-20261129-1."
PASSWORD = "s3cr3t-Pa55word"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


# --- SNS ------------------------------------------------------------------------------


def _subscribed_queue(topic_arn: str) -> str:
    sqs = boto3.client("sqs")
    queue_url: str = sqs.create_queue(QueueName="ops")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    boto3.client("sns").subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    return queue_url


def _receive(queue_url: str, count: int) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs")
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20.0
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages arrived"
        answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in answer.get("Messages", []):
            got.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return got


def test_sns_publishes_the_document_with_an_ascii_subject_and_attributes(aws: AwsServer) -> None:
    topic_arn = boto3.client("sns").create_topic(Name="ics-alerts")["TopicArn"]
    queue_url = _subscribed_queue(topic_arn)
    # No endpoint given: botocore finds the moto server in AWS_ENDPOINT_URL by itself.
    channel = SnsChannel(f"sns://{topic_arn}", timeout_s=5.0)
    assert channel.shown() == f"sns://{topic_arn}"
    title = "Faible confiance : « Île-de-France » 東京 " + "très " * 40
    channel.send(ALERT, title, BODY)
    failed = {**ALERT, "kind": "execution_failed", "execution_id": None, "item_id": None}
    channel.send(failed, "Execution\nfailed", BODY)

    first, second = _receive(queue_url, 2)
    assert first["Subject"] == subject_of(title)
    assert first["Subject"].startswith("Faible confiance : Ile-de-France tres tres")
    assert first["Subject"].isascii() and len(first["Subject"]) == 100
    assert first["Subject"].endswith("...")
    assert json.loads(first["Message"]) == ALERT
    assert first["MessageAttributes"] == {
        "kind": {"Type": "String", "Value": "low_confidence"},
        "execution_id": {"Type": "String", "Value": "exec-20261129-1"},
    }
    # An attribute with no value is left out: SNS rejects empty ones.
    assert second["Subject"] == "Execution failed"
    assert json.loads(second["Message"]) == failed
    assert second["MessageAttributes"] == {"kind": {"Type": "String", "Value": "execution_failed"}}


def test_sns_fifo_topic_gets_a_group_and_deduplicates_by_alert_id(aws: AwsServer) -> None:
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    topic_arn = sns.create_topic(
        Name="ics-alerts.fifo",
        Attributes={"FifoTopic": "true", "ContentBasedDeduplication": "false"},
    )["TopicArn"]
    queue_url = sqs.create_queue(QueueName="ops.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    channel = SnsChannel(f"sns://{topic_arn}", timeout_s=5.0, endpoint_url=aws.url)
    channel.send(ALERT, TITLE, BODY)
    channel.send(ALERT, TITLE, BODY)  # the dispatcher's retry of the same alert
    channel.send({**ALERT, "alert_id": "another"}, TITLE, BODY)
    got = _receive(queue_url, 2)
    assert [json.loads(m["Message"])["alert_id"] for m in got] == [ALERT["alert_id"], "another"]
    answer = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)
    assert answer.get("Messages", []) == []


def test_sns_topic_that_does_not_exist_is_dead_lettered(aws: AwsServer) -> None:
    channel = SnsChannel("sns://arn:aws:sns:us-east-1:123456789012:nobody", timeout_s=5.0)
    with pytest.raises(DeliveryError) as caught:
        channel.send(ALERT, TITLE, BODY)
    assert caught.value.transient is False
    assert "arn:aws:sns:us-east-1:123456789012:nobody" in str(caught.value)
    assert "NotFound" in str(caught.value) and "\n" not in str(caught.value)


def test_sns_without_credentials_is_dead_lettered(
    aws: AwsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    channel = SnsChannel("sns://arn:aws:sns:us-east-1:123456789012:ics", timeout_s=5.0)
    with pytest.raises(DeliveryError, match="no usable AWS credentials") as caught:
        channel.send(ALERT, TITLE, BODY)
    assert caught.value.transient is False


@pytest.mark.parametrize(
    "url",
    [
        "sns://ics-alerts",
        "sns://arn:aws:sns:us-east-1:1234:ics",
        "sns://arn:aws:sqs:us-east-1:123456789012:ics",
        "sns://arn:aws:sns:useast1:123456789012:ics",
        "sns://arn:aws:sns:us-east-1:123456789012:",
        "sns://arn:aws:sns:us-east-1:123456789012:bad topic",
        "arn:aws:sns:us-east-1:123456789012:ics",
    ],
)
def test_sns_malformed_arn_is_a_usage_error(url: str) -> None:
    with pytest.raises(UsageError, match=r"expected sns://arn:aws:sns:REGION:ACCOUNT:TOPIC"):
        SnsChannel(url, timeout_s=5.0)


def test_sns_server_down_is_transient(aws: AwsServer) -> None:
    channel = SnsChannel(
        "sns://arn:aws:sns:us-east-1:123456789012:ics",
        timeout_s=2.0,
        endpoint_url=f"http://127.0.0.1:{_free_port()}",
    )
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="cannot be reached") as caught:
        channel.send(ALERT, TITLE, BODY)
    assert caught.value.transient is True
    assert time.monotonic() - started < 2.0


def test_sns_silent_server_is_transient_within_the_timeout(
    aws: AwsServer, silent_port: int
) -> None:
    channel = SnsChannel(
        "sns://arn:aws:sns:us-east-1:123456789012:ics",
        timeout_s=1.0,
        endpoint_url=f"http://127.0.0.1:{silent_port}",
    )
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"timeout|timed out") as caught:
        channel.send(ALERT, TITLE, BODY)
    assert caught.value.transient is True
    assert time.monotonic() - started < 3.0


def test_sns_subject_is_never_empty_and_keeps_printable_ascii() -> None:
    assert subject_of("東京") == "ICS alert"
    assert subject_of("  a\tb\r\nc\x00d  ") == "a b c d"
    assert subject_of("x" * 100) == "x" * 100
    assert subject_of("x" * 101) == "x" * 97 + "..."
