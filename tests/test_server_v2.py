"""The Open Inference Protocol (/v2): in process with httpx, and end to end with the real
tritonclient.http against a real `ics serve`."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from ics_service.config import Settings
from ics_service.engine.execution import REALTIME_PREFIX
from ics_service.imaging import Limits, Preprocessor
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.server.app import create_app
from ics_service.store import Store
from ics_service.types import ItemResult, ItemStatus
from serving import client_of, serve_process

MODEL = "efficientnet-lite0"
ESPRESSO = 967
INFER = f"/v2/models/{MODEL}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"
SHAPE = "[-1, 3, 224, 224]"
EXTENSIONS = [
    "classification",
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
]


def jpeg(name: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_photo(name)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee() -> bytes:
    """scikit-image's coffee photo (an espresso), JPEG quality 95."""
    return jpeg("coffee")


@pytest.fixture(scope="module")
def coffee_tensor(runtime: OnnxRuntime, coffee: bytes) -> np.ndarray:
    """The coffee photo as the model's input, (1, 3, 224, 224) float32."""
    tensor, _ = Preprocessor(runtime.card, Limits())(coffee)
    return tensor[None]


Check = Callable[[httpx.AsyncClient], Awaitable[None]]


def in_process(
    runtime: OnnxRuntime, home: Path, check: Check, store: Store | None = None, **settings: Any
) -> None:
    """Run `check` against the app in process (lifespan and all)."""
    app = create_app(Settings(home=home, **settings), runtime=runtime, store=store)

    async def main() -> None:
        async with client_of(app) as client:
            await check(client)

    asyncio.run(main())


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    """A request of the binary tensor data extension: JSON header, then the tensors."""
    encoded = json.dumps(header).encode()
    return encoded + b"".join(blobs), {HEADER_LENGTH: str(len(encoded))}


def serialized(*elements: bytes) -> bytes:
    """BYTES elements as the binary extension sends them: 4-byte LE length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_outputs(response: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header of a binary response, and each output's binary data by name."""
    assert response.headers["content-type"] == "application/octet-stream"
    size = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:size])
    blobs, at = {}, size
    for out in header["outputs"]:
        if "binary_data_size" not in out.get("parameters", {}):
            continue
        n = out["parameters"]["binary_data_size"]
        blobs[out["name"]] = response.content[at : at + n]
        at += n
    assert at == len(response.content)
    return header, blobs


def protocol_error(response: httpx.Response) -> str:
    """The message of an error as the protocol writes it: `{"error": "message"}`."""
    doc = response.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    message: str = doc["error"]
    return message


def tensor_request(tensor: np.ndarray, **outputs: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "INPUT_TENSOR",
                "datatype": "FP32",
                "shape": list(tensor.shape),
                "data": tensor.reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": outputs}],
    }


def realtime_results(store: Store) -> list[ItemResult]:
    (execution,) = [
        e for e in store.list_executions() if (e.name or "").startswith(REALTIME_PREFIX)
    ]
    return list(store.results(execution.id))


# --- in process -------------------------------------------------------------------------


def test_health_and_metadata(runtime: OnnxRuntime, ics_home: Path) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.get("/v2/health/live")
        assert (r.status_code, r.json()) == (200, {"live": True})
        r = await client.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (200, {"ready": True})
        r = await client.get("/v2")
        assert r.json() == {
            "name": "ics",
            "version": r.json()["version"],
            "extensions": EXTENSIONS,
        }
        meta = (await client.get(f"/v2/models/{MODEL}")).json()
        assert meta == {
            "name": MODEL,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": "INPUT", "datatype": "BYTES", "shape": [-1]},
                {"name": "INPUT_TENSOR", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
            ],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}],
            "parameters": {"device": "cpu"},
        }
        assert (await client.get(f"/v2/models/{MODEL}/versions/1")).json() == meta
        for path in (f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"):
            r = await client.get(path)
            assert (r.status_code, r.json()) == (200, {"name": MODEL, "ready": True})

    in_process(runtime, ics_home, check)


def test_model_config_is_tritons_shape_with_the_servers_settings(
    runtime: OnnxRuntime, ics_home: Path
) -> None:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    async def check(client: httpx.AsyncClient) -> None:
        r = await client.get(f"/v2/models/{MODEL}/config")
        assert r.status_code == 200
        config = r.json()
        # Triton's own message reads it whole: no field outside its model_config.proto.
        json_format.ParseDict(config, model_config_pb2.ModelConfig())
        assert (config["name"], config["platform"], config["backend"]) == (
            MODEL,
            "onnxruntime_onnx",
            "onnxruntime",
        )
        assert config["max_batch_size"] == 4
        assert config["dynamic_batching"] == {
            "max_queue_delay_microseconds": 7000,
            "default_queue_policy": {"max_queue_size": 50},
        }
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
            ("INPUT", "TYPE_STRING", [1]),
            ("INPUT_TENSOR", "TYPE_FP32", [3, 224, 224]),
        ]
        assert config["input"][1]["format"] == "FORMAT_NCHW"
        assert config["output"] == [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [1000]}
        ]
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        card = runtime.card
        assert params["ics.preprocessing"] == "the model card's"
        assert params["ics.input_size"] == "224"
        assert params["ics.resize_size"] == str(card.resize_size)
        assert params["ics.mean"] == "127.5,127.5,127.5"
        assert params["ics.std"] == "128,128,128"
        assert params["ics.threshold"] == "0.94"
        assert (await client.get(f"/v2/models/{MODEL}/versions/1/config")).json() == config
        r = await client.get(f"/v2/models/{MODEL}/versions/7/config")
        assert r.status_code == 404 and "no version '7'" in protocol_error(r)
        r = await client.get("/v2/models/resnet50/config")
        assert r.status_code == 404 and "unknown model 'resnet50'" in protocol_error(r)

    in_process(
        runtime,
        ics_home,
        check,
        max_batch_size=4,
        max_delay_ms=7,
        max_queue=50,
        record_realtime=False,
    )


def test_statistics_count_each_input_and_run(
    runtime: OnnxRuntime, ics_home: Path, coffee: bytes, coffee_tensor: np.ndarray
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
        r = await client.get(f"/v2/models/{MODEL}/stats")
        assert r.status_code == 200
        (doc,) = r.json()["model_stats"]
        assert (doc["name"], doc["version"]) == (MODEL, "1")
        assert (await client.get("/v2/models/stats")).json()["model_stats"] == [doc]
        assert (await client.get(f"/v2/models/{MODEL}/versions/1/stats")).json() == {
            "model_stats": [doc]
        }
        return dict(doc)

    async def check(client: httpx.AsyncClient) -> None:
        zero = {"count": 0, "ns": 0}
        first = await stats(client)
        assert first["inference_count"] == first["execution_count"] == 0
        assert first["last_inference"] == 0 and first["batch_stats"] == []
        assert all(v == zero for v in first["inference_stats"].values())

        # Two images in one request, one tensor row, and one image that is not one.
        body, headers = binary_body(
            {
                "inputs": [
                    {
                        "name": "INPUT",
                        "datatype": "BYTES",
                        "shape": [2],
                        "parameters": {"binary_data_size": len(serialized(coffee, coffee))},
                    }
                ]
            },
            serialized(coffee, coffee),
        )
        assert (await client.post(INFER, content=body, headers=headers)).status_code == 200
        r = await client.post(INFER, json=tensor_request(coffee_tensor))
        assert r.status_code == 200
        r = await client.post(f"/v1/classify?model={MODEL}", content=b"not an image")
        assert r.status_code == 422  # recorded FAILED: one failed input

        after = await stats(client)
        inference = after["inference_stats"]
        assert after["inference_count"] == 3
        assert inference["success"]["count"] == 3 and inference["fail"]["count"] == 1
        for name in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert inference[name]["count"] == 3
        assert inference["compute_infer"]["ns"] > 0 and inference["success"]["ns"] > 0
        assert inference["cache_hit"] == zero
        runs = after["batch_stats"]
        assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in runs) == 3
        assert after["execution_count"] == sum(b["compute_infer"]["count"] for b in runs)
        assert 1 <= after["execution_count"] <= 3
        assert after["last_inference"] / 1000 == pytest.approx(time.time(), abs=60)

        # The same counters as /metrics.
        text = (await client.get("/metrics")).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        for b in runs:
            key = (("batch_size", str(b["batch_size"])), ("model", MODEL))
            assert samples[("ics_model_runs_total", key)] == b["compute_infer"]["count"]
        outcomes = {
            outcome: samples[
                ("ics_model_input_duration_seconds_count", (("model", MODEL), ("outcome", outcome)))
            ]
            for outcome in ("success", "fail")
        }
        assert outcomes == {"success": 3, "fail": 1}

        r = await client.get("/v2/models/resnet50/stats")
        assert r.status_code == 404 and "unknown model 'resnet50'" in protocol_error(r)

    in_process(runtime, ics_home, check, record_realtime=False)


def test_unknown_model_version_and_route(runtime: OnnxRuntime, ics_home: Path) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        for method, path in [
            ("GET", "/v2/models/resnet50"),
            ("GET", "/v2/models/resnet50/ready"),
            ("POST", "/v2/models/resnet50/infer"),
        ]:
            r = await client.request(method, path, json={})
            assert r.status_code == 404
            assert protocol_error(r) == (f"unknown model 'resnet50': this server serves '{MODEL}'")
        for path in (f"/v2/models/{MODEL}/versions/2", f"/v2/models/{MODEL}/versions/2/infer"):
            r = await client.request("POST" if path.endswith("infer") else "GET", path)
            assert r.status_code == 404
            assert "has no version '2'; its versions: ['1']" in protocol_error(r)
        r = await client.post("/v2/repository/list")
        assert r.status_code == 404
        assert "POST /v2/repository/list is not part of" in protocol_error(r)
        r = await client.get(INFER)
        assert (r.status_code, r.headers["allow"]) == (405, "POST")
        assert protocol_error(r) == f"GET is not allowed on {INFER}: use POST"

    in_process(runtime, ics_home, check)


def test_errors_from_outside_the_routes_speak_the_protocol(
    runtime: OnnxRuntime, ics_home: Path
) -> None:
    # The router's own refusals (a method no /v2 route takes) are shaped for the path too,
    # and the ICS API keeps FastAPI's.
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.patch(INFER, json={})
        assert r.status_code == 405 and "allow" in r.headers
        assert protocol_error(r) == "Method Not Allowed"
        r = await client.patch("/v1/executions")
        assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}

    in_process(runtime, ics_home, check)


def test_errors_speak_the_protocol_behind_a_root_path(runtime: OnnxRuntime, ics_home: Path) -> None:
    # Mounted under a prefix by a proxy, /v2 is still the protocol's, whoever answers.
    app = create_app(Settings(home=ics_home, api_token="t"), runtime=runtime)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, root_path="/ics")
            async with httpx.AsyncClient(transport=transport, base_url="http://ics.test") as c:
                refused = await c.get(f"/ics/v2/models/{MODEL}")
                assert refused.status_code == 401
                assert protocol_error(refused) == (
                    "this server needs an API token: send `Authorization: Bearer TOKEN`"
                )
                v1 = await c.get("/ics/v1/executions")
                assert v1.status_code == 401 and v1.json()["error"]["type"] == "Unauthorized"

    asyncio.run(main())


def test_refusals_of_the_wrappers_speak_the_protocol(runtime: OnnxRuntime, ics_home: Path) -> None:
    # tritonclient reads "error" as a string: the token and body-limit refusals on /v2 too.
    async def check(client: httpx.AsyncClient) -> None:
        refused = await client.get("/v2/models/efficientnet-lite0")
        assert refused.status_code == 401
        assert isinstance(refused.json()["error"], str)
        big = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            content=b"{" + b" " * 2000,
            headers={"Authorization": "Bearer t"},
        )
        assert big.status_code == 413
        assert big.json() == {"error": "the request body is over max_body_bytes=1,000"}
        v1 = await client.get("/v1/executions")
        assert v1.status_code == 401 and isinstance(v1.json()["error"], dict)

    in_process(runtime, ics_home, check, api_token="t", max_body_bytes=1000)


def test_tensor_input_json(runtime: OnnxRuntime, ics_home: Path, coffee_tensor: np.ndarray) -> None:
    expected = runtime.predict(coffee_tensor)
    store = Store(f"sqlite:///{ics_home / 'ics.db'}")

    async def check(client: httpx.AsyncClient) -> None:
        r = await client.post(INFER, json={"id": "r1", **tensor_request(coffee_tensor)})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        doc = r.json()
        assert (doc["model_name"], doc["model_version"], doc["id"]) == (MODEL, "1", "r1")
        (out,) = doc["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "FP32", [1, 1000])
        probs = np.asarray(out["data"], dtype=np.float32).reshape(1, 1000)
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert int(probs.argmax()) == ESPRESSO

        r = await client.post(INFER, json=tensor_request(coffee_tensor, classification=2))
        (out,) = r.json()["outputs"]
        assert (out["datatype"], out["shape"]) == ("BYTES", [1, 2])
        top = out["data"][0].split(":")
        assert top[1:] == [str(ESPRESSO), "espresso"]
        assert float(top[0]) == pytest.approx(float(expected[0, ESPRESSO]), abs=1e-6)

    try:
        in_process(runtime, ics_home, check, store=store)
        # A tensor has no image: nothing is recorded.
        assert not [e for e in store.list_executions() if e.name]
    finally:
        store.close()


def test_tensor_input_binary(
    runtime: OnnxRuntime, ics_home: Path, coffee_tensor: np.ndarray
) -> None:
    batch = np.concatenate([coffee_tensor, coffee_tensor[:, :, ::-1]])
    expected = runtime.predict(batch)

    async def check(client: httpx.AsyncClient) -> None:
        raw = batch.astype("<f4").tobytes()
        header = {
            "inputs": [
                {
                    "name": "INPUT_TENSOR",
                    "datatype": "FP32",
                    "shape": [2, 3, 224, 224],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
        body, headers = binary_body(header, raw)
        r = await client.post(f"/v2/models/{MODEL}/versions/1/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        doc, blobs = binary_outputs(r)
        assert doc["outputs"][0]["shape"] == [2, 1000]
        probs = np.frombuffer(blobs["probabilities"], dtype="<f4").reshape(2, 1000)
        np.testing.assert_allclose(probs, expected, atol=1e-6)

    in_process(runtime, ics_home, check)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1, 3, 100, 100], f"input INPUT_TENSOR: shape [1, 3, 100, 100] does not match the "
         f"model's input {SHAPE}"),
        ([3, 224, 224], f"input INPUT_TENSOR: shape [3, 224, 224] does not match the model's "
         f"input {SHAPE}"),
        ([1, 224, 224, 3], f"does not match the model's input {SHAPE}"),
        ([2, 3, 224, 224], "input INPUT_TENSOR: shape [2, 3, 224, 224] needs 301056 numbers, "
         "not 150528"),
    ],
)  # fmt: skip
def test_tensor_input_bad_shape(
    runtime: OnnxRuntime,
    ics_home: Path,
    coffee_tensor: np.ndarray,
    shape: list[int],
    message: str,
) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        request = tensor_request(coffee_tensor)
        request["inputs"][0]["shape"] = shape
        r = await client.post(INFER, json=request)
        assert r.status_code == 400
        assert message in protocol_error(r)

    in_process(runtime, ics_home, check)


def test_images_binary_recorded(runtime: OnnxRuntime, ics_home: Path, coffee: bytes) -> None:
    store = Store(f"sqlite:///{ics_home / 'ics.db'}")
    cat = jpeg("chelsea")

    async def check(client: httpx.AsyncClient) -> None:
        raw = serialized(coffee, cat)
        header = {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "BYTES",
                    "shape": [2, 1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "probabilities", "parameters": {"classification": 3}},
            ],
        }
        body, headers = binary_body(header, raw)
        r = await client.post(INFER, content=body, headers=headers)
        assert r.status_code == 200, r.text
        doc, blobs = binary_outputs(r)
        probs = np.frombuffer(blobs["probabilities"], dtype="<f4").reshape(2, 1000)
        assert int(probs[0].argmax()) == ESPRESSO
        # The JSON output of the same request: classification strings, top 3 of each image.
        classes = doc["outputs"][1]
        assert (classes["datatype"], classes["shape"]) == ("BYTES", [2, 3])
        assert classes["data"][0].endswith(f":{ESPRESSO}:espresso")
        assert "cat" in classes["data"][3]

    try:
        in_process(runtime, ics_home, check, store=store)
        results = sorted(realtime_results(store), key=lambda r: r.uri)
        assert [(r.uri, r.label) for r in results] == [
            ("request[0]", "espresso"),
            ("request[1]", results[1].label),
        ]
        assert results[0].image is not None and results[0].image.format == "JPEG"
        assert results[0].model.name == MODEL
    finally:
        store.close()


def test_bad_image_names_its_index(runtime: OnnxRuntime, ics_home: Path, coffee: bytes) -> None:
    store = Store(f"sqlite:///{ics_home / 'ics.db'}")

    async def check(client: httpx.AsyncClient) -> None:
        raw = serialized(coffee, b"this is not an image", coffee)
        header = {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
        body, headers = binary_body(header, raw)
        r = await client.post(INFER, content=body, headers=headers)
        assert r.status_code == 400
        assert protocol_error(r).startswith("input INPUT[1]: InvalidImage: ")

    try:
        in_process(runtime, ics_home, check, store=store)
        failed = [r for r in realtime_results(store) if r.status == ItemStatus.FAILED]
        assert [(r.uri, r.error and r.error.type) for r in failed] == [
            ("request[1]", "InvalidImage")
        ]
    finally:
        store.close()


def _images(shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": shape, **extra}]}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "the inference request is not valid JSON"),
        (b"[]", {}, "the inference request must be a JSON object"),
        (b"{}", {HEADER_LENGTH: "99"}, f"{HEADER_LENGTH} must be a length within the body"),
        (b"{}", {}, 'the request needs "inputs": one input, either INPUT (BYTES'),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}).encode(),
         {}, "unknown input 'x': this model's inputs are INPUT and INPUT_TENSOR"),
        (json.dumps(_images([1], datatype="FP32", data=[1.0])).encode(), {},
         "input INPUT: datatype must be BYTES, not 'FP32'"),
        (json.dumps(_images([2], data=["a"])).encode(), {},
         "input INPUT: shape [2] says 2 images but 1 came"),
        (json.dumps(_images([1, 2], data=["a", "b"])).encode(), {},
         "input INPUT: shape must be [N] or [N, 1] (one image each), not [1, 2]"),
        (json.dumps(_images([1], data=[1])).encode(), {},
         "input INPUT: JSON data of BYTES must be strings"),
        (json.dumps({**_images([1], data=["a"]), "outputs": [{"name": "logits"}]}).encode(), {},
         "unknown output 'logits': this model's output is probabilities"),
        (json.dumps({**_images([1], data=["a"]),
                     "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}]}
                    ).encode(), {}, "classification must be a whole number of classes"),
        (*binary_body(_images([1], parameters={"binary_data_size": 10}), b"12345"),
         "binary_data_size is 10 but 5 bytes of binary data follow the JSON header"),
        (*binary_body(_images([1], parameters={"binary_data_size": 6}), b"\x09\0\0\0ab"),
         "input INPUT: element 0 says 9 bytes but fewer remain"),
        (*binary_body(_images([1], data=["a"]), b"xx"),
         "2 bytes of binary data but no input has a binary_data_size"),
        (b"{}", {"Content-Encoding": "br"}, "unsupported Content-Encoding 'br'"),
        (b"not gzip", {"Content-Encoding": "gzip"}, "the gzip body cannot be inflated"),
    ],
)  # fmt: skip
def test_malformed_requests(
    runtime: OnnxRuntime, ics_home: Path, body: bytes, headers: dict[str, str], message: str
) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.post(INFER, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert message in protocol_error(r)

    in_process(runtime, ics_home, check)


def test_compressed_request(
    runtime: OnnxRuntime, ics_home: Path, coffee_tensor: np.ndarray
) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        body = gzip.compress(json.dumps(tensor_request(coffee_tensor)).encode())
        r = await client.post(INFER, content=body, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        assert int(np.argmax(r.json()["outputs"][0]["data"])) == ESPRESSO
        # What it inflates to counts against max_body_bytes, however small it was sent.
        bomb = gzip.compress(b" " * 6_000_000)
        r = await client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413
        assert protocol_error(r) == "the inflated request body is over max_body_bytes=5,000,000"

    in_process(runtime, ics_home, check, max_body_bytes=5_000_000)


def test_timeout_is_a_protocol_error(runtime: OnnxRuntime, ics_home: Path, coffee: bytes) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        body, headers = binary_body(
            _images([1], parameters={"binary_data_size": len(coffee) + 4}), serialized(coffee)
        )
        r = await client.post(INFER, content=body, headers=headers)
        assert r.status_code == 504
        assert protocol_error(r) == "no answer within request_timeout_s=1e-06"

    in_process(runtime, ics_home, check, request_timeout_s=1e-6)


# --- end to end: the real tritonclient against a real `ics serve` -------------------------


@pytest.fixture(scope="module")
def served_home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    home = tmp_path_factory.mktemp("v2-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def triton(served_home: Path) -> Iterator[Any]:
    """A tritonclient.http client, with its defaults, of a real `ics serve`."""
    import tritonclient.http as httpclient

    env = {k: v for k, v in os.environ.items() if not k.startswith("ICS_") or "_TEST_" in k}
    with serve_process(env={**env, "ICS_HOME": str(served_home)}) as served:
        client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
        try:
            yield client
        finally:
            client.close()


def _images_input(*images: bytes) -> Any:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("INPUT", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return inp


@pytest.mark.slow
def test_triton_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("resnet50")
    assert triton.get_server_metadata()["extensions"] == EXTENSIONS
    meta = triton.get_model_metadata(MODEL)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("INPUT", "BYTES", [-1]),
        ("INPUT_TENSOR", "FP32", [-1, 3, 224, 224]),
    ]


@pytest.mark.slow
def test_triton_images_binary_by_default(
    triton: Any, coffee: bytes, runtime: OnnxRuntime, coffee_tensor: np.ndarray, served_home: Path
) -> None:
    import tritonclient.http as httpclient

    result = triton.infer(
        MODEL,
        [_images_input(coffee)],
        outputs=[httpclient.InferRequestedOutput("probabilities")],
    )
    probs = result.as_numpy("probabilities")
    assert probs.shape == (1, 1000) and probs.dtype == np.float32
    assert int(probs.argmax()) == ESPRESSO
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(probs, runtime.predict(coffee_tensor), atol=1e-6)

    result = triton.infer(
        MODEL,
        [_images_input(coffee)],
        outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (1, 3)
    score, index, label = top[0, 0].decode().split(":")
    assert (int(index), label) == (ESPRESSO, "espresso")
    assert float(score) == pytest.approx(float(probs[0, ESPRESSO]), abs=1e-6)
    scores = [float(s.decode().split(":")[0]) for s in top[0]]
    assert scores == sorted(scores, reverse=True)

    # No outputs named: all of them, in binary (tritonclient sets binary_data_output);
    # and a gzip-compressed request.
    result = triton.infer(MODEL, [_images_input(coffee)], request_compression_algorithm="gzip")
    assert int(result.as_numpy("probabilities").argmax()) == ESPRESSO

    # Encoded images are recorded as real-time results, like /v1/classify's.
    store = Store(f"sqlite:///{served_home / 'ics.db'}")
    try:
        results = realtime_results(store)
    finally:
        store.close()
    classified = [r for r in results if r.status != ItemStatus.FAILED]
    assert len(classified) >= 3 and {r.label for r in classified} == {"espresso"}


@pytest.mark.slow
def test_triton_tensor_json(triton: Any, runtime: OnnxRuntime, coffee_tensor: np.ndarray) -> None:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("INPUT_TENSOR", list(coffee_tensor.shape), "FP32")
    inp.set_data_from_numpy(coffee_tensor, binary_data=False)
    result = triton.infer(
        MODEL,
        [inp],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)],
    )
    assert "data" in result.get_output("probabilities")
    probs = result.as_numpy("probabilities")
    assert int(probs.argmax()) == ESPRESSO
    np.testing.assert_allclose(probs, runtime.predict(coffee_tensor), atol=1e-6)


@pytest.mark.slow
def test_triton_errors_are_readable(triton: Any, coffee: bytes, coffee_tensor: np.ndarray) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        triton.infer("resnet50", [_images_input(coffee)])
    assert caught.value.status() == "404"
    assert str(caught.value) == f"[404] unknown model 'resnet50': this server serves '{MODEL}'"

    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("resnet50")
    assert "unknown model 'resnet50'" in str(caught.value)

    with pytest.raises(InferenceServerException) as caught:
        triton.infer(MODEL, [_images_input(coffee, b"not an image")])
    assert caught.value.status() == "400"
    assert str(caught.value).startswith("[400] input INPUT[1]: InvalidImage: ")

    small = coffee_tensor[:, :, :100, :100].copy()
    inp = httpclient.InferInput("INPUT_TENSOR", list(small.shape), "FP32")
    inp.set_data_from_numpy(small)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(MODEL, [inp])
    assert f"does not match the model's input {SHAPE}" in str(caught.value)


def _stat_counts(triton: Any) -> dict[str, int]:
    (stats,) = triton.get_inference_statistics(MODEL)["model_stats"]
    inference = stats["inference_stats"]
    return {
        "inference_count": stats["inference_count"],
        "success": inference["success"]["count"],
        "fail": inference["fail"]["count"],
        "in_runs": sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"]),
    }


@pytest.mark.slow
def test_triton_config_statistics_and_async_infer(
    triton: Any, coffee: bytes, coffee_tensor: np.ndarray
) -> None:
    import tritonclient.http as httpclient

    config = triton.get_model_config(MODEL)
    assert (config["name"], config["backend"]) == (MODEL, "onnxruntime")
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] > 0
    assert config["parameters"]["ics.input_size"] == {"string_value": "224"}

    before = _stat_counts(triton)
    tensor = httpclient.InferInput("INPUT_TENSOR", list(coffee_tensor.shape), "FP32")
    tensor.set_data_from_numpy(coffee_tensor)
    calls = [triton.async_infer(MODEL, inputs) for inputs in ([_images_input(coffee)], [tensor])]
    for call in calls:
        assert int(call.get_result().as_numpy("probabilities").argmax()) == ESPRESSO
    after = _stat_counts(triton)
    assert {k: after[k] - before[k] for k in after} == {
        "inference_count": 2,
        "success": 2,
        "fail": 0,
        "in_runs": 2,
    }
    stats = triton.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in stats] == [MODEL]


@pytest.mark.slow
def test_triton_repository_loads_lists_and_unloads(triton: Any, int8_runtime: OnnxRuntime) -> None:
    from tritonclient.utils import InferenceServerException

    int8 = int8_runtime.card.name
    assert triton.get_model_repository_index() == [
        {"name": MODEL, "version": "1", "state": "READY"}
    ]
    triton.load_model(int8)
    assert [m["name"] for m in triton.get_model_repository_index()] == [MODEL, int8]
    assert triton.get_model_config(int8)["name"] == int8
    triton.unload_model(int8)
    assert [m["name"] for m in triton.get_model_repository_index()] == [MODEL]
    with pytest.raises(InferenceServerException) as caught:
        triton.unload_model(MODEL)
    assert "is the default model" in caught.value.message()
