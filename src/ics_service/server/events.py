"""`POST /v1/events`: S3 event notifications start an execution for the objects they name.

Accepted: an S3 event notification (AWS or MinIO: `Records[].s3.bucket.name` and
`s3.object.key`, the key URL-encoded with `+` for a space), the same inside an SNS
envelope (`Type: Notification`, the event as the JSON string `Message`), and an
EventBridge "Object Created" event (`detail.bucket.name`, `detail.object.key`, taken as
written). The new objects become `s3://BUCKET/KEY` items of one execution, registered by
the code `ics watch` uses (engine/watch.py) under the watcher name `s3-events`: an object
(by key and ETag) is registered once, so a redelivered event classifies nothing again.

An SNS SubscriptionConfirmation is not confirmed by the server (that would mean fetching a
URL from the request): it is logged with the command that confirms it, and answered 200.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engine.batcher import QueueFull
from ..engine.execution import ExecutionRunner, settings_for
from ..engine.watch import start_batch
from ..errors import IcsError, UsageError
from ..sources.remote import listed
from ..store.watched import Seen, WatchState
from ..types import Execution, ExecutionStatus
from .allowed import Forbidden, allowed_uri
from .batches import Batches
from .executions import execution_doc
from .jsonbody import BadJson, parse_json

log = logging.getLogger(__name__)
#: Lines a request causes, one per request: throttled by `ics serve` (cli/serve.py).
clients_log = logging.getLogger("ics_service.server.clients")

router = APIRouter()

#: The watcher name under which events register their objects (the executions are
#: named watch-s3-events-N).
EVENTS_WATCHER = "s3-events"
#: Objects one event may name at most (S3 sends one a record; SNS and batching, a few).
MAX_OBJECTS = 1000


class BadEvent(UsageError):
    """A body that is no S3 event notification this server understands (400)."""


@dataclass
class Parsed:
    """What an event document names: objects created, and what else it held."""

    kind: str
    created: list[tuple[str, str, str]] = field(default_factory=list)  # bucket, key, version
    ignored: list[str] = field(default_factory=list)
    answer: dict[str, Any] | None = None  # a document answered as it is (SNS control)


def parse_event(doc: Any) -> Parsed:
    """The objects an S3 event notification, SNS envelope or EventBridge event names."""
    if not isinstance(doc, dict):
        raise BadEvent("the body must be a JSON object: an S3 event notification")
    sns_type = doc.get("Type")
    if sns_type == "Notification" and isinstance(doc.get("Message"), str):
        try:
            inner = parse_json(doc["Message"])
        except BadJson as e:
            raise BadEvent(f"the SNS notification's Message is not JSON: {e}") from None
        parsed = parse_event(inner)
        parsed.kind = f"sns/{parsed.kind}"
        return parsed
    if sns_type == "SubscriptionConfirmation":
        return _subscription(doc)
    if sns_type == "UnsubscribeConfirmation":
        return Parsed("sns", ignored=["UnsubscribeConfirmation"])
    if isinstance(doc.get("Records"), list):
        return _records(doc["Records"])
    if doc.get("source") == "aws.s3" and "detail-type" in doc:
        return _eventbridge(doc)
    if doc.get("Event") == "s3:TestEvent":
        return Parsed("s3", ignored=["s3:TestEvent"])
    raise BadEvent(
        "not an S3 event: expected an S3 event notification (Records[].s3), an SNS "
        "envelope (Type: Notification) holding one, or an EventBridge event from aws.s3"
    )


def _records(records: list[Any]) -> Parsed:
    parsed = Parsed("s3")
    for n, record in enumerate(records):
        if not isinstance(record, dict):
            raise BadEvent(f"Records[{n}] is not an object")
        name = str(record.get("eventName", ""))
        # AWS writes ObjectCreated:Put, MinIO s3:ObjectCreated:Put.
        if not name.removeprefix("s3:").startswith("ObjectCreated:"):
            parsed.ignored.append(name or "(no eventName)")
            continue
        s3 = record.get("s3")
        bucket = _text(s3, "bucket", "name")
        key = _text(s3, "object", "key")
        if bucket is None or key is None:
            raise BadEvent(f"Records[{n}] lacks s3.bucket.name or s3.object.key")
        obj = s3["object"] if isinstance(s3, dict) else {}
        # Keys are URL-encoded as form values (a space is +; MinIO also encodes /).
        parsed.created.append((bucket, urllib.parse.unquote_plus(key), _version(obj)))
    return parsed


def _eventbridge(doc: dict[str, Any]) -> Parsed:
    kind = str(doc.get("detail-type"))
    if kind != "Object Created":
        return Parsed("eventbridge", ignored=[kind])
    detail = doc.get("detail")
    bucket = _text(detail, "bucket", "name")
    key = _text(detail, "object", "key")
    if bucket is None or key is None:
        raise BadEvent("the EventBridge event lacks detail.bucket.name or detail.object.key")
    obj = detail["object"] if isinstance(detail, dict) else {}
    return Parsed("eventbridge", created=[(bucket, key, _version(obj))])


def _subscription(doc: dict[str, Any]) -> Parsed:
    topic, token = doc.get("TopicArn"), doc.get("Token")
    if not isinstance(topic, str) or not isinstance(token, str):
        raise BadEvent("the SNS SubscriptionConfirmation lacks TopicArn or Token")
    command = f"aws sns confirm-subscription --topic-arn {topic} --token {token}"
    clients_log.warning(
        "SNS asks to confirm the subscription of this server to %s: not confirmed "
        "automatically; to receive its notifications, run: %s",
        topic,
        command,
    )
    return Parsed(
        "sns",
        answer={
            "status": "SubscriptionConfirmation",
            "topic_arn": topic,
            "confirmed": False,
            "message": f"the server does not confirm subscriptions itself; run: {command}",
        },
    )


def _text(doc: Any, outer: str, inner: str) -> str | None:
    part = doc.get(outer) if isinstance(doc, dict) else None
    value = part.get(inner) if isinstance(part, dict) else None
    return value if isinstance(value, str) and value else None


def _version(obj: dict[str, Any]) -> str:
    """What tells this upload of the key from another: ETag, else version id or sequencer."""
    for name in ("eTag", "etag", "versionId", "version-id", "sequencer"):
        value = obj.get(name)
        if isinstance(value, str) and value:
            return value.strip('"')
    return ""


def check_allowed(bucket: str, key: str, allowed: list[str]) -> str:
    """The object's URI, or Forbidden (403) unless an allowed_sources prefix holds it: the
    check `POST /v1/classify` makes of a `uri`."""
    uri = f"s3://{bucket}/{key}"
    try:
        return allowed_uri(uri, allowed)
    except Forbidden as e:
        raise Forbidden(
            f"{e} (add s3://BUCKET/PREFIX to allowed_sources to accept its events)"
        ) from None


@router.post(
    "/v1/events",
    summary="Classify the objects an S3 event notification names (S3, SNS or EventBridge)",
    responses={
        200: {"description": "Nothing new to classify: the reason, and any executions."},
        202: {"description": "An execution was started for the new objects."},
        400: {"description": "Not an S3 event notification."},
        403: {"description": "An object is outside allowed_sources."},
    },
    status_code=202,
)
async def post_event(request: Request) -> JSONResponse:
    # SNS posts its JSON as text/plain: the body is parsed whatever its content type.
    body = await request.body()
    try:
        doc = parse_json(body)
    except BadJson as e:
        raise BadEvent(f"the body is not JSON this server can read: {e}") from None
    parsed = parse_event(doc)
    if parsed.answer is not None:
        return JSONResponse(parsed.answer, status_code=200)
    if len(parsed.created) > MAX_OBJECTS:
        raise BadEvent(f"the event names {len(parsed.created)} objects; at most {MAX_OBJECTS}")
    batches: Batches = request.app.state.batches
    allowed = batches.settings.allowed_sources
    objects = []
    for bucket, key, version in parsed.created:
        if listed(key):
            objects.append(Seen(check_allowed(bucket, key, allowed), version))
        else:  # a folder marker, a .json sidecar: what a watcher's listing leaves out too
            parsed.ignored.append(f"s3://{bucket}/{key}")
    if not objects:
        return JSONResponse(
            {
                "status": "ignored",
                "kind": parsed.kind,
                "ignored": parsed.ignored,
                "message": "no image was created: nothing to classify",
            },
            status_code=200,
        )
    return await asyncio.to_thread(_start, batches, parsed, objects)


def resume_unfinished(batches: Batches) -> None:
    """At start-up, queue the events' executions that a stopped server left with items to
    run (ABORTED: its queue is aborted at shutdown; FAILED by an error such as a full
    disk): their objects are registered, so no redelivered event would classify them.
    Orphans left RUNNING are resumed with the other orphans; executions cancelled by
    request stay cancelled."""
    if not batches.settings.resume_orphans:
        return
    try:
        unfinished = WatchState(batches.store, EVENTS_WATCHER).unfinished()
    except IcsError as e:
        log.error("could not look for event executions to resume: %s", e)
        return
    for n, execution in enumerate(unfinished):
        if execution.status is ExecutionStatus.RUNNING:
            continue
        log.warning(
            "execution %s (%s) was left %s: resuming it",
            execution.id,
            execution.name,
            execution.status.value,
            extra={"execution_id": execution.id},
        )
        settings = settings_for(execution, batches.settings)
        try:
            batches.start_listed(_resumer(execution.id), settings)
        except IcsError as e:  # taken by another server meanwhile, or nothing left in it
            log.warning("execution %s not resumed: %s", execution.id, e)
        except QueueFull:
            log.warning(
                "%d event executions not resumed: the queue is full; the next start resumes them",
                len(unfinished) - n,
            )
            return


def _resumer(execution_id: str) -> Callable[[ExecutionRunner], Execution]:
    def resume(runner: ExecutionRunner) -> Execution:
        return runner.prepare_resume(execution_id)

    return resume


def _start(batches: Batches, parsed: Parsed, objects: list[Seen]) -> JSONResponse:
    state = WatchState(batches.store, EVENTS_WATCHER)
    specs = sorted({o.uri for o in objects})

    def register(runner: ExecutionRunner) -> Execution | None:
        return start_batch(runner, state, objects, specs)

    execution = batches.start_listed(register, batches.settings)
    if execution is None:
        return JSONResponse(
            {
                "status": "duplicate",
                "kind": parsed.kind,
                "message": "every object was registered by an earlier event: nothing new",
                "executions": state.executions_of(objects),
            },
            status_code=200,
        )
    return JSONResponse(
        {**execution_doc(batches, execution), "kind": parsed.kind, "ignored": parsed.ignored},
        status_code=202,
        headers={"Location": f"/v1/executions/{execution.id}"},
    )
