"""Remote models in the workflow: `--model sagemaker:ENDPOINT` (boto3's sagemaker-runtime) and
`--model v2:URL` (the Open Inference Protocol), against real processes on loopback: ICS's own
`ics serve` (its SageMaker and /v2 routes), and the small servers of remote_peers.py, which
answer as a SageMaker endpoint throttling or failing does, and as an FP32-tensor v2 model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli import ics, ics_process
from ics_service.config import load_settings
from ics_service.engine.execution import settings_for
from ics_service.errors import ExitCode
from ics_service.modelcard import ModelCard
from ics_service.store import Store
from remote_peers import LABELS, calls, peer
from serving import Served, free_port, serve_process

#: ClassifyImage retried fast: 3 attempts in all, no jitter.
FAST_RETRY = json.dumps(
    {"ClassifyImage": {"interval_seconds": 0.05, "max_attempts": 2, "jitter": "NONE"}}
)
#: The far side's max_pixels: the 872 x 1000 hubble_deep_field photo is over it, the
#: photos3 ones (at most 512 x 512) are not.
SERVER_MAX_PIXELS = 300_000


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(r["uri"]).name: r for r in rows}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3's chain with test credentials and region, and nothing of the machine's."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAICSTEST000000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ics-test-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")


@pytest.fixture(scope="module")
def ics_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real `ics serve` of the default model: the far side of sagemaker: and v2:."""
    home = tmp_path_factory.mktemp("serve-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICS_", "AWS_"))}
    env["ICS_HOME"] = str(home)
    # Smaller than the clients' limit: the server refuses photos that they decode well.
    env["ICS_MAX_PIXELS"] = str(SERVER_MAX_PIXELS)
    with serve_process(env=env) as served:
        yield served


@pytest.fixture(scope="module")
def sagemaker_peer() -> Iterator[str]:
    with peer("sagemaker") as url:
        yield url


@pytest.fixture
def photos3(tmp_path: Path, photos: Path) -> Path:
    """Three real photos and a broken file."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg", "camera.jpg"):
        shutil.copy(photos / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


@pytest.fixture
def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "peer-labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


@pytest.fixture
def imagenet_labels(ics_home: Path, tmp_path: Path) -> Path:
    res = ics("models", "info", "efficientnet-lite0", "--labels")
    assert res.exit_code == 0, res.output
    path = tmp_path / "imagenet.txt"
    path.write_text(res.stdout)
    return path


def classify(*args: str) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    """`ics classify ARGS` in process: exit code, JSON summary, results, output."""
    out = Path.cwd() / f"out-{len(list(Path.cwd().glob('out-*')))}.jsonl"
    res = ics("classify", *args, "-o", str(out), "--json", "--no-progress")
    summary = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    rows = read_jsonl(out) if out.exists() else []
    return res.exit_code, summary, rows, res.output


# --- SageMaker ------------------------------------------------------------------------------


def test_sagemaker_model_against_ics_serve_gives_the_local_answers(
    ics_home: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    ics_server: Served,
    photos3: Path,
    imagenet_labels: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", ics_server.url)
    code, summary, rows, output = classify(
        str(photos3), "--model", "sagemaker:ics-endpoint", "--labels", str(imagenet_labels)
    )
    assert code == ExitCode.FAILED, output  # broken.jpg
    _, _, local, _ = classify(str(photos3))
    remote, here = by_name(rows), by_name(local)
    assert set(remote) == set(here) == {"coffee.jpg", "chelsea.jpg", "camera.jpg", "broken.jpg"}
    assert remote["coffee.jpg"]["label"] == "espresso"
    assert remote["coffee.jpg"]["status"] == "SUCCEEDED"
    for name in ("coffee.jpg", "chelsea.jpg", "camera.jpg"):
        r, h = remote[name], here[name]
        assert (r["status"], r["label_index"]) == (h["status"], h["label_index"])
        assert r["confidence"] == pytest.approx(h["confidence"], abs=1e-5)
        assert r["model"]["name"] == "sagemaker:ics-endpoint"
    # Decoded here first: the broken file fails as it does locally, and is never sent.
    assert remote["broken.jpg"]["error"]["type"] == here["broken.jpg"]["error"]["type"]
    assert summary["counts"]["FAILED"] == 1


def test_sagemaker_throttling_is_retried_by_ics_alone(
    ics_home: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    sagemaker_peer: str,
    photos3: Path,
    labels_file: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", sagemaker_peer)
    monkeypatch.setenv("ICS_RETRY", FAST_RETRY)
    (photos3 / "broken.jpg").unlink()
    for name in ("chelsea.jpg", "camera.jpg"):
        (photos3 / name).unlink()
    code, summary, rows, output = classify(
        str(photos3), "--model", "sagemaker:throttle-2-a/blue", "--labels", str(labels_file)
    )
    assert code == ExitCode.OK, output
    (row,) = rows
    assert (row["status"], row["label"], row["attempts"]) == ("SUCCEEDED", "cat", 3)
    sent = [c for c in calls(sagemaker_peer) if c["endpoint"] == "throttle-2-a"]
    # Two throttled, one answered: botocore's own retries are off, so none multiply.
    assert len(sent) == 3
    assert all(c["variant"] == "blue" and c["signed"] for c in sent)
    assert {c["content_type"] for c in sent} == {"image/jpeg"}
    assert {c["accept"] for c in sent} == {"application/json"}
    history = ics("executions", "history", summary["execution_id"], "--json")
    retried = [e for e in json.loads(history.stdout) if e["type"] == "TaskRetried"]
    assert [e["details"]["error"] for e in retried] == ["EndpointUnavailable"] * 2
    assert "is throttling: ThrottlingException: Rate exceeded" in retried[0]["details"]["cause"]
    # A resume runs with the same model and labels file, from whatever folder.
    shown = json.loads(ics("executions", "show", summary["execution_id"], "--json").stdout)
    assert shown["params"]["model"] == "sagemaker:throttle-2-a/blue"
    assert shown["params"]["labels"] == str(labels_file.resolve())
    settings = load_settings(None, {}).settings
    store = Store(settings.store_url)
    try:
        execution = store.get_execution(summary["execution_id"])
    finally:
        store.close()
    assert settings_for(execution, settings).labels == labels_file.resolve()


def test_an_endpoint_that_stays_down_ends_items_failed(
    ics_home: Path, aws: None, monkeypatch: pytest.MonkeyPatch, photos3: Path, labels_file: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("ICS_RETRY", FAST_RETRY)
    code, _, rows, output = classify(
        str(photos3), "--model", "sagemaker:gone", "--labels", str(labels_file)
    )
    assert code == ExitCode.FAILED, output
    rows_by = by_name(rows)
    for name in ("coffee.jpg", "chelsea.jpg", "camera.jpg"):
        error = rows_by[name]["error"]
        assert error["type"] == "EndpointUnavailable"
        assert "SageMaker endpoint gone cannot be reached" in error["message"]
        assert rows_by[name]["attempts"] == 3
    assert rows_by["broken.jpg"]["error"]["type"] == "InvalidImage"


def test_a_model_error_names_the_endpoint_and_is_not_retried(
    ics_home: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    sagemaker_peer: str,
    photos3: Path,
    labels_file: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", sagemaker_peer)
    before = len(calls(sagemaker_peer))
    code, _, rows, output = classify(
        str(photos3), "--model", "sagemaker:model-error", "--labels", str(labels_file)
    )
    assert code == ExitCode.FAILED, output
    failed = [r for r in rows if r["error"]["type"] == "ModelError"]
    assert len(failed) == 3
    message = failed[0]["error"]["message"]
    assert "SageMaker endpoint model-error" in message and "the model crashed" in message
    assert all(r["attempts"] == 1 for r in failed)
    # The broken image never left: three calls for three photos.
    assert len(calls(sagemaker_peer)) - before == 3


def test_target_model_answer_formats_and_labels_from_the_answer(
    ics_home: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    sagemaker_peer: str,
    photos3: Path,
    labels_file: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", sagemaker_peer)  # the general variable works too
    (photos3 / "broken.jpg").unlink()
    model = "sagemaker:predictions?target_model=model-b.tar.gz"
    code, _, rows, output = classify(str(photos3), "--model", model, "--labels", str(labels_file))
    assert code == ExitCode.OK, output
    assert {r["label"] for r in rows} == {"bird"}
    assert [r["confidence"] for r in rows] == pytest.approx([0.8] * 3)
    sent = [c for c in calls(sagemaker_peer) if c["endpoint"] == "predictions"]
    assert {c["target_model"] for c in sent} == {"model-b.tar.gz"}
    # An answer that names its classes needs no labels file.
    code, _, rows, output = classify(str(photos3), "--model", "sagemaker:labelled")
    assert code == ExitCode.OK, output
    assert {r["label"] for r in rows} == {"cat"}
    # One that does not, does.
    res = ics("classify", str(photos3), "--model", "sagemaker:plain", "--no-progress")
    assert res.exit_code == ExitCode.USAGE
    assert "--labels FILE" in res.output and "sagemaker:plain" in res.output


def test_remote_calls_run_concurrently_within_remote_concurrency(
    ics_home: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    sagemaker_peer: str,
    photos: Path,
    labels_file: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", sagemaker_peer)
    monkeypatch.setenv("ICS_REMOTE_CONCURRENCY", "3")
    code, _, rows, output = classify(
        str(photos), "--model", "sagemaker:slow-a", "--labels", str(labels_file)
    )
    assert code == ExitCode.OK, output
    assert len(rows) == len(list(photos.glob("*.jpg")))
    sent = [c for c in calls(sagemaker_peer) if c["endpoint"] == "slow-a"]
    assert max(c["in_flight"] for c in sent) == 3


# --- v2 (Open Inference Protocol) -----------------------------------------------------------


def test_v2_model_on_ics_serve_sends_encoded_images_and_learns_the_labels(
    ics_home: Path, ics_server: Served, photos3: Path
) -> None:
    url = f"v2:{ics_server.url}/v2/models/efficientnet-lite0"
    code, _, rows, output = classify(str(photos3), "--model", url, "--batch-size", "4")
    assert code == ExitCode.FAILED, output  # broken.jpg
    _, _, local, _ = classify(str(photos3))
    remote, here = by_name(rows), by_name(local)
    for name in ("coffee.jpg", "chelsea.jpg", "camera.jpg"):
        r, h = remote[name], here[name]
        assert (r["status"], r["label"]) == (h["status"], h["label"])
        assert r["confidence"] == pytest.approx(h["confidence"], abs=1e-5)
    assert remote["coffee.jpg"]["label"] == "espresso"  # named by the server (no --labels)
    assert remote["broken.jpg"]["error"]["type"] == "InvalidImage"


def test_a_batch_the_server_refuses_is_sent_again_image_by_image(
    ics_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    ics_server: Served,
    photos3: Path,
    photos: Path,
) -> None:
    (photos3 / "broken.jpg").unlink()
    shutil.copy(photos / "hubble_deep_field.jpg", photos3)
    # One request at a time: the photos decoded meanwhile go together in the next batch.
    monkeypatch.setenv("ICS_REMOTE_CONCURRENCY", "1")
    url = f"v2:{ics_server.url}/v2/models/efficientnet-lite0"
    code, _, rows, output = classify(str(photos3), "--model", url, "--batch-size", "4")
    assert code == ExitCode.FAILED, output
    remote = by_name(rows)
    error = remote.pop("hubble_deep_field.jpg")["error"]
    assert error["type"] == "ModelError"
    assert "ImageTooLarge" in error["message"] and "efficientnet-lite0" in error["message"]
    assert {r["status"] for r in remote.values()} <= {"SUCCEEDED", "LOW_CONFIDENCE"}
    assert remote["coffee.jpg"]["label"] == "espresso"


@pytest.mark.parametrize(
    ("json_only", "layout"),
    [(False, "NCHW"), (True, "NCHW"), (False, "NHWC")],
    ids=["binary", "json", "nhwc"],
)
def test_v2_model_taking_tensors_gets_the_cards_preprocessing_in_batches(
    ics_home: Path, photos: Path, labels_file: Path, json_only: bool, layout: str
) -> None:
    from ics_service.imaging import Limits, Preprocessor

    args = ["--size", "32", "--layout", layout, *(["--json-only"] if json_only else [])]
    with peer("v2", *args) as url:
        code, _, rows, output = classify(
            str(photos),
            "--model",
            f"v2:{url}/v2/models/peer",
            "--labels",
            str(labels_file),
            "--batch-size",
            "4",
            "--threshold",
            "0.0",
        )
        assert code == ExitCode.OK, output
        sent = calls(url)
    n = len(list(photos.glob("*.jpg")))
    assert len(rows) == n
    assert sum(c["batch"] for c in sent) == n and max(c["batch"] for c in sent) > 1
    assert {c["binary"] for c in sent} == {not json_only}
    # The peer answers softmax(per-channel means) of the tensor it got: the card's
    # preprocessing (its defaults) at the model's size and layout (from its metadata), sent
    # intact.
    card = ModelCard(name="peer", version="1", description="", input_size=32)
    card = replace(card, layout="NCHW" if layout == "NCHW" else "NHWC")
    preprocess = Preprocessor(card, Limits())
    spatial = (1, 2) if layout == "NCHW" else (0, 1)
    for row in rows[:3]:
        tensor, _ = preprocess(Path(row["uri"]).read_bytes())
        assert tensor.shape == card.input_shape
        means = tensor.mean(axis=spatial, dtype=np.float64)
        want = np.exp(means - means.max()) / np.exp(means - means.max()).sum()
        got = {p["label"]: p["confidence"] for p in row["top_k"]}
        assert [got[label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-5)


def test_v2_server_down_stops_before_classifying(ics_home: Path, photos3: Path) -> None:
    url = f"v2:http://127.0.0.1:{free_port()}/v2/models/m"
    res = ics("classify", str(photos3), "--model", url, "--no-progress")
    assert res.exit_code == ExitCode.ENVIRONMENT, res.output
    assert "cannot be reached" in res.output


# --- registered by name -----------------------------------------------------------------------


def test_remote_models_added_by_name(
    ics_home: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    sagemaker_peer: str,
    ics_server: Served,
    photos3: Path,
    labels_file: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", sagemaker_peer)
    monkeypatch.setenv("ICS_HOME", str(ics_home.parent / "home-of-its-own"))  # models added here
    res = ics(
        "models",
        "add",
        "pets",
        "--sagemaker",
        "plain/blue",
        "--labels",
        str(labels_file),
        "--threshold",
        "0.9",
    )
    assert res.exit_code == 0, res.output
    res = ics("models", "add", "lite", "--v2", f"{ics_server.url}/v2/models/efficientnet-lite0")
    assert res.exit_code == 0, res.output
    listed = ics("models", "list", "--json")
    kinds = {m["name"]: m["kind"] for m in json.loads(listed.stdout)}
    assert kinds["pets"] == "sagemaker" and kinds["lite"] == "v2"
    (photos3 / "broken.jpg").unlink()
    code, _, rows, output = classify(str(photos3), "--model", "pets")
    assert code == ExitCode.OK, output
    assert {(r["label"], r["threshold"], r["model"]["name"]) for r in rows} == {
        ("cat", 0.9, "pets")
    }
    code, _, rows, output = classify(str(photos3), "--model", "lite")
    assert code == ExitCode.OK, output
    assert by_name(rows)["coffee.jpg"]["label"] == "espresso"
    info = json.loads(ics("models", "info", "lite", "--json").stdout)
    assert info["source"]["spec"] == f"v2:{ics_server.url}/v2/models/efficientnet-lite0"
    assert info["num_classes"] == 1000 and info["origin"] == info["source"]["spec"]
    # A real process too: the added model's card is read from the model home.
    out = ics_home.parent / "pets.jsonl"
    done = ics_process("classify", str(photos3 / "coffee.jpg"), "--model", "pets", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["label"] for r in read_jsonl(out)] == ["cat"]
    # Checked on add: an endpoint that fails the sample photo is refused, and not added.
    res = ics("models", "add", "broken", "--sagemaker", "model-error", "--labels", str(labels_file))
    assert res.exit_code == ExitCode.USAGE
    assert "the model crashed" in res.output and "sample photo" in res.output
    assert "broken" not in ics("models", "list").stdout


def test_target_model_picks_a_model_of_a_multi_model_ics_serve(
    ics_home: Path,
    aws: None,
    imagenet_labels: Path,
    monkeypatch: pytest.MonkeyPatch,
    models_dir: Path,
    photos3: Path,
    tmp_path: Path,
) -> None:
    # A home of its own: the session's prepared model, and the example Python model added.
    home = tmp_path / "multi-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "efficientnet-lite0").symlink_to(models_dir / "efficientnet-lite0")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICS_", "AWS_"))}
    env["ICS_HOME"] = str(home)
    examples = Path(__file__).resolve().parent.parent / "examples"
    added = ics_process(
        "models",
        "add",
        "colours",
        "--python",
        "dominant_colour:DominantColour",
        env={**env, "PYTHONPATH": os.pathsep.join([str(examples), env.get("PYTHONPATH", "")])},
    )
    assert added.returncode == 0, added.stderr
    (photos3 / "broken.jpg").unlink()
    with serve_process("--model", "efficientnet-lite0", "--model", "colours", env=env) as served:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", served.url)
        colours = Path("colours.txt")
        colours.write_text("red\ngreen\nblue\n")
        code, _, rows, output = classify(
            str(photos3), "--model", "sagemaker:mme?target_model=colours", "--labels", str(colours)
        )
        assert code == ExitCode.OK, output
        assert {r["label"] for r in rows} <= {"red", "green", "blue"}
        lite = "sagemaker:mme?target_model=efficientnet-lite0"
        code, _, rows, output = classify(
            str(photos3), "--model", lite, "--labels", str(imagenet_labels)
        )
        assert code == ExitCode.OK, output
        assert by_name(rows)["coffee.jpg"]["label"] == "espresso"
        # A model the server does not serve: its 404 is the items' ModelError.
        code, _, rows, output = classify(
            str(photos3), "--model", "sagemaker:mme?target_model=nope", "--labels", str(colours)
        )
        assert code == ExitCode.FAILED, output
        errors = {r["error"]["type"] for r in rows}
        assert errors == {"ModelError"}
        assert "nope" in rows[0]["error"]["message"] and "404" in rows[0]["error"]["message"]


def test_ics_serve_refuses_a_model_sent_encoded_images(
    ics_home: Path, aws: None, labels_file: Path
) -> None:
    done = ics_process(
        "serve",
        "--model",
        "sagemaker:elsewhere",
        "--port",
        str(free_port()),
        "--grpc-port",
        "0",
        env={"ICS_LABELS": str(labels_file)},
        timeout=60,
    )
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "ics serve cannot serve sagemaker:elsewhere" in done.stderr


def test_ics_show_with_a_remote_model_sends_the_image_and_uses_its_labels(
    ics_home: Path, ics_server: Served, photos: Path, tmp_path: Path
) -> None:
    """`ics show --model v2:URL`: the encoded image goes to the server (a bytes model is
    not given a tensor), and the labels are those the server names (no --labels)."""
    url = f"v2:{ics_server.url}/v2/models/efficientnet-lite0"
    out = tmp_path / "coffee.png"
    res = ics("show", str(photos / "coffee.jpg"), "--model", url, "--json", "-o", str(out))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["label"] == "espresso" and doc["status"] == "SUCCEEDED"
    assert out.stat().st_size > 0


def test_a_v2_model_taking_tensors_added_by_name_takes_its_size_and_layout(
    ics_home: Path, photos3: Path, labels_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICS_HOME", str(ics_home.parent / "home-of-its-own"))  # models added here
    (photos3 / "broken.jpg").unlink()
    with peer("v2", "--size", "48", "--layout", "NHWC") as url:
        spec = f"{url}/v2/models/peer"
        res = ics("models", "add", "small", "--v2", spec, "--labels", str(labels_file))
        assert res.exit_code == 0, res.output
        info = json.loads(ics("models", "info", "small", "--json").stdout)
        assert (info["input_size"], info["layout"]) == (48, "NHWC")
        code, _, rows, output = classify(str(photos3), "--model", "small", "--threshold", "0")
        assert code == ExitCode.OK, output
        assert len(rows) == 3
        # A size given that the model does not take is refused, saying both.
        res = ics("models", "add", "wrong", "--v2", spec, "--labels", str(labels_file),
                  "--size", "64")  # fmt: skip
        assert res.exit_code == ExitCode.USAGE, res.output
        assert "48" in res.output and "64" in res.output


def test_models_add_sagemaker_reads_the_spec_as_model_does(
    ics_home: Path, aws: None, monkeypatch: pytest.MonkeyPatch, sagemaker_peer: str,
    labels_file: Path,
) -> None:  # fmt: skip
    """--sagemaker ENDPOINT[/VARIANT][?target_model=M] is the spec --model takes."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", sagemaker_peer)
    monkeypatch.setenv("ICS_HOME", str(ics_home.parent / "home-of-its-own"))  # models added here
    spec = "plain/blue?target_model=pets"
    res = ics("models", "add", "m", "--sagemaker", spec, "--labels", str(labels_file))
    assert res.exit_code == 0, res.output
    source = json.loads(ics("models", "info", "m", "--json").stdout)["source"]
    assert (source["endpoint"], source["variant"], source["target_model"]) == (
        "plain", "blue", "pets",
    )  # fmt: skip
    res = ics("models", "add", "n", "--sagemaker", spec, "--target-model", "other",
              "--labels", str(labels_file))  # fmt: skip
    assert res.exit_code == ExitCode.USAGE and "give the target model once" in res.output


def test_ics_serve_sends_a_v2_model_with_a_fixed_batch_axis_no_bigger_batches(
    ics_home: Path, photos3: Path, labels_file: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    (photos3 / "broken.jpg").unlink()
    images = [p.read_bytes() for p in sorted(photos3.iterdir())] * 3
    with peer("v2", "--batch", "1") as url:
        env = {**os.environ, "ICS_LABELS": str(labels_file), "ICS_THRESHOLD": "0"}
        model = f"v2:{url}/v2/models/peer"
        with serve_process("--model", model, env=env) as served:

            def post(image: bytes) -> int:
                return httpx.post(
                    f"{served.url}/v1/classify", content=image, timeout=60
                ).status_code

            # Sent at once: the batcher would put several in one batch (up to 8).
            with ThreadPoolExecutor(len(images)) as pool:
                codes = list(pool.map(post, images))
        sent = calls(url)
    assert codes == [200] * len(images)
    assert sent and {c["batch"] for c in sent} == {1}, sent
