"""`POST /v1/events`: S3 event notifications (AWS, MinIO, inside SNS, EventBridge) start one
execution for the objects they name, once per object, only under allowed_sources.

The payloads are shaped as AWS and MinIO document and send them."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from ics_service.config import Settings
from ics_service.engine.execution import execution_params
from ics_service.engine.lifecycle import record_end
from ics_service.models.runtime import OnnxRuntime
from ics_service.server import create_app
from ics_service.server.batches import MAX_QUEUED
from ics_service.server.events import EVENTS_WATCHER, BadEvent, parse_event
from ics_service.store import Store
from ics_service.store.watched import Seen, WatchState
from ics_service.types import ErrorInfo, ExecutionStatus, ModelRef
from serving import client_of, error_of, finished, serve_process

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def aws_record(bucket: str, key: str, event: str = "ObjectCreated:Put") -> dict[str, Any]:
    """One record of an S3 event notification, as S3 sends it (the key URL-encoded)."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "2026-11-29T12:00:00.000Z",
        "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "172.16.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": key,
                "size": 1024,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                "sequencer": "0055AED6DCD90281E5",
            },
        },
    }


def minio_event(bucket: str, key: str) -> dict[str, Any]:
    """A MinIO webhook notification (its key also URL-encodes '/')."""
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "awsRegion": "",
                "eventTime": "2026-11-29T12:00:00.000Z",
                "eventName": "s3:ObjectCreated:Put",
                "userIdentity": {"principalId": "minio"},
                "requestParameters": {"principalId": "minio", "region": "", "sourceIPAddress": ""},
                "responseElements": {
                    "x-amz-request-id": "159FB6B233B08AF0",
                    "x-minio-deployment-id": "cd7a0eb7-a1f9-48d9-b21a-56366d75cfdd",
                    "x-minio-origin-endpoint": "http://172.18.0.6:9000",
                },
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "Config",
                    "bucket": {
                        "name": bucket,
                        "ownerIdentity": {"principalId": "minio"},
                        "arn": f"arn:aws:s3:::{bucket}",
                    },
                    "object": {
                        "key": key.replace("/", "%2F"),
                        "size": 629648,
                        "eTag": "b7ce786cd89b182bfd5ae765557bbc37",
                        "contentType": "image/jpeg",
                        "userMetadata": {"content-type": "image/jpeg"},
                        "sequencer": "15612487A9DF732C",
                    },
                },
                "source": {"host": "172.18.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
            }
        ],
    }


def sns(message: dict[str, Any]) -> dict[str, Any]:
    """An SNS HTTP(S) notification carrying the message."""
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-west-2:123456789012:images-uploaded",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(message),
        "Timestamp": "2026-11-29T12:00:00.000Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQ",
        "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-west-2:123456789012:images-uploaded:c9135db0",
    }


def eventbridge(bucket: str, key: str, detail_type: str = "Object Created") -> dict[str, Any]:
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2026-11-29T12:00:00Z",
        "region": "ca-central-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "size": 5,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
                "sequencer": "617f08299329d189",
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "source-ip-address": "1.2.3.4",
            "reason": "PutObject",
        },
    }


# --- parsing ---------------------------------------------------------------------------


def test_s3_keys_are_url_decoded_and_only_creations_count() -> None:
    doc = {
        "Records": [
            aws_record("photos", "uploads/red+flower%281%29.jpg"),
            aws_record("photos", "uploads/c%2B%2B.jpg", "ObjectCreated:CompleteMultipartUpload"),
            aws_record("photos", "uploads/gone.jpg", "ObjectRemoved:Delete"),
        ]
    }
    parsed = parse_event(doc)
    assert parsed.kind == "s3"
    assert [(b, k) for b, k, _ in parsed.created] == [
        ("photos", "uploads/red flower(1).jpg"),
        ("photos", "uploads/c++.jpg"),
    ]
    assert parsed.created[0][2] == "d41d8cd98f00b204e9800998ecf8427e"
    assert parsed.ignored == ["ObjectRemoved:Delete"]


def test_minio_sns_and_eventbridge_payloads() -> None:
    minio = parse_event(minio_event("images", "2026/11/cat photo.jpg".replace(" ", "+")))
    assert [(b, k) for b, k, _ in minio.created] == [("images", "2026/11/cat photo.jpg")]

    wrapped = parse_event(sns({"Records": [aws_record("photos", "a/b+c.jpg")]}))
    assert wrapped.kind == "sns/s3"
    assert [(b, k) for b, k, _ in wrapped.created] == [("photos", "a/b c.jpg")]

    bridge = parse_event(eventbridge("photos", "raw/x+y.jpg"))
    assert bridge.kind == "eventbridge"
    # EventBridge keys are taken as written.
    assert bridge.created == [("photos", "raw/x+y.jpg", "b1946ac92492d2347c6235b4d2611184")]
    deleted = parse_event(eventbridge("photos", "raw/x.jpg", "Object Deleted"))
    assert deleted.created == [] and deleted.ignored == ["Object Deleted"]

    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"}
    assert parse_event(sns(test_event)).ignored == ["s3:TestEvent"]


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([1, 2], "must be a JSON object"),
        ({"hello": "world"}, "not an S3 event"),
        ({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}, "lacks s3.bucket.name"),
        ({"Records": ["x"]}, "Records[0] is not an object"),
        ({"Type": "Notification", "Message": "{not json"}, "Message is not JSON"),
        ({"source": "aws.s3", "detail-type": "Object Created", "detail": {}}, "lacks detail"),
    ],
)
def test_what_is_no_s3_event_says_why(doc: Any, says: str) -> None:
    with pytest.raises(BadEvent, match=says.replace("[", r"\[").replace("]", r"\]")):
        parse_event(doc)


# --- over HTTP -------------------------------------------------------------------------


def settings_of(home: Path, store_url: str, **kw: Any) -> Settings:
    return Settings(
        home=home,
        store=store_url,
        allowed_sources=["s3://photos/uploads/", "s3://archive"],
        record_realtime=False,
        **kw,
    )


async def test_an_event_starts_one_execution_once_per_object(
    store_url: str, ics_home: Path, runtime: OnnxRuntime
) -> None:
    store = Store(store_url)
    app = create_app(settings_of(ics_home, store_url), runtime=runtime, store=store)
    event = {
        "Records": [
            aws_record("photos", "uploads/red+flower.jpg"),
            aws_record("photos", "uploads/2026/cat.jpg"),
        ]
    }
    try:
        async with client_of(app) as client:
            # SNS posts as text/plain.
            r = await client.post(
                "/v1/events",
                content=json.dumps(sns(event)),
                headers={"Content-Type": "text/plain; charset=UTF-8"},
            )
            assert r.status_code == 202, r.text
            doc = r.json()
            assert doc["name"] == "watch-s3-events-1"
            assert doc["kind"] == "sns/s3"
            assert r.headers["location"] == f"/v1/executions/{doc['execution_id']}"
            done = await finished(client, doc["execution_id"])
            assert done["counts"]["total"] == 2
            results = (await client.get(f"/v1/executions/{doc['execution_id']}/results")).json()
            assert sorted(x["uri"] for x in results["results"]) == [
                "s3://photos/uploads/2026/cat.jpg",
                "s3://photos/uploads/red flower.jpg",
            ]

            # Redelivered (SNS retries, S3 sends twice): nothing new.
            again = await client.post("/v1/events", json=event)
            assert again.status_code == 200, again.text
            assert again.json()["status"] == "duplicate"
            assert again.json()["executions"] == [doc["execution_id"]]

            # One old object and one new: a new execution with the new one only.
            more = copy.deepcopy(event)
            more["Records"].append(aws_record("archive", "2025/dog.jpg"))
            third = await client.post("/v1/events", json=more)
            assert third.status_code == 202, third.text
            assert third.json()["name"] == "watch-s3-events-2"
            assert third.json()["counts"]["total"] == 1

            bridge = await client.post("/v1/events", json=eventbridge("photos", "uploads/z.jpg"))
            assert bridge.status_code == 202, bridge.text
            assert bridge.json()["name"] == "watch-s3-events-3"
    finally:
        store.close()


async def test_events_outside_allowed_sources_are_refused(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    app = create_app(settings_of(ics_home, store_url), runtime=runtime)
    async with client_of(app) as client:
        for bucket, key in [
            ("secrets", "uploads/a.jpg"),
            ("photos", "private/a.jpg"),
            ("photos", "uploads-other/a.jpg"),
            ("photos", "uploads/../private/a.jpg"),
        ]:
            doc = {"Records": [aws_record("photos", "uploads/ok.jpg"), aws_record(bucket, key)]}
            r = await client.post("/v1/events", json=doc)
            assert r.status_code == 403, (bucket, key, r.text)
            assert error_of(r)["type"] == "Forbidden"
        # Nothing was registered, not even the allowed object of a refused event.
        r = await client.post(
            "/v1/events", json={"Records": [aws_record("photos", "uploads/ok.jpg")]}
        )
        assert r.status_code == 202, r.text
        assert r.json()["name"] == "watch-s3-events-1"


async def test_deletions_subscriptions_and_bad_bodies(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    app = create_app(settings_of(ics_home, store_url, api_token="s3cr3t"), runtime=runtime)
    async with client_of(app, Authorization="Bearer s3cr3t") as client:
        removed = {"Records": [aws_record("photos", "uploads/a.jpg", "ObjectRemoved:Delete")]}
        r = await client.post("/v1/events", json=removed)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ignored"
        assert r.json()["ignored"] == ["ObjectRemoved:Delete"]

        confirm = {
            "Type": "SubscriptionConfirmation",
            "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
            "Token": "2336412f37fb687f5d51e6e2425f004aed",
            "TopicArn": "arn:aws:sns:us-west-2:123456789012:images-uploaded",
            "Message": "You have chosen to subscribe to the topic ...",
            "SubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription",
            "Timestamp": "2026-11-29T12:00:00.000Z",
        }
        with caplog.at_level(logging.WARNING, logger="ics_service.server.clients"):
            r = await client.post("/v1/events", json=confirm)
        assert r.status_code == 200, r.text
        assert r.json()["confirmed"] is False
        assert "aws sns confirm-subscription --topic-arn" in r.json()["message"]
        assert "2336412f37fb687f5d51e6e2425f004aed" in caplog.text

        r = await client.post("/v1/events", content=b"\xff not json")
        assert r.status_code == 400
        assert "not JSON" in error_of(r)["message"]
        r = await client.post("/v1/events", json={"hello": "world"})
        assert r.status_code == 400
        assert "not an S3 event" in error_of(r)["message"]

        r = await client.post(
            "/v1/events",
            json={"Records": [aws_record("photos", "uploads/a.jpg")]},
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 403, r.text


async def test_a_server_resumes_event_executions_a_stopped_server_left(
    store_url: str, ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = settings_of(ics_home, store_url)
    store = Store(store_url)
    try:
        # As a server stopping with it queued leaves it: registered, then ABORTED.
        left = WatchState(store, EVENTS_WATCHER).register(
            [Seen("s3://photos/uploads/left.jpg", "e1")],
            params=execution_params(settings, ["s3://photos/uploads/left.jpg"]),
            model=ModelRef(runtime.card.name, runtime.card.version),
            threshold=settings.threshold,
            owner="another-host:1",
        )
        assert left is not None
        record_end(store, left.id, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "x"))

        app = create_app(settings, runtime=runtime, store=store)
        async with client_of(app) as client:
            done = await finished(client, left.id)
            assert done["status"] != "ABORTED" and done["counts"]["total"] == 1
            assert ended(done) == 1
            history = (await client.get(f"/v1/executions/{left.id}/history")).json()
            assert "ExecutionResumed" in [e["type"] for e in history["events"]]
            event = {"Records": [aws_record("photos", "uploads/left.jpg")]}
            event["Records"][0]["s3"]["object"]["eTag"] = "e1"
            again = await client.post("/v1/events", json=event)
            assert again.status_code == 200 and again.json()["status"] == "duplicate"
    finally:
        store.close()


def ended(doc: dict[str, Any]) -> int:
    c = doc["counts"]
    return int(c["SUCCEEDED"] + c["LOW_CONFIDENCE"] + c["FAILED"])


@pytest.mark.slow
def test_a_real_server_takes_an_event(ics_home: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "ICS_STORE": f"sqlite:///{tmp_path / 'ics.db'}",
        "ICS_ALLOWED_SOURCES": '["s3://photos/uploads/"]',
        "ICS_API_TOKEN": "s3cr3t",
    }
    with serve_process(env=env) as served:
        headers = {"Authorization": "Bearer s3cr3t", "Content-Type": "text/plain"}
        body = json.dumps(sns({"Records": [aws_record("photos", "uploads/a+b.jpg")]}))
        r = httpx.post(f"{served.url}/v1/events", content=body, headers=headers, timeout=30)
        assert r.status_code == 202, r.text
        assert r.json()["name"] == "watch-s3-events-1"
        again = httpx.post(f"{served.url}/v1/events", content=body, headers=headers, timeout=30)
        assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
        outside = json.dumps({"Records": [aws_record("photos", "private/a.jpg")]})
        r = httpx.post(f"{served.url}/v1/events", content=outside, headers=headers, timeout=30)
        assert r.status_code == 403, r.text


async def test_markers_sidecars_and_deep_json(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    app = create_app(settings_of(ics_home, store_url), runtime=runtime)
    async with client_of(app) as client:
        # The console's "create folder" marker and a sidecar: what a watcher's listing skips.
        marker, sidecar = aws_record("photos", "uploads/"), aws_record("photos", "uploads/a.json")
        only = {"Records": [marker, sidecar]}
        r = await client.post("/v1/events", json=only)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ignored"
        assert r.json()["ignored"] == ["s3://photos/uploads/", "s3://photos/uploads/a.json"]
        mixed = {"Records": [marker, aws_record("photos", "uploads/b.jpg")]}
        r = await client.post("/v1/events", json=mixed)
        assert r.status_code == 202, r.text
        assert r.json()["counts"]["total"] == 1
        assert r.json()["ignored"] == ["s3://photos/uploads/"]

        r = await client.post("/v1/events", content=b"[" * 200_000 + b"]" * 200_000)
        assert r.status_code == 400, r.text
        assert "not JSON" in error_of(r)["message"]


async def test_allowed_sources_match_whole_buckets_and_plain_keys(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    app = create_app(settings_of(ics_home, store_url), runtime=runtime)
    async with client_of(app) as client:
        for bucket, key in [
            ("archive-other", "a.jpg"),  # s3://archive is allowed, not every bucket it starts
            ("photos", "uploads/./a.jpg"),
            ("photos", "private/../uploads/a.jpg"),  # S3 reads this key as written
            ("photos", "uploads-x//uploads/a.jpg"),
        ]:
            r = await client.post("/v1/events", json={"Records": [aws_record(bucket, key)]})
            assert r.status_code == 403, (bucket, key, r.text)
        r = await client.post("/v1/events", json={"Records": [aws_record("archive", "a.jpg")]})
        assert r.status_code == 202, r.text
        # The same check for a `uri` of /v1/classify: S3 would read this key as written.
        uri = "s3://photos/private/../uploads/a.jpg"
        r = await client.post("/v1/classify", json={"uri": uri})
        assert r.status_code == 403, r.text
        assert "'..' segments" in error_of(r)["message"]


async def test_sns_authenticates_with_basic_auth(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    app = create_app(settings_of(ics_home, store_url, api_token="s3cr3t"), runtime=runtime)
    confirm = {
        "Type": "SubscriptionConfirmation",
        "Token": "2336412f37fb687f5d51e6e2425f004aed",
        "TopicArn": "arn:aws:sns:us-west-2:123456789012:images-uploaded",
    }
    async with client_of(app) as client:
        r = await client.post("/v1/events", json=confirm)
        assert r.status_code == 401, r.text
        assert "Basic" in r.headers["www-authenticate"]
        # What SNS sends for https://sns:s3cr3t@host/v1/events.
        r = await client.post("/v1/events", json=confirm, auth=("sns", "s3cr3t"))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "SubscriptionConfirmation"
        r = await client.post("/v1/events", json=confirm, auth=("sns", "wrong"))
        assert r.status_code == 403, r.text
        r = await client.post(
            "/v1/events", json=confirm, headers={"Authorization": "Basic !!not-base64"}
        )
        assert r.status_code == 403, r.text
        # Elsewhere, the token is still a bearer token only.
        r = await client.get("/v1/executions", auth=("sns", "s3cr3t"))
        assert r.status_code == 401, r.text


def left_event(store: Store, settings: Settings, uri: str, owner: str = "another-host:1") -> str:
    """An event execution registered as `POST /v1/events` registers one; its id."""
    model = ModelRef(settings.model, "1")
    execution = WatchState(store, EVENTS_WATCHER).register(
        [Seen(uri, "e1")],
        params=execution_params(settings, [uri]),
        model=model,
        threshold=settings.threshold,
        owner=owner,
    )
    assert execution is not None
    return execution.id


async def test_start_up_resumes_failed_ones_and_not_cancelled_ones(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    settings = settings_of(ics_home, store_url)
    store = Store(store_url)
    try:
        # A missing file: its item FAILS at once.
        failed = left_event(store, settings, str(tmp_path / "gone-1.jpg"))
        record_end(store, failed, ExecutionStatus.FAILED, ErrorInfo("States.Runtime", "disk"))
        cancelled = left_event(store, settings, str(tmp_path / "gone-2.jpg"))
        store.request_cancel(cancelled)
        record_end(store, cancelled, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "x"))
        app = create_app(settings, runtime=runtime, store=store)
        async with client_of(app) as client:
            done = await finished(client, failed)
            assert done["status"] == "FAILED" and ended(done) == 1
        after = store.get_execution(cancelled)
        assert after.status is ExecutionStatus.ABORTED and after.counts.done == 0
    finally:
        store.close()


async def test_start_up_survives_a_full_queue(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_url = f"sqlite:///{tmp_path / 'ics.db'}"
    settings = settings_of(ics_home, store_url)
    store = Store(store_url)
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        # Orphans (their process is gone) fill the queue before the ABORTED ones are queued.
        for n in range(MAX_QUEUED + 20):
            left_event(
                store, settings, str(tmp_path / f"o-{n}.jpg"), f"{socket.gethostname()}:{dead.pid}"
            )
        aborted = [left_event(store, settings, str(tmp_path / f"a-{n}.jpg")) for n in range(3)]
        for execution_id in aborted:
            record_end(store, execution_id, ExecutionStatus.ABORTED, ErrorInfo("x", "x"))
        app = create_app(settings, runtime=runtime, store=store)
        with caplog.at_level(logging.WARNING, logger="ics_service.server.events"):
            async with client_of(app) as client:
                assert (await client.get("/healthz")).status_code == 200
        assert "the queue is full" in caplog.text
        # The server closed its queue on the way out: it left nothing RUNNING as its own
        # (orphans it did not get to stay orphans, for the next start).
        running = [e for e in store.list_executions(limit=1000) if not e.status.finished]
        assert {e.owner for e in running} <= {f"{socket.gethostname()}:{dead.pid}"}
        assert all(store.get_execution(i).status.finished for i in aborted)
    finally:
        store.close()
