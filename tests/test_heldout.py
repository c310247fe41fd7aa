"""Photos held out from calibration: which stamps count as photos, how they are read, and
(where Debian's tuxpaint-stamps-default is installed) how the INT8 model agrees on them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ics_service.errors import ModelNotPrepared
from ics_service.models import heldout
from ics_service.models.agreement import heldout_agreement, noise_floor
from ics_service.models.calibration import EVALUATION, photo_batches
from ics_service.models.runtime import OnnxRuntime

INT8 = "efficientnet-lite0-int8"


def _drawing(size: int = 300) -> Image.Image:
    """Clip art: a few flat colours on a transparent background."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, size - 20, size - 20), fill=(240, 200, 40, 255), outline="black")
    draw.rectangle((100, 100, 200, 200), fill=(200, 30, 30, 255))
    return img


def _cutout(photo: Path) -> Image.Image:
    """A real photo cut out on a transparent background, as the stamps are."""
    img = Image.open(photo).convert("RGBA")
    alpha = Image.new("L", img.size, 0)
    w, h = img.size
    ImageDraw.Draw(alpha).ellipse((w // 10, h // 10, w - w // 10, h - h // 10), fill=255)
    img.putalpha(alpha)
    return img


def test_photos_pass_and_drawings_icons_and_slivers_do_not(photos: Path) -> None:
    assert heldout.is_photo(Image.open(photos / "coffee.jpg"))
    assert heldout.is_photo(_cutout(photos / "chelsea.jpg"))
    assert not heldout.is_photo(_drawing())
    # An icon: a photo too small to be one.
    assert not heldout.is_photo(Image.open(photos / "coffee.jpg").resize((120, 90)))
    # Mostly transparent: a thin strip of a photo.
    sliver = _cutout(photos / "chelsea.jpg")
    alpha = Image.new("L", sliver.size, 0)
    ImageDraw.Draw(alpha).rectangle((0, 0, sliver.width, sliver.height // 10), fill=255)
    sliver.putalpha(alpha)
    assert not heldout.is_photo(sliver)


def test_heldout_paths_keeps_photos_and_skips_cartoon_folders(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "animals" / "cartoon").mkdir(parents=True)
    _cutout(photos / "chelsea.jpg").save(tmp_path / "animals" / "cat.png")
    _cutout(photos / "chelsea.jpg").save(tmp_path / "animals" / "cartoon" / "cat.png")
    _drawing().save(tmp_path / "animals" / "sun.png")
    (tmp_path / "animals" / "cat.txt").write_text("not an image")
    assert heldout.heldout_paths(tmp_path) == [tmp_path / "animals" / "cat.png"]


def test_missing_package_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ModelNotPrepared, match=r"apt-get install .*tuxpaint-stamps-default"):
        heldout.heldout_paths(tmp_path / "absent")


def test_flattened_stamps_are_on_white_and_variations_are_deterministic(
    photos: Path, tmp_path: Path
) -> None:
    path = tmp_path / "cat.png"
    _cutout(photos / "chelsea.jpg").save(path)
    flat = np.asarray(heldout.flattened(path))
    assert flat.shape[2] == 3
    assert (flat[0, 0] == 255).all()  # a transparent corner
    first = [hashlib.sha256(b).hexdigest() for b in heldout.varied_heldout([path], 5, seed=3)]
    assert first == [hashlib.sha256(b).hexdigest() for b in heldout.varied_heldout([path], 5, 3)]
    assert len(set(first)) == 5


needs_stamps = pytest.mark.skipif(
    not heldout.STAMPS_DIR.is_dir(),
    reason=f"the held-out photos are not installed: {heldout.INSTALL_HINT}",
)


@needs_stamps
def test_the_installed_stamps_give_about_a_hundred_photos() -> None:
    paths = heldout.heldout_paths()
    assert 80 <= len(paths) <= 150, len(paths)
    assert not any("cartoon" in p.parts for p in paths)


@needs_stamps
@pytest.mark.slow
def test_int8_agrees_with_fp32_on_photos_held_out_from_calibration(
    runtime: OnnxRuntime, int8_runtime: OnnxRuntime
) -> None:
    once, varied, floor, photo_floors = heldout_agreement(
        runtime, int8_runtime, variations=200, photo_noise_draws=2
    )
    assert once.images >= 80
    assert varied.images == floor.images == 200
    # The benchmark measures 1,000 variations; these floors leave room for the smaller sample.
    assert once.top1_rate >= 0.9, once
    assert varied.top1_rate >= 0.9, varied
    assert varied.top5_rate >= 0.98, varied
    # Where FP32 is sure of its answer (no near tie), INT8 gives it.
    assert varied.confident >= 30, varied
    assert varied.confident_top1_rate >= 0.98, varied
    # Half a grey level of noise already moves FP32's own answer on some of these photos.
    assert 0.8 <= floor.top1_rate < 1.0, floor
    # The same noise on the photos themselves, one draw each: FP32's own decisions move too.
    assert [f.images for f in photo_floors] == [once.images] * 2
    assert all(0.9 <= f.decision_rate <= 1.0 for f in photo_floors), photo_floors


@needs_stamps
def test_the_heldout_list_runs_as_a_module() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ics_service.models.heldout"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "photos from tuxpaint-stamps-default" in r.stdout


def test_noise_floor_is_exact_without_noise_and_falls_with_it(runtime: OnnxRuntime) -> None:
    batches = list(photo_batches(runtime.card, 16, seed=5, stream=EVALUATION))
    assert noise_floor(runtime, batches, grey_levels=0.0).top1 == 16
    noisy = noise_floor(runtime, batches, grey_levels=48.0)
    assert noisy.images == 16
    assert noisy.top1 < 16, noisy
