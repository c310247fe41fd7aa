"""The INT8 model: built by `ics models prepare`, the FP32 card's preprocessing, and the
FP32 model's answers on real photos."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ics_service.cli import main
from ics_service.models import get_card
from ics_service.models.agreement import agreement_on_files, top1_agreement
from ics_service.models.calibration import (
    CALIBRATION,
    EVALUATION,
    photo_batches,
    preprocess_batches,
    varied_photos,
)
from ics_service.models.prepare import onnx_path
from ics_service.models.runtime import OnnxRuntime

FP32 = "efficientnet-lite0"
INT8 = "efficientnet-lite0-int8"


def test_int8_card_has_the_fp32_preprocessing() -> None:
    fp32, int8 = get_card(FP32).to_dict(), get_card(INT8).to_dict()
    for key in ("name", "description"):
        fp32.pop(key), int8.pop(key)
    assert int8 == fp32
    build = get_card(INT8).build
    assert build["kind"] == "quantize" and build["base"] == FP32


def test_prepare_builds_a_quantized_model(int8_runtime: OnnxRuntime, models_dir: Path) -> None:
    import onnx

    path = int8_runtime.path
    meta = json.loads((path.parent / "model.json").read_text())
    assert meta["card"]["name"] == INT8
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) > 40
    assert path.stat().st_size < onnx_path(get_card(FP32), models_dir).stat().st_size / 2


def test_models_list_shows_int8_prepared(int8_runtime: OnnxRuntime, ics_home: Path) -> None:
    res = CliRunner().invoke(main, ["models", "list", "--json"])
    assert res.exit_code == 0, res.output
    docs = {d["name"]: d for d in json.loads(res.output)}
    assert docs[INT8]["prepared"] is True
    assert docs[INT8]["input_size"] == docs[FP32]["input_size"]
    res = CliRunner().invoke(main, ["models", "prepare", INT8])
    assert res.exit_code == 0 and "already prepared" in res.output


def test_int8_agrees_with_fp32_on_the_sample_photos(
    runtime: OnnxRuntime, int8_runtime: OnnxRuntime, photos: Path
) -> None:
    agreement = agreement_on_files(runtime, int8_runtime, sorted(photos.glob("*.jpg")))
    assert agreement.images == 12
    assert agreement.top1 >= 10, agreement
    assert agreement.top5 == 12, agreement
    # The confident answer stays: espresso.
    coffee = next(preprocess_batches(int8_runtime.card, [(photos / "coffee.jpg").read_bytes()]))
    probs = int8_runtime.predict(coffee)[0]
    assert int8_runtime.card.labels[int(probs.argmax())] == "espresso"
    assert probs.max() > 0.9


def test_int8_agrees_with_fp32_on_varied_photos_it_was_not_calibrated_on(
    runtime: OnnxRuntime, int8_runtime: OnnxRuntime
) -> None:
    # The benchmarks measure 1,000 images; 160 keep the test short. These photos come from
    # the evaluation stream: none of them was among the calibration photos.
    batches = photo_batches(runtime.card, 160, seed=7, stream=EVALUATION)
    agreement = top1_agreement(runtime, int8_runtime, batches)
    assert agreement.images == 160
    assert agreement.top1_rate >= 0.88, agreement
    assert agreement.top5_rate >= 0.97, agreement


def test_calibration_and_evaluation_photos_are_disjoint_and_deterministic() -> None:
    def digests(stream: int) -> list[str]:
        return [hashlib.sha256(b).hexdigest() for b in varied_photos(24, 0, stream=stream)]

    calibration = digests(CALIBRATION)
    assert calibration == digests(CALIBRATION)
    assert len(set(calibration)) == 24
    assert not set(calibration) & set(digests(EVALUATION))


def test_a_model_agrees_with_itself(runtime: OnnxRuntime) -> None:
    batches = list(photo_batches(runtime.card, 8, 1, batch_size=4))
    assert [len(b) for b in batches] == [4, 4]
    agreement = top1_agreement(runtime, runtime, batches)
    assert (agreement.images, agreement.top1, agreement.top5) == (8, 8, 8)
    assert agreement.mean_max_prob_diff == 0.0


def test_the_agreement_measure_runs_as_a_module() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ics_service.models.agreement", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout
