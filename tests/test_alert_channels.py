"""The SNS and apprise alert channels against real receivers: moto's SNS server (its own
process) delivering to an SQS queue, an aiosmtpd SMTP server and an HTTP server in threads."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from awsserver import AwsServer
from ics_service.alerts.chat import AppriseChannel
from ics_service.alerts.delivery import DeliveryError, NotFromHere
from ics_service.alerts.sns import SnsChannel, subject_of
from ics_service.errors import UsageError
from ics_service.logs import configure_logging

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


class Records(logging.Handler):
    """Every record that reaches the logger it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@dataclass
class Logged:
    """What reaches ICS's logging (at DEBUG, on stderr), a handler on the root logger (as a
    host application configures one), and one attached to apprise's own logger."""

    root: Records
    apprise: Records
    capsys: pytest.CaptureFixture[str]

    def outside_apprise(self) -> str:
        return "\n".join(self.root.lines) + self.capsys.readouterr().err


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[Logged]:
    configure_logging("DEBUG", "text")
    root, inside = logging.getLogger(), logging.getLogger("apprise")
    seen = Logged(Records(), Records(), capsys)
    level = root.level
    root.addHandler(seen.root)
    inside.addHandler(seen.apprise)
    root.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        root.removeHandler(seen.root)
        inside.removeHandler(seen.apprise)
        root.setLevel(level)


# --- SNS ------------------------------------------------------------------------------


def _subscribed_queue(topic_arn: str, fifo: bool = False) -> str:
    sqs = boto3.client("sqs")
    queue_url: str = sqs.create_queue(
        QueueName="ops.fifo" if fifo else "ops",
        Attributes={"FifoQueue": "true"} if fifo else {},
    )["QueueUrl"]
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

    got = {m["MessageAttributes"]["kind"]["Value"]: m for m in _receive(queue_url, 2)}
    first, second = got["low_confidence"], got["execution_failed"]
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
    answer = boto3.client("sqs").receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)
    assert answer.get("Messages", []) == []


def test_sns_topic_that_does_not_exist_is_dead_lettered(aws: AwsServer) -> None:
    channel = SnsChannel("sns://arn:aws:sns:us-east-1:123456789012:nobody", timeout_s=5.0)
    with pytest.raises(DeliveryError) as caught:
        channel.send(ALERT, TITLE, BODY)
    assert caught.value.transient is False
    assert "arn:aws:sns:us-east-1:123456789012:nobody" in str(caught.value)
    assert "NotFound" in str(caught.value) and "\n" not in str(caught.value)


def test_sns_without_credentials_is_left_to_a_process_that_has_them(
    aws: AwsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    channel = SnsChannel("sns://arn:aws:sns:us-east-1:123456789012:ics", timeout_s=5.0)
    with pytest.raises(NotFromHere, match="no usable AWS credentials"):
        channel.send(ALERT, TITLE, BODY)


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


# --- e-mail through apprise -------------------------------------------------------------


@dataclass
class Mailbox:
    """What a real SMTP server received, and who logged in."""

    messages: list[email.message.EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        self.messages.append(message)
        self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = (data.login.decode(), data.password.decode())
        self.logins.append(login)
        # handled=False: the server answers a refusal with 535 itself.
        return AuthResult(success=login == ("ics", PASSWORD), handled=False)


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, Mailbox]]:
    mailbox = Mailbox()
    port = _free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=mailbox.authenticate,
        # AUTH offered on plain SMTP on loopback (a real server requires STARTTLS first:
        # mode=starttls); apprise logs in whenever the URL has a password.
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield port, mailbox
    finally:
        controller.stop()


def _mailto(port: int, password: str = PASSWORD) -> str:
    return (
        f"mailto://ics:{password}@127.0.0.1:{port}"
        "?from=ics@example.com&to=ops@example.com&mode=insecure"
    )


def test_email_arrives_with_subject_and_body(smtp_server: tuple[int, Mailbox]) -> None:
    port, mailbox = smtp_server
    channel = AppriseChannel(_mailto(port), timeout_s=5.0)
    channel.send(ALERT, TITLE, BODY)
    assert mailbox.logins == [("ics", PASSWORD)]
    assert mailbox.envelopes == [("ics@example.com", ["ops@example.com"])]
    (message,) = mailbox.messages
    assert message["Subject"] == TITLE
    assert message["To"] == "ops@example.com"
    text = message.get_body(("plain",))
    assert text is not None
    assert text.get_content().strip().splitlines() == BODY.splitlines()


def test_email_refused_login_is_reported_without_the_password(
    smtp_server: tuple[int, Mailbox], logged: Logged
) -> None:
    port, mailbox = smtp_server
    channel = AppriseChannel(_mailto(port, password="wrong-Pa55word"), timeout_s=5.0)
    with pytest.raises(DeliveryError) as caught:
        channel.send(ALERT, TITLE, BODY)
    # smtplib tries each mechanism the server offers (PLAIN, then LOGIN).
    assert set(mailbox.logins) == {("ics", "wrong-Pa55word")} and mailbox.messages == []
    assert caught.value.transient is False
    assert "E-Mail notification to mailto://ics:****@127.0.0.1" in str(caught.value)
    assert "535" in str(caught.value) and "Authentication credentials invalid" in str(caught.value)
    assert "wrong-Pa55word" not in str(caught.value)
    logging.getLogger("ics_service.alerts").warning("delivery failed: %s", caught.value)
    shown = logged.outside_apprise()
    assert "delivery failed: E-Mail notification" in shown and "wrong-Pa55word" not in shown


def test_shown_hides_the_password_of_a_mailto_url(smtp_server: tuple[int, Mailbox]) -> None:
    port, _ = smtp_server
    shown = AppriseChannel(_mailto(port), timeout_s=5.0).shown()
    assert shown.startswith(f"mailto://ics:****@127.0.0.1:{port}")
    assert PASSWORD not in shown


# --- json:// through apprise to an HTTP receiver --------------------------------------


class Receiver(ThreadingHTTPServer):
    """Records each POST; answers with `status`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.status = 200

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.posts.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_json_arrives_with_title_and_body(receiver: Receiver) -> None:
    channel = AppriseChannel(f"json://127.0.0.1:{receiver.port}/hooks/ics", timeout_s=5.0)
    channel.send(ALERT, TITLE, BODY)
    ((path, posted),) = receiver.posts
    assert path == "/hooks/ics"
    assert posted["title"] == TITLE
    assert posted["message"] == BODY


@pytest.mark.parametrize(("status", "transient"), [(401, False), (404, False), (503, True)])
def test_json_receiver_refusal_or_outage(receiver: Receiver, status: int, transient: bool) -> None:
    receiver.status = status
    url = f"json://ics:{PASSWORD}@127.0.0.1:{receiver.port}/hooks/ics"
    with pytest.raises(DeliveryError) as caught:
        AppriseChannel(url, timeout_s=5.0).send(ALERT, TITLE, BODY)
    assert caught.value.transient is transient
    assert f"error={status}" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert len(receiver.posts) == 1


def test_json_receiver_down_is_transient() -> None:
    url = f"json://ics:{PASSWORD}@127.0.0.1:{_free_port()}/hooks/ics"
    with pytest.raises(DeliveryError, match="Connection error") as caught:
        AppriseChannel(url, timeout_s=5.0).send(ALERT, TITLE, BODY)
    assert caught.value.transient is True
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "Connection error"),
        # The URL's own socket timeouts are longer: apprise's call deadline still holds.
        ("?cto=30&rto=30", "did not finish within 1 s"),
    ],
)
def test_json_silent_receiver_is_transient_within_the_timeout(
    silent_port: int, query: str, said: str
) -> None:
    channel = AppriseChannel(f"json://127.0.0.1:{silent_port}/hooks/ics{query}", timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=said) as caught:
        channel.send(ALERT, TITLE, BODY)
    assert caught.value.transient is True
    assert time.monotonic() - started < 3.0


# --- URLs apprise cannot use -----------------------------------------------------------


@pytest.mark.parametrize("url", ["nope://host/path", "webhooks.example.com/ics", "smtp://host"])
def test_unknown_scheme_is_a_usage_error_listing_supported_ones(url: str) -> None:
    with pytest.raises(UsageError, match=r"unknown alert channel scheme .*mailto://.*slack://"):
        AppriseChannel(url, timeout_s=5.0)


def test_unusable_url_is_a_usage_error_that_hides_tokens(logged: Logged) -> None:
    token = "TIiajk!dnlazkcOXrIdevi7FQ"
    with pytest.raises(UsageError, match="invalid Slack") as caught:
        AppriseChannel(f"slack://T1JJ3T3L2/A1BRTD4JD/{token}/#general", timeout_s=5.0)
    assert token not in str(caught.value)
    # apprise's own warning quotes the token: it reaches neither ICS's log nor the root's.
    assert [line for line in logged.apprise.lines if token in line]
    assert token not in logged.outside_apprise()


# --- the factory ---------------------------------------------------------------------------


def test_the_factory_builds_sns_and_apprise_channels_and_refuses_bad_urls(aws: AwsServer) -> None:
    from ics_service.alerts.channels import channel_for
    from ics_service.config import Settings

    settings = Settings(notify_sns_endpoint_url=aws.url)
    sns = channel_for(
        "sns://arn:aws:sns:us-east-1:123456789012:ops", timeout_s=2, settings=settings
    )
    assert isinstance(sns, SnsChannel)
    assert sns.client.meta.endpoint_url == aws.url
    mail = channel_for(
        "mailto://user:hunter22@127.0.0.1:2525?from=ics@example.com&to=ops@example.com",
        timeout_s=2,
        settings=settings,
    )
    assert isinstance(mail, AppriseChannel)
    assert "hunter22" not in mail.shown()
    for bad in ("sns://arn:aws:sns:nowhere", "nosuchscheme://x", "just-a-word"):
        with pytest.raises(UsageError):
            channel_for(bad, timeout_s=2, settings=settings)
