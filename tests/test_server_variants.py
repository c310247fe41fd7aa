"""SageMaker production variants (TargetVariant, the weighted split, the invoked variant's
header, /metrics), the SageMaker API's DescribeEndpoint and DescribeEndpointConfig, and the
real clients as separate processes: boto3, the SageMaker Python SDK v2 (in a venv of its
own), and the original design's ClassifyImage Lambda code."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from math import comb
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

from ics_service.config import ProductionVariant, Settings
from ics_service.errors import ConfigError
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.server.app import create_app
from ics_service.server.variants import INVOKED_VARIANT, TARGET_VARIANT
from serving import client_of, serve_process

FP32 = "efficientnet-lite0"
INT8 = "efficientnet-lite0-int8"
ESPRESSO = 967
TOKEN = "test-token-0123456789"
KEY_ID = "AKIAICSTESTKEY000001"
SECRET = "ics/test/secret/0123456789abcdefghijklmn"
ENDPOINT = "/endpoints/ics/invocations"
CLIENTS = Path(__file__).resolve().parent / "clients"
SDK_PINS = CLIENTS / "sagemaker-v2.txt"


def jpeg(name: str = "coffee", size: int | None = None) -> bytes:
    image = Image.fromarray(load_photo(name))
    if size is not None:
        image = image.resize((size, size))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return jpeg()


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def two_sided_bound(n: int, p: float, risk: float) -> int:
    """The least d with P(|X - n p| > d) < risk for X ~ Binomial(n, p): a count further
    from n p than d fails a test with probability under `risk` when the split is right."""
    mass = [comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    for d in range(n + 1):
        if sum(m for k, m in enumerate(mass) if abs(k - n * p) > d) < risk:
            return d
    return n


def settings_of(**values: Any) -> Settings:
    """Settings as ics.toml or the flags give them (variants as NAME=MODEL[:WEIGHT]...)."""
    return Settings.model_validate(values)


# --- settings ----------------------------------------------------------------------------


def test_variant_settings(tmp_path: Path) -> None:
    settings = settings_of(home=tmp_path, variants=["blue=efficientnet-lite0:3", "green=m"])
    assert settings.variants == [
        ProductionVariant(name="blue", model=FP32, weight=3.0),
        ProductionVariant(name="green", model="m", weight=1.0),
    ]
    table = settings_of(home=tmp_path, variants=[{"name": "a", "model": "m", "weight": 0.5}])
    assert table.variants[0].weight == 0.5
    for bad, says in [
        (["blue"], "spell it NAME=MODEL or NAME=MODEL:WEIGHT"),
        (["blue=m:heavy"], "its weight 'heavy' is not a number"),
        (["a=m", "a=n"], "variant 'a' is named twice"),
        (["a=m:0", "b=n:0"], "every variant weighs 0"),
        (["a=m:-1"], "greater than or equal to 0"),
        (["no_underscores=m"], "String should match pattern"),
    ]:
        with pytest.raises(ValueError, match=says):
            settings_of(home=tmp_path, variants=bad)
    config = tmp_path / "ics.toml"
    config.write_text('variants = ["blue=efficientnet-lite0:3", {name = "green", model = "x"}]\n')
    from ics_service.config import load_settings

    loaded = load_settings(config, {}, environ={})
    assert [(v.name, v.weight) for v in loaded.settings.variants] == [("blue", 3.0), ("green", 1)]
    with pytest.raises(ConfigError, match="ICS_VARIANTS"):
        load_settings(None, {}, environ={"ICS_VARIANTS": '["a=m", "a=m"]'})


# --- in process: the split, TargetVariant, DescribeEndpoint ------------------------------


def test_variants_split_by_weight_and_target_variant(ics_home: Path, runtime: OnnxRuntime) -> None:
    """400 invocations over two variants weighted 3:1 split within the binomial bound; the
    answer and /metrics name the variant; TargetVariant routes; an unknown one is a 400."""
    # Not recorded: the store's writes are not what this measures.
    settings = settings_of(
        home=ics_home,
        variants=["blue=efficientnet-lite0:3", "green=efficientnet-lite0:1"],
        record_realtime=False,
    )
    app = create_app(settings, runtime=runtime)
    small = jpeg(size=64)
    n = 400
    bound = two_sided_bound(n, 0.75, 1e-9)  # 54: [246, 354] of 400

    async def go() -> tuple[Counter[str], list[httpx.Response], str]:
        async with client_of(app) as client:
            seen: Counter[str] = Counter()
            for start in range(0, n, 16):
                answers = await asyncio.gather(
                    *(client.post(ENDPOINT, content=small) for _ in range(start, start + 16))
                )
                for answer in answers:
                    assert answer.status_code == 200, answer.text
                    seen[answer.headers[INVOKED_VARIANT]] += 1
            targeted = [
                await client.post(ENDPOINT, content=small, headers={TARGET_VARIANT: "green"}),
                await client.post(
                    ENDPOINT, content=b"not an image", headers={TARGET_VARIANT: "green"}
                ),
                await client.post(ENDPOINT, content=small, headers={TARGET_VARIANT: "red"}),
                await client.post(
                    "/endpoints/ics/invocations-response-stream",
                    content=small,
                    headers={TARGET_VARIANT: "blue"},
                ),
            ]
            return seen, targeted, (await client.get("/metrics")).text

    seen, targeted, metrics = asyncio.run(go())
    assert set(seen) == {"blue", "green"} and sum(seen.values()) == n
    assert abs(seen["blue"] - 0.75 * n) <= bound, seen
    ok, model_error, unknown, stream = targeted
    assert ok.status_code == 200 and ok.headers[INVOKED_VARIANT] == "green"
    assert len(ok.json()) == 1000
    # A variant answered, even with the model's error.
    assert model_error.status_code == 424 and model_error.headers[INVOKED_VARIANT] == "green"
    assert unknown.status_code == 400
    assert unknown.headers["x-amzn-ErrorType"] == "ValidationError"
    assert unknown.json()["Message"] == (
        "The variant red does not exist for endpoint ics: its variants are blue, green."
    )
    assert INVOKED_VARIANT not in unknown.headers
    assert stream.status_code == 200 and stream.headers[INVOKED_VARIANT] == "blue"
    name = "ics_sagemaker_variant_invocations_total"
    assert metric(metrics, name, variant="blue") == seen["blue"] + 1
    assert metric(metrics, name, variant="green") == seen["green"] + 2


def test_one_variant_by_default_and_a_variant_of_a_model_not_served(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    async def go(settings: Settings) -> httpx.Response:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            return await client.post(ENDPOINT, content=jpeg(size=64))

    answer = asyncio.run(go(Settings(home=ics_home)))
    assert answer.headers[INVOKED_VARIANT] == "AllTraffic"
    answer = asyncio.run(go(Settings(home=ics_home, capture_variant="prod")))
    assert answer.headers[INVOKED_VARIANT] == "prod"
    with pytest.raises(Exception, match="variant 'b' routes to model 'nope', which this server"):
        asyncio.run(go(settings_of(home=ics_home, variants=["b=nope"])))


def control(action: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "content": json.dumps(body),
        "headers": {
            "X-Amz-Target": f"SageMaker.{action}",
            "Content-Type": "application/x-amz-json-1.1",
        },
    }


def test_describe_endpoint_in_process(ics_home: Path, runtime: OnnxRuntime) -> None:
    settings = settings_of(
        home=ics_home,
        variants=["blue=efficientnet-lite0:3", "green=efficientnet-lite0:1"],
        capture=str(ics_home / "capture"),
        capture_sampling=25,
        capture_mode="output",
    )

    async def go() -> list[httpx.Response]:
        async with client_of(create_app(settings, runtime=runtime)) as client:
            return [
                await client.post("/", **control("DescribeEndpoint", {"EndpointName": "ep"})),
                await client.post(
                    "/", **control("DescribeEndpointConfig", {"EndpointConfigName": "ep"})
                ),
                await client.post("/", **control("DescribeEndpoint", {})),
                await client.post("/", **control("CreateEndpoint", {"EndpointName": "x"})),
            ]

    endpoint, config, nameless, create = asyncio.run(go())
    described = endpoint.json()
    assert endpoint.headers["content-type"] == "application/x-amz-json-1.1"
    assert described["EndpointName"] == "ep" and described["EndpointStatus"] == "InService"
    assert described["EndpointArn"] == "arn:aws:sagemaker:us-east-1:000000000000:endpoint/ep"
    assert [
        (v["VariantName"], v["CurrentWeight"], v["DesiredWeight"], v["CurrentInstanceCount"])
        for v in described["ProductionVariants"]
    ] == [("blue", 3.0, 3.0, 1), ("green", 1.0, 1.0, 1)]
    assert described["DataCaptureConfig"] == {
        "EnableCapture": True,
        "CaptureStatus": "Started",
        "CurrentSamplingPercentage": 25,
        "DestinationS3Uri": str(ics_home / "capture"),
    }
    configured = config.json()
    assert [
        (v["VariantName"], v["ModelName"], v["InitialVariantWeight"])
        for v in configured["ProductionVariants"]
    ] == [
        ("blue", FP32, 3.0),
        ("green", FP32, 1.0),
    ]
    assert configured["DataCaptureConfig"]["CaptureOptions"] == [{"CaptureMode": "Output"}]
    assert nameless.status_code == 400
    assert nameless.json()["__type"] == "ValidationException"
    assert create.status_code == 400
    assert create.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert (
        "SageMaker.DescribeEndpoint and SageMaker.DescribeEndpointConfig"
        in create.json()["message"]
    )


# --- end to end: the real clients, each a process, against `ics serve` ---------------------


@pytest.fixture(scope="module")
def served(
    models_dir: Path, int8_runtime: OnnxRuntime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One `ics serve` of two variants (FP32 3:1 INT8), a token and a SigV4 key."""
    home = tmp_path_factory.mktemp("variants-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICS_", "AWS_"))}
    env.update(
        ICS_HOME=str(home),
        ICS_API_TOKEN=TOKEN,
        ICS_SIGV4_ACCESS_KEY_ID=KEY_ID,
        ICS_SIGV4_SECRET_ACCESS_KEY=SECRET,
    )
    with serve_process(
        "--model", FP32, "--variant", f"blue={FP32}:3", "--variant", f"green={INT8}:1", env=env
    ) as server:
        yield server.url


def aws_env(url: str, secret: str = SECRET) -> dict[str, str]:
    """A client process's environment: AWS credentials and region, nothing of the machine's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICS_", "AWS_"))}
    env.update(
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="eu-west-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=url,
        AWS_MAX_ATTEMPTS="1",
        SAGEMAKER_SUPPRESS_V2_WARNING="1",
    )
    return env


def client(service: str, url: str, secret: str = SECRET) -> Any:
    return boto3.client(
        service,
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )


@pytest.mark.slow
def test_boto3_target_variant_and_describe_endpoint(served: str, coffee: bytes) -> None:
    runtime = client("sagemaker-runtime", served)
    answer = runtime.invoke_endpoint(
        EndpointName="ics", ContentType="image/jpeg", Body=coffee, TargetVariant="green"
    )
    assert answer["InvokedProductionVariant"] == "green"
    assert int(np.argmax(json.loads(answer["Body"].read()))) == ESPRESSO
    answer = runtime.invoke_endpoint(EndpointName="ics", ContentType="image/jpeg", Body=coffee)
    assert answer["InvokedProductionVariant"] in {"blue", "green"}
    with pytest.raises(runtime.exceptions.ValidationError) as unknown:
        runtime.invoke_endpoint(
            EndpointName="ics", ContentType="image/jpeg", Body=coffee, TargetVariant="red"
        )
    assert unknown.value.response["Error"]["Message"] == (
        "The variant red does not exist for endpoint ics: its variants are blue, green."
    )

    sagemaker = client("sagemaker", served)
    endpoint = sagemaker.describe_endpoint(EndpointName="ics")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointArn"] == "arn:aws:sagemaker:eu-west-1:000000000000:endpoint/ics"
    assert endpoint["CreationTime"].tzinfo is not None  # botocore parsed the timestamp
    assert [(v["VariantName"], v["CurrentWeight"]) for v in endpoint["ProductionVariants"]] == [
        ("blue", 3.0),
        ("green", 1.0),
    ]
    assert "DataCaptureConfig" not in endpoint  # capture is off
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert [(v["VariantName"], v["ModelName"]) for v in config["ProductionVariants"]] == [
        ("blue", FP32),
        ("green", INT8),
    ]
    with pytest.raises(ClientError) as other:
        sagemaker.list_endpoints()
    assert other.value.response["Error"]["Code"] == "UnknownOperationException"
    assert "SageMaker.ListEndpoints" in other.value.response["Error"]["Message"]
    # The same credentials as the invocations: a wrong secret, no token, are refused.
    with pytest.raises(ClientError) as forged:
        client("sagemaker", served, secret="not-the-secret").describe_endpoint(EndpointName="ics")
    assert forged.value.response["Error"]["Code"] == "Forbidden"
    plain = httpx.post(served + "/", **control("DescribeEndpoint", {"EndpointName": "ics"}))
    assert plain.status_code == 401
    bearer = httpx.post(
        served + "/",
        content=json.dumps({"EndpointName": "ics"}),
        headers={"X-Amz-Target": "SageMaker.DescribeEndpoint", "Authorization": f"Bearer {TOKEN}"},
    )
    assert bearer.json()["EndpointName"] == "ics"


@pytest.mark.slow
def test_the_classify_image_lambda_as_a_process(served: str, coffee: bytes) -> None:
    png = io.BytesIO()
    Image.open(io.BytesIO(coffee)).save(png, "PNG")
    event = {
        "body": {
            "image_data": base64.b64encode(png.getvalue()).decode(),
            "s3_bucket": "photos",
            "s3_key": "test/coffee.png",
        }
    }
    run = subprocess.run(
        [sys.executable, str(CLIENTS / "classify_image_lambda.py")],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        env=aws_env(served),
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["statusCode"] == 200
    inferences = answer["body"]["inferences"]
    assert len(inferences) == 1000 and int(np.argmax(inferences)) == ESPRESSO
    assert answer["body"]["s3_key"] == "test/coffee.png"


def sdk_venv() -> Path:
    """A venv with the SageMaker Python SDK v2 at the pins of tests/clients/sagemaker-v2.txt,
    kept under ~/.cache (XDG_CACHE_HOME) by the pins' hash and reused: built once (about a
    minute), not per run. sagemaker 2.x needs protobuf < 7 and the project's lock has 7, so
    it cannot share the project's environment."""
    digest = hashlib.sha256(SDK_PINS.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = cache / "ics-tests" / f"sagemaker-v2-{digest}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    if done.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    installed = subprocess.run(
        [*pip, "-r", str(SDK_PINS)], capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, (
        f"installing the SageMaker SDK v2 into {venv} failed (it needs the package index):\n"
        + installed.stderr[-3000:]
    )
    done.touch()
    return python


@pytest.mark.slow
def test_the_sagemaker_sdk_v2_predictor(served: str, coffee: bytes, tmp_path: Path) -> None:
    python = sdk_venv()
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(coffee)
    env = aws_env(served)
    run = subprocess.run(
        [str(python), str(CLIENTS / "sagemaker_v2_predict.py"), served, str(photo)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    # The SDK logs its own lines to stdout (its config defaults...): the answer is the last.
    answer = json.loads(run.stdout.splitlines()[-1] if run.stdout else "null")
    assert isinstance(answer, dict), run.stdout + run.stderr
    assert answer["version"].startswith("2.")
    for key in ("predict", "predict_green"):
        assert len(answer[key]) == 1000 and int(np.argmax(answer[key])) == ESPRESSO
    assert answer["status"] == "InService"
    assert answer["models"] == [FP32, INT8]
