"""The Open Inference Protocol over gRPC: the real tritonclient.grpc (sync and asyncio)
against a real `ics serve`, behind an API token and a small message limit."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cli import ICS_BIN
from ics_service.config import Settings
from ics_service.imaging import Limits, Preprocessor
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from serving import Served, free_port, serve_process

MODEL = "efficientnet-lite0"
ESPRESSO = 967
TOKEN = "grpc-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_BODY = 2_000_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coffee() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_photo("coffee")).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee_tensor(runtime: OnnxRuntime, coffee: bytes) -> np.ndarray:
    tensor, _ = Preprocessor(runtime.card, Limits())(coffee)
    return tensor[None]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Served]:
    """A real `ics serve` with a token and MAX_BODY, and its gRPC endpoint."""
    home = tmp_path_factory.mktemp("grpc-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICS_") or "_TEST_" in k}
    env.update(ICS_HOME=str(home), ICS_API_TOKEN=TOKEN, ICS_MAX_BODY_BYTES=str(MAX_BODY))
    env["ICS_LOG_LEVEL"] = "INFO"
    with serve_process("--grpc-port", str(free_port()), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_url(served: Served) -> str:
    (port,) = re.findall(r"gRPC at 127\.0\.0\.1:(\d+)", served.output())
    return f"127.0.0.1:{port}"


def test_grpc_port_defaults_to_the_http_port_plus_one() -> None:
    assert Settings(port=8000).served_grpc_port == 8001
    assert Settings(port=8000, grpc_port=9000).served_grpc_port == 9000
    assert Settings(port=8000, grpc_port=0).served_grpc_port == 0
    assert Settings(port=0).served_grpc_port == 0  # no "+ 1" of a port chosen at start-up


@pytest.fixture(scope="module")
def triton(grpc_url: str) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=grpc_url)
    try:
        yield client
    finally:
        client.close()


def _images(*images: bytes) -> Any:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("INPUT", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return inp


def _error(call: Any) -> Any:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_start_up_line_names_both_ports(served: Served, grpc_url: str) -> None:
    assert f"at {served.url}, gRPC at {grpc_url}" in served.output()


def test_health_and_metadata(triton: Any) -> None:
    # The health RPCs are open, as /v2/health is; the others need the token.
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL, headers=AUTH)
    assert not triton.is_model_ready("resnet50", headers=AUTH)
    meta = triton.get_model_metadata(MODEL, headers=AUTH, as_json=True)
    assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("INPUT", "BYTES", ["-1"]),
        ("INPUT_TENSOR", "FP32", ["-1", "3", "224", "224"]),
    ]
    assert triton.get_server_metadata(headers=AUTH).extensions == [
        "classification",
        "binary_tensor_data",
        "model_repository",
        "model_configuration",
        "statistics",
    ]
    e = _error(lambda: triton.get_model_metadata("resnet50", headers=AUTH))
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message() == f"unknown model 'resnet50': this server serves '{MODEL}'"
    e = _error(lambda: triton.get_system_shared_memory_status(headers=AUTH))
    assert e.status() == "StatusCode.UNIMPLEMENTED"
    assert "does not serve SystemSharedMemoryStatus: it serves ServerLive" in e.message()


def test_infer_images_and_tensors(
    triton: Any, coffee: bytes, coffee_tensor: np.ndarray, runtime: OnnxRuntime
) -> None:
    import tritonclient.grpc as grpcclient

    # BYTES: encoded images, sent (as tritonclient.grpc does) in raw_input_contents.
    result = triton.infer(MODEL, [_images(coffee, coffee)], headers=AUTH, request_id="r1")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 1000) and probs.dtype == np.float32
    assert result.get_response().id == "r1"
    expected = runtime.predict(coffee_tensor)
    np.testing.assert_allclose(probs, np.concatenate([expected, expected]), atol=1e-6)

    top = triton.infer(
        MODEL,
        [_images(coffee)],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)],
        headers=AUTH,
    ).as_numpy("probabilities")
    assert top.shape == (1, 3)
    score, index, label = top[0, 0].decode().split(":")
    assert (int(index), label) == (ESPRESSO, "espresso")
    assert float(score) == pytest.approx(float(expected[0, ESPRESSO]), abs=1e-6)

    # FP32: the preprocessed tensor.
    inp = grpcclient.InferInput("INPUT_TENSOR", list(coffee_tensor.shape), "FP32")
    inp.set_data_from_numpy(coffee_tensor)
    probs = triton.infer(MODEL, [inp], headers=AUTH).as_numpy("probabilities")
    np.testing.assert_allclose(probs, expected, atol=1e-6)

    # A bad image is the client's error, named by its index.
    e = _error(lambda: triton.infer(MODEL, [_images(coffee, b"not an image")], headers=AUTH))
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.message().startswith("input INPUT[1]: InvalidImage: ")


def test_typed_contents(grpc_url: str, coffee: bytes, coffee_tensor: np.ndarray) -> None:
    """Tensors in `contents` (bytes_contents, fp32_contents) instead of raw_input_contents,
    through a plain channel and ICS's own message classes (they live beside tritonclient's)."""
    import grpc

    from ics_service.server.v2_grpc import message

    request_type = message("ModelInferRequest")
    response_type = message("ModelInferResponse")
    with grpc.insecure_channel(grpc_url) as channel:
        infer: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        images = request_type(model_name=MODEL)
        images.inputs.add(name="INPUT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            coffee
        )
        tensor = request_type(model_name=MODEL)
        tensor.inputs.add(
            name="INPUT_TENSOR", datatype="FP32", shape=list(coffee_tensor.shape)
        ).contents.fp32_contents.extend(coffee_tensor.reshape(-1).tolist())
        answers = []
        for request in (images, tensor):
            response = infer(request, metadata=tuple(AUTH.items()), timeout=60)
            (out,) = response.outputs
            assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [1, 1000])
            answers.append(np.frombuffer(response.raw_output_contents[0], dtype="<f4"))
        np.testing.assert_allclose(answers[0], answers[1], atol=1e-6)
        assert int(answers[0].argmax()) == ESPRESSO


def test_async_client(grpc_url: str, coffee: bytes) -> None:
    import tritonclient.grpc.aio as aioclient

    async def main() -> list[int]:
        client = aioclient.InferenceServerClient(url=grpc_url)
        try:
            assert await client.is_model_ready(MODEL, headers=AUTH)
            inp = aioclient.InferInput("INPUT", [1], "BYTES")
            inp.set_data_from_numpy(np.array([coffee], dtype=np.object_))
            results = await asyncio.gather(
                *(client.infer(MODEL, [inp], headers=AUTH) for _ in range(4))
            )
            return [int(r.as_numpy("probabilities").argmax()) for r in results]
        finally:
            await client.close()

    assert asyncio.run(main()) == [ESPRESSO] * 4


def test_token_and_limits(triton: Any, coffee: bytes) -> None:
    e = _error(lambda: triton.infer(MODEL, [_images(coffee)]))
    assert e.status() == "StatusCode.UNAUTHENTICATED"
    assert "send the metadata `authorization: Bearer TOKEN`" in e.message()
    wrong = {"authorization": "Bearer not-the-token"}
    e = _error(lambda: triton.is_model_ready(MODEL, headers=wrong))
    assert (e.status(), e.message()) == ("StatusCode.UNAUTHENTICATED", "the API token is wrong")

    big = _images(b"\xff" * (MAX_BODY + 1))
    e = _error(lambda: triton.infer(MODEL, [big], headers=AUTH))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert str(MAX_BODY) in e.message()
    # Without the token it is refused for that, unread.
    e = _error(lambda: triton.infer(MODEL, [big]))
    assert e.status() == "StatusCode.UNAUTHENTICATED"
    # The server goes on.
    assert triton.infer(MODEL, [_images(coffee)], headers=AUTH).as_numpy("probabilities").any()


def test_grpc_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICS_") or "_TEST_" in k}
        env["ICS_HOME"] = str(tmp_path)
        proc = subprocess.run(
            [str(ICS_BIN), "serve", "--port", str(free_port()), "--grpc-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 4, proc.stderr
    assert f"cannot serve gRPC on 127.0.0.1:{port}" in proc.stderr
    assert "choose another --grpc-port (0 turns gRPC off)" in proc.stderr


def _stat_counts(triton: Any) -> dict[str, int]:
    (stats,) = triton.get_inference_statistics(MODEL, headers=AUTH).model_stats
    inference = stats.inference_stats
    return {
        "inference_count": stats.inference_count,
        "success": inference.success.count,
        "fail": inference.fail.count,
        "queue": inference.queue.count,
        "in_runs": sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats),
    }


def test_config_and_statistics_are_the_http_routes(
    triton: Any, served: Served, coffee: bytes, coffee_tensor: np.ndarray
) -> None:
    import queue

    import httpx
    import tritonclient.grpc as grpcclient
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    config = triton.get_model_config(MODEL, headers=AUTH).config
    assert (config.name, config.platform, config.backend) == (
        MODEL,
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size > 0 and config.dynamic_batching.max_queue_delay_microseconds
    assert config.parameters["ics.preprocessing"].string_value == "the model card's"
    http = {"authorization": f"Bearer {TOKEN}"}
    doc = httpx.get(f"{served.url}/v2/models/{MODEL}/config", headers=http).json()
    assert json_format.ParseDict({"config": doc}, service_pb2.ModelConfigResponse()).config == (
        config
    )

    # Each async call's input is counted once, when it is answered.
    before = _stat_counts(triton)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    tensor = grpcclient.InferInput("INPUT_TENSOR", list(coffee_tensor.shape), "FP32")
    tensor.set_data_from_numpy(coffee_tensor)
    for inputs in ([_images(coffee)], [tensor]):
        triton.async_infer(
            MODEL, inputs, callback=lambda result, error: answers.put((result, error)), headers=AUTH
        )
    for _ in range(2):
        result, error = answers.get(timeout=30)
        assert error is None and int(result.as_numpy("probabilities").argmax()) == ESPRESSO
    after = _stat_counts(triton)
    assert {k: after[k] - before[k] for k in after} == {
        "inference_count": 2,
        "success": 2,
        "fail": 0,
        "queue": 2,
        "in_runs": 2,
    }
    e = _error(lambda: triton.infer(MODEL, [_images(b"not an image")], headers=AUTH))
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    failed = _stat_counts(triton)
    assert {k: failed[k] - after[k] for k in after} == {
        "inference_count": 0,
        "success": 0,
        "fail": 1,
        "queue": 0,
        "in_runs": 0,
    }
    stats = triton.get_inference_statistics(MODEL, headers=AUTH)
    doc = httpx.get(f"{served.url}/v2/models/{MODEL}/stats", headers=http).json()
    assert json_format.ParseDict(doc, service_pb2.ModelStatisticsResponse()) == stats
    assert triton.get_inference_statistics(headers=AUTH) == stats  # every served model
    e = _error(lambda: triton.get_model_config("resnet50", headers=AUTH))
    assert e.status() == "StatusCode.NOT_FOUND"


def test_repository_loads_lists_and_unloads(triton: Any, int8_runtime: OnnxRuntime) -> None:
    int8 = int8_runtime.card.name

    def index() -> list[tuple[str, str, str]]:
        models = triton.get_model_repository_index(headers=AUTH).models
        return [(m.name, m.version, m.state) for m in models]

    assert index() == [(MODEL, "1", "READY")]
    triton.load_model(int8, headers=AUTH)
    assert [name for name, _, _ in index()] == [MODEL, int8]
    assert triton.get_model_config(int8, headers=AUTH).config.name == int8
    stats = triton.get_inference_statistics(headers=AUTH).model_stats
    assert [s.name for s in stats] == [MODEL, int8] and stats[1].inference_count == 0
    triton.unload_model(int8, headers=AUTH)
    assert index() == [(MODEL, "1", "READY")]
    assert not triton.is_model_ready(int8, headers=AUTH)

    e = _error(lambda: triton.unload_model(MODEL, headers=AUTH))
    assert e.status() == "StatusCode.FAILED_PRECONDITION"
    assert "is the default model" in e.message()
    e = _error(lambda: triton.load_model("resnet50", headers=AUTH))
    assert e.status() == "StatusCode.NOT_FOUND"
    assert "resnet50" in e.message()
