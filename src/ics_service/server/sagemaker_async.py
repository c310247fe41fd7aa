"""SageMaker runtime's InvokeEndpointAsync: `POST /endpoints/{name}/async-invocations`, as
boto3's `sagemaker-runtime.invoke_endpoint_async(EndpointName=name, InputLocation=...)`
posts it, answered 202 with the `InferenceId` and the `OutputLocation` and `FailureLocation`
where the answer will be, as an endpoint with an AsyncInferenceConfig does.

Each request is one batch execution of one item, the InputLocation (named
`sagemaker-async-INFERENCE_ID`), run by the server's batch queue like `POST /v1/executions`:
it is recorded in the store, a server restart resumes it, and its result is in the
execution's results. What the request asked (Accept, CustomAttributes, the locations, the
topics) is recorded in the execution's params, so a resume finishes it as asked.

When its item has its result, `AsyncOutput` (a result sink of the run) writes
- on success (SUCCEEDED or LOW_CONFIDENCE), the body `invoke_endpoint` would answer for that
  Accept and CustomAttributes to `sagemaker_async_output_path/INFERENCE_ID.out`;
- on failure, the JSON body of the ModelError `invoke_endpoint` would answer to
  `sagemaker_async_failure_path/INFERENCE_ID.error` (or under the output path);
and writes the notification, in SageMaker's shape, for the success or error subscriptions to
the alerts outbox, which delivers it at least once. This happens before the execution's end
is recorded, so a server killed in between does it again when it resumes the execution: the
object is written again, the notification may come twice.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..alerts import documents
from ..engine.execution import ExecutionRunner, execution_params
from ..errors import OutputError
from ..sources import storage
from ..sources.remote import message
from ..store import Store
from ..store.outbox import NewAlert, Outbox
from ..types import Execution, ItemResult, isoformat, utcnow
from . import sagemaker_wire as wire
from .allowed import allowed_uri
from .batches import STARTED_BY_SERVER, Batches, check_source
from .service import Service

log = logging.getLogger(__name__)

router = APIRouter()

INPUT_LOCATION = "X-Amzn-SageMaker-InputLocation"
INFERENCE_ID = "X-Amzn-SageMaker-Inference-Id"
CONTENT_TYPE = "X-Amzn-SageMaker-Content-Type"
REQUEST_TTL = "X-Amzn-SageMaker-RequestTTLSeconds"
INVOCATION_TIMEOUT = "X-Amzn-SageMaker-InvocationTimeoutSeconds"
OUTPUT_LOCATION = "X-Amzn-SageMaker-OutputLocation"
FAILURE_LOCATION = "X-Amzn-SageMaker-FailureLocation"

#: The params key of an asynchronous inference's execution (what the request asked).
PARAM = "sagemaker_async"
#: Its execution's name is this and the InferenceId.
NAME_PREFIX = "sagemaker-async-"
#: InferenceIds taken: they name S3 objects under the output path, so no `/` and no `..`.
_INFERENCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,63}")
#: SageMaker's ranges for RequestTTLSeconds and InvocationTimeoutSeconds.
TTL_RANGE = (60, 21600)
TIMEOUT_RANGE = (1, 3600)

SUCCEEDED_KIND, FAILED_KIND = documents.ASYNC_KINDS


@dataclass(frozen=True)
class AsyncRequest:
    """What one InvokeEndpointAsync asked, as its execution records it."""

    inference_id: str
    endpoint: str
    input: str
    output: str
    failure: str
    accept: str
    content_type: str | None
    custom_attributes: str | None
    received_at: str
    #: Subscription ids notified of a success, of a failure.
    success_notify: list[str]
    error_notify: list[str]
    request_ttl_s: int | None = None
    invocation_timeout_s: int | None = None

    @classmethod
    def of(cls, params: dict[str, Any]) -> AsyncRequest:
        return cls(**params[PARAM])


@router.post(
    "/endpoints/{name}/async-invocations",
    status_code=202,
    summary="Classify the image at InputLocation asynchronously (InvokeEndpointAsync): the "
    "answer goes to OutputLocation, a failure to FailureLocation",
    response_description='`{"InferenceId": ID}`, with X-Amzn-SageMaker-OutputLocation and '
    "X-Amzn-SageMaker-FailureLocation",
    responses={
        400: {
            "description": "ValidationError: no InputLocation, a bad header, or no "
            "sagemaker_async_output_path configured"
        },
        403: {"description": "The InputLocation is outside allowed_sources."},
    },
)
def invoke_async(request: Request, name: str) -> JSONResponse:
    batches: Batches = request.app.state.batches
    service: Service = request.app.state.service
    settings = batches.settings
    headers = request.headers
    if settings.sagemaker_async_output_path is None:
        raise wire.BadRequest(
            "this endpoint takes no asynchronous invocations: set sagemaker_async_output_path "
            "(ICS_SAGEMAKER_ASYNC_OUTPUT_PATH) to the s3://BUCKET/PREFIX for their answers"
        )
    if int(headers.get("content-length") or 0) or "transfer-encoding" in headers:
        raise wire.BadRequest(
            "InvokeEndpointAsync takes its input from InputLocation, not from the request's "
            "Body: put the image in S3 and give its s3:// URI as InputLocation"
        )
    location = headers.get(INPUT_LOCATION)
    if not location:
        raise wire.BadRequest(
            "InputLocation is required: the s3:// URI (or an allowed local path) of the image"
        )
    inference_id = headers.get(INFERENCE_ID) or str(uuid.uuid4())
    if not _INFERENCE_ID.fullmatch(inference_id):
        raise wire.BadRequest(
            f"InferenceId {inference_id[:80]!r}: give 1 to 64 letters, digits and ._:@+=- "
            "(starting with a letter or digit); it names the answer's object"
        )
    media = wire.negotiate(headers.get(wire.STREAM_ACCEPT))
    served = service.default
    labels = served.runtime.card.labels
    raw = headers.get(wire.CUSTOM_ATTRIBUTES)
    attributes = wire.custom_attributes(raw, len(labels))
    check_source(location, settings.allowed_sources)
    uri = allowed_uri(location, settings.allowed_sources)
    failure_path = settings.sagemaker_async_failure_path or settings.sagemaker_async_output_path
    asked = AsyncRequest(
        inference_id=inference_id,
        endpoint=name,
        input=uri,
        output=f"{settings.sagemaker_async_output_path}/{inference_id}.out",
        failure=f"{failure_path}/{inference_id}.error",
        accept=media,
        content_type=headers.get(CONTENT_TYPE),
        custom_attributes=raw,
        received_at=str(isoformat(utcnow())),
        success_notify=[s.id for s in settings.sagemaker_async_success_notify],
        error_notify=[s.id for s in settings.sagemaker_async_error_notify],
        request_ttl_s=_seconds(headers, REQUEST_TTL, TTL_RANGE),
        invocation_timeout_s=_seconds(headers, INVOCATION_TIMEOUT, TIMEOUT_RANGE),
    )
    execution_name = NAME_PREFIX + inference_id
    existing = batches.store.find_by_name(execution_name)
    if existing is None:
        # Every class's probability is kept in the result: the answer is the whole softmax.
        run_settings = settings.model_copy(
            update={
                "threshold": served.threshold
                if attributes.threshold is None
                else attributes.threshold,
                "top_k": len(labels),
            }
        )

        def register(runner: ExecutionRunner) -> Execution | None:
            return _register(runner, execution_name, asked)

        if batches.start_listed(register, run_settings) is None:  # the same id, at once
            existing = batches.store.find_by_name(execution_name)
    if existing is not None:
        earlier = AsyncRequest.of(existing.params) if PARAM in existing.params else None
        if earlier is None or earlier.input != asked.input:
            raise wire.BadRequest(
                f"InferenceId {inference_id} names an earlier inference of another input: "
                "give a new InferenceId (or none: one is made)"
            )
        asked = earlier  # asked again: the first request's answer
    return JSONResponse(
        {"InferenceId": asked.inference_id},
        status_code=202,
        headers={OUTPUT_LOCATION: asked.output, FAILURE_LOCATION: asked.failure},
    )


def _seconds(headers: Any, name: str, bounds: tuple[int, int]) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    low, high = bounds
    if not value.isdigit() or not low <= int(value) <= high:
        raise wire.BadRequest(f"{name}: {value[:20]!r} is not a whole number from {low} to {high}")
    return int(value)


def _register(runner: ExecutionRunner, name: str, asked: AsyncRequest) -> Execution | None:
    """Create the execution of one asynchronous inference with its one item registered,
    claimed by this server (None when an execution of that name exists)."""
    store = runner.store
    s = runner.settings
    execution, created = store.create_execution(
        params=execution_params(
            s, [asked.input], **{STARTED_BY_SERVER: True, PARAM: asdict(asked)}
        ),
        model=runner.model_ref,
        threshold=s.threshold,
        name=name,
    )
    if not created:
        return None
    with runner.ending_on_error(execution.id):
        store.claim(execution.id, runner.owner)
        store.append_events(
            execution.id, [("ExecutionStarted", None, {"params": execution.params})]
        )
        store.add_items(execution.id, [asked.input])
        store.mark_listed(execution.id)
    log.info(
        "asynchronous inference %s: execution %s",
        asked.inference_id,
        execution.id,
        extra={"execution_id": execution.id},
    )
    return store.get_execution(execution.id)


def sinks_for(execution: Execution, runner: ExecutionRunner) -> AsyncOutput | None:
    """The sink that finishes an asynchronous inference's execution (None for others)."""
    if PARAM not in execution.params:
        return None
    return AsyncOutput(runner.store, execution.id, AsyncRequest.of(execution.params), runner)


class AsyncOutput:
    """Writes an asynchronous inference's answer or error, and its notification, once its
    item has its result (at the run's end: see the module)."""

    def __init__(
        self, store: Store, execution_id: str, asked: AsyncRequest, runner: ExecutionRunner
    ) -> None:
        self.store = store
        self.execution_id = execution_id
        self.asked = asked
        self.labels = runner.runtime.card.labels

    def write(self, results: Any) -> None:
        """Nothing yet: the result is read back from the store at the end, whichever run
        recorded it."""

    def close(self) -> None:
        result = next(iter(self.store.results(self.execution_id, limit=1)), None)
        if result is None:
            return  # stopped before its result: the run that resumes it writes the answer
        asked = self.asked
        if result.error is None:
            try:
                storage.put_bytes(self._answer(result), asked.output, "asynchronous answers")
            except Exception as e:
                why = f"cannot write the answer to {asked.output}: {message(e)}"
                log.error("asynchronous inference %s: %s", asked.inference_id, why)
                body = wire.aws_error(OutputError.http_status, "OutputError", why).body
                self._failed(body, why)
                return
            self._notify(SUCCEEDED_KIND, None)
            return
        error = result.error
        aws = wire.aws_error(
            wire.status_of(error.type), error.type, error.message, record=wire.record_of(result)
        )
        self._failed(aws.body, aws.body["Message"])

    def _answer(self, result: ItemResult) -> bytes:
        """The body invoke_endpoint answers for this result, Accept and CustomAttributes."""
        probs = np.zeros(len(self.labels), dtype=np.float64)
        for p in result.top_k:
            probs[p.index] = p.confidence
        top_k = wire.custom_attributes(self.asked.custom_attributes, len(self.labels)).top_k
        top = None if top_k is None else result.top_k[:top_k]
        return wire.render(self.asked.accept, probs, top, self.labels)

    def _failed(self, body: dict[str, Any], reason: str) -> None:
        asked = self.asked
        try:
            storage.put_bytes(json.dumps(body).encode(), asked.failure, "asynchronous errors")
        except Exception as e:
            log.error(
                "asynchronous inference %s: cannot write its error to %s: %s",
                asked.inference_id,
                asked.failure,
                message(e),
            )
        self._notify(FAILED_KIND, f"{body.get('error', {}).get('type', 'Error')}: {reason}")

    def _notify(self, kind: str, failure: str | None) -> None:
        asked = self.asked
        send_to = asked.error_notify if failure is not None else asked.success_notify
        if not send_to:
            return
        doc = notification(asked, kind, failure, self.execution_id)
        Outbox(self.store).add(
            [
                NewAlert(
                    alert_id=doc["alert_id"],
                    kind=kind,
                    document=doc,
                    execution_id=self.execution_id,
                    send_to=tuple(send_to),
                )
            ]
        )


def notification(
    asked: AsyncRequest, kind: str, failure: str | None, execution_id: str
) -> dict[str, Any]:
    """SageMaker's asynchronous inference notification (eventName InferenceResult), with
    the fields of an ICS alert (version, alert_id, kind, timestamp, execution_id)."""
    alert_id = documents.new_id()
    request = {
        "contentType": asked.content_type,
        "endpointName": asked.endpoint,
        "inputLocation": asked.input,
    }
    if failure is None:
        response = {"contentType": asked.accept, "outputLocation": asked.output}
    else:
        response = {"contentType": wire.JSON, "failureLocation": asked.failure}
    doc: dict[str, Any] = {
        "version": documents.VERSION,
        "alert_id": alert_id,
        "kind": kind,
        "timestamp": isoformat(utcnow()),
        "execution_id": execution_id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
        "eventTime": isoformat(utcnow()),
        "receivedTime": asked.received_at,
        "invocationStatus": "Completed" if failure is None else "Failed",
        "inferenceId": asked.inference_id,
        "requestParameters": request,
        "responseParameters": response,
    }
    if failure is not None:
        doc["failureReason"] = failure
    return doc
