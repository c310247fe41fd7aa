"""JPEGs through simplejpeg give what Pillow's decoder gives: the same answers on real photos,
upright photos for every EXIF orientation, and Pillow still decoding what simplejpeg leaves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefiles as f
from ics_service.errors import InvalidImage
from ics_service.imaging import Limits, Preprocessor
from ics_service.imaging.jpeg import decode_jpeg
from ics_service.models import get_card
from ics_service.models.runtime import OnnxRuntime

CARD = get_card("efficientnet-lite0")
FAST = Preprocessor(CARD, Limits())
PILLOW = Preprocessor(CARD, Limits(), fast_jpeg=False)


def test_simplejpeg_is_the_default() -> None:
    assert FAST.fast_jpeg and not PILLOW.fast_jpeg


def takes_fast_path(data: bytes) -> bool:
    """Whether the preprocessor decodes these bytes with simplejpeg: a JPEG that the draft
    scales down, and that simplejpeg accepts."""
    img = Image.open(io.BytesIO(data))
    full = img.size
    FAST._draft(img)
    return img.size != full and decode_jpeg(data, img) is not None


def doubled(img: Image.Image) -> Image.Image:
    """Twice the size: a photo the draft decodes at half scale (the model takes 256 → 224)."""
    return img.resize((img.width * 2, img.height * 2), Image.Resampling.BILINEAR)


def test_full_scale_jpegs_are_left_to_pillow() -> None:
    data = f.jpeg()  # 600×400: no smaller DCT scale still covers the model's input
    assert not takes_fast_path(data)
    assert np.array_equal(FAST(data)[0], PILLOW(data)[0])


def test_same_answers_on_real_photos(runtime: OnnxRuntime, photos: Path) -> None:
    files = sorted(p for p in photos.glob("*.jpg") if p.name != "broken.jpg")
    datas = [f.jpeg(doubled(Image.open(p))) for p in files] + [f.big_jpeg()]  # and 12 MP
    assert len(datas) >= 10 and all(takes_fast_path(d) for d in datas)
    fast = np.stack([FAST(d)[0] for d in datas])
    slow = np.stack([PILLOW(d)[0] for d in datas])
    # Both are libjpeg-turbo at the same DCT scale: a level or two apart at most.
    assert np.abs(fast - slow).max() <= 2 / 128
    p_fast, p_slow = runtime.predict(fast), runtime.predict(slow)
    assert (p_fast.argmax(axis=1) == p_slow.argmax(axis=1)).all()
    assert np.abs(p_fast - p_slow).max() < 1e-3


def oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    # Not square, so that a wrong turn changes the size, and not symmetric.
    return f.jpeg(doubled(f.coffee().crop((0, 0, 600, 300))), exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pillow_turns_it(orientation: int) -> None:
    data = oriented(orientation)
    assert takes_fast_path(data)
    fast, fast_info = FAST.decode(data)
    slow, slow_info = PILLOW.decode(data)
    assert fast_info == slow_info
    assert fast.size == slow.size
    diff = np.abs(np.asarray(fast, dtype=int) - np.asarray(slow, dtype=int))
    assert diff.max() <= 2


def test_cmyk_is_left_to_pillow(runtime: OnnxRuntime) -> None:
    data = f.cmyk_jpeg()
    assert not takes_fast_path(data)
    x, info = FAST(data)
    assert info.format == "JPEG"
    assert np.array_equal(x, PILLOW(data)[0])
    assert runtime.card.labels[int(runtime.predict(x[None])[0].argmax())] == "espresso"


@pytest.mark.parametrize(
    "data",
    [
        f.jpeg(doubled(f.coffee().convert("L"))),
        f.jpeg(doubled(f.coffee()), progressive=True),
        f.big_jpeg((3000, 4000)),  # portrait
    ],
    ids=["greyscale", "progressive", "12mp-portrait"],
)
def test_fast_path_kinds_match_pillow(data: bytes) -> None:
    assert takes_fast_path(data)
    fast, fast_info = FAST.decode(data)
    slow, slow_info = PILLOW.decode(data)
    assert fast.mode == "RGB" and fast_info == slow_info
    assert np.abs(np.asarray(fast, dtype=int) - np.asarray(slow, dtype=int)).max() <= 2


@pytest.mark.parametrize(
    "data", [f.truncated_jpeg(), f.jpeg()[:200]], ids=["truncated", "header-only"]
)
def test_broken_jpeg_is_still_a_clear_error(data: bytes) -> None:
    with pytest.raises(InvalidImage, match=r"truncated|corrupt|damaged"):
        FAST(data)


@pytest.mark.slow
def test_decode_compare_measures_both_paths(ics_home: Path, tmp_path: Path) -> None:
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # `benchmarks` is a folder of the repository, not installed
        sys.path.insert(0, root)
    from benchmarks.decode_compare import main

    out = tmp_path / "decode.json"
    main(["--large", "1", "--small", "2", "--repeats", "1", "--rounds", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    for name, row in result["paths"].items():
        assert row["top1_agreement"] == 1.0, name
        assert row["max_prob_diff"] < 1e-3, name
        assert all(ms > 0 for ms in row["cpu_ms"].values()), name
    assert result["paths"]["large"]["images"] == 1
    assert set(result["threads_large_images_per_s"]["simplejpeg"]) == {"1", "2", "3", "4"}
