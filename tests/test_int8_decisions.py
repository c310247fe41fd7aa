"""INT8 judged by what the workflow decides: the decision agreement of two real models on
real photos, by the workflow's own threshold rule, and (where Debian's
tuxpaint-stamps-default is installed) the standalone measurement the docs quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ics_service.models import heldout
from ics_service.models.agreement import DEFAULT_THRESHOLD, top1_agreement
from ics_service.models.calibration import preprocess_batches
from ics_service.models.runtime import OnnxRuntime

ROOT = Path(__file__).resolve().parent.parent


def _batches(runtime: OnnxRuntime, photos: Path) -> list[np.ndarray]:
    images = (p.read_bytes() for p in sorted(photos.glob("*.jpg")))
    # Batches of 2: an image's index must carry across batches.
    return list(preprocess_batches(runtime.card, images, batch_size=2))


def test_a_model_decides_as_itself(runtime: OnnxRuntime, photos: Path) -> None:
    batches = _batches(runtime, photos)
    same = top1_agreement(runtime, runtime, batches)
    assert same.threshold == DEFAULT_THRESHOLD == 0.94
    assert same.images >= 5 and same.decisions == same.images and same.flips == ()


def test_decisions_flip_exactly_where_the_threshold_parts_the_two_models(
    runtime: OnnxRuntime, int8_runtime: OnnxRuntime, photos: Path
) -> None:
    batches = _batches(runtime, photos)
    ref = np.concatenate([runtime.predict(b) for b in batches])
    cand = np.concatenate([int8_runtime.predict(b) for b in batches])
    r, c = ref.max(axis=1), cand.max(axis=1)
    # The photo where INT8 is least sure below FP32, and a threshold exactly at FP32's
    # confidence: FP32 reaches it (the workflow counts equal as reached), INT8 does not.
    j = int(np.argmax(r - c))
    assert r[j] > c[j]
    threshold = float(r[j])
    agreement = top1_agreement(runtime, int8_runtime, batches, threshold=threshold)
    parted = {int(i) for i in np.flatnonzero((r >= threshold) != (c >= threshold))}
    assert j in parted
    assert agreement.decisions == len(r) - len(parted)
    flipped = {f.index for f in agreement.flips if f.decision_differs(threshold)}
    assert flipped == parted
    (flip,) = [f for f in agreement.flips if f.index == j]
    assert flip.reference_p == pytest.approx(threshold)
    assert flip.reference_label == int(ref[j].argmax())
    assert flip.candidate_p == pytest.approx(float(c[j]))
    # The other flips are photos where FP32 is confident and INT8's top-1 differs.
    for f in agreement.flips:
        if f.index not in parted:
            assert f.reference_p >= 0.5 and f.reference_label != f.candidate_label
    assert agreement.confident - agreement.confident_top1 == len(
        [
            f
            for f in agreement.flips
            if f.reference_label != f.candidate_label and f.reference_p >= 0.5
        ]
    )
    # At threshold 0 every image SUCCEEDS under both models.
    assert top1_agreement(runtime, int8_runtime, batches, threshold=0.0).decisions == len(r)


@pytest.mark.skipif(
    not heldout.STAMPS_DIR.is_dir(),
    reason=f"the held-out photos are not installed: {heldout.INSTALL_HINT}",
)
@pytest.mark.slow
def test_the_standalone_measurement_writes_the_figures_and_targets(
    int8_runtime: OnnxRuntime, models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int8_decisions.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.int8_decisions", "--variations", "20"),
            *("--models-dir", str(models_dir), "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    h = doc["heldout"]
    assert h["photos"] >= 80 and h["varied_images"] == 20 and h["threshold"] == 0.94
    flips = [f for f in h["flips"] if f["decision_differs"]]
    assert len(flips) == h["decision_flips"]
    assert h["decision_agreement"] == pytest.approx(1 - len(flips) / h["photos"])
    for f in flips:  # named by their place under the stamps folder, with both answers
        assert (heldout.STAMPS_DIR / f["photo"]).is_file()
        assert (f["fp32"]["p"] >= 0.94) != (f["int8"]["p"] >= 0.94)
    decision, confident = doc["targets"]
    assert "≥ 99 %" in decision["target"] and "100 %" in confident["target"]
    assert decision["met"] == (
        h["decision_agreement"] >= 0.99 and h["varied_decision_agreement"] >= 0.99
    )
    assert "Decisions at threshold 0.94" in done.stdout
    assert doc["models"]["efficientnet-lite0-int8"]["sha256"]
