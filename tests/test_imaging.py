"""Decoding: every kind of image a user has, every kind of broken file, and the limits."""

from __future__ import annotations

import numpy as np
import pytest

import imagefiles as f
from ics_service.errors import ImageTooLarge, InvalidImage, ItemError, UnsupportedFormat
from ics_service.imaging import Limits, Preprocessor, looks_like_image
from ics_service.models import get_card
from ics_service.models.runtime import OnnxRuntime

CARD = get_card("efficientnet-lite0")


@pytest.fixture
def pre() -> Preprocessor:
    return Preprocessor(CARD, Limits())


def top1(runtime: OnnxRuntime, pre: Preprocessor, data: bytes) -> str:
    x, _ = pre(data)
    return runtime.card.labels[int(runtime.predict(x[None])[0].argmax())]


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidImage, "empty file"),
        (f.truncated_jpeg(), InvalidImage, "truncated"),
        (b"hello, this is a text file\n" * 10, InvalidImage, "not an image"),
        (f.jpeg()[:200], InvalidImage, "truncated|corrupt|damaged"),
        (f.HEIC_HEAD, UnsupportedFormat, "HEIC"),
        (f.SVG, UnsupportedFormat, "SVG"),
        (b"%PDF-1.7\n" + b"0" * 100, UnsupportedFormat, "PDF"),
        (f.png_bomb(), ImageTooLarge, "max_pixels"),
    ],
    ids=["empty", "truncated", "text", "header-only", "heic", "svg", "pdf", "bomb"],
)
def test_bad_input_is_a_clear_item_error(
    pre: Preprocessor, data: bytes, error: type[ItemError], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        pre(data)
    assert str(info.value)  # a message a person can read
    assert "Traceback" not in str(info.value)


def test_max_bytes_refused_before_decoding() -> None:
    pre = Preprocessor(CARD, Limits(max_bytes=1000))
    with pytest.raises(ImageTooLarge, match="max_bytes=1,000"):
        pre(f.jpeg())


def test_max_pixels_is_configurable() -> None:
    pre = Preprocessor(CARD, Limits(max_pixels=100_000))
    with pytest.raises(ImageTooLarge, match="600×400 = 240,000 pixels"):
        pre(f.jpeg())


@pytest.mark.parametrize(
    "make",
    [f.jpeg, f.cmyk_jpeg, f.grey16_png, f.palette_gif, f.rgba_png, f.multiframe_gif, f.big_jpeg],
    ids=["jpeg", "cmyk", "grey16", "palette", "rgba", "multiframe", "12mp"],
)
def test_image_modes_decode_to_the_model_input(
    runtime: OnnxRuntime, pre: Preprocessor, make: object
) -> None:
    data = make()  # type: ignore[operator]
    x, info = pre(data)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert len(info.sha256) == 64
    if make is not f.grey16_png:  # a grey espresso is still a cup of something
        assert top1(runtime, pre, data) == "espresso"


def test_sixteen_bit_is_scaled_not_clipped(pre: Preprocessor) -> None:
    img, _ = pre.decode(f.grey16_png())
    arr = np.asarray(img)
    assert arr.std() > 20  # clipping 16-bit values to 255 would give a flat white image


def test_exif_orientation_is_applied(runtime: OnnxRuntime, pre: Preprocessor) -> None:
    x_upright, info_upright = pre(f.jpeg())
    x_rotated, info_rotated = pre(f.rotated_exif_jpeg())
    assert (info_rotated.width, info_rotated.height) == (info_upright.width, info_upright.height)
    assert np.abs(x_upright - x_rotated).mean() < 0.05
    assert top1(runtime, pre, f.rotated_exif_jpeg()) == "espresso"


def test_big_jpeg_uses_draft_decoding(pre: Preprocessor) -> None:
    from PIL import Image

    img = Image.open(__import__("io").BytesIO(f.big_jpeg()))
    pre._draft(img)  # as decode() does before it reserves the memory the image needs
    loaded = pre._load_rgb(img)
    # 4000×3000 decoded at 1/8 scale (500×375) still covers the 256 resize size.
    assert loaded.size == (500, 375)


def test_alpha_is_composited_on_white(pre: Preprocessor) -> None:
    from PIL import Image

    transparent = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    img, _ = pre.decode(f.encode(transparent, "PNG"))
    assert np.asarray(img).min() == 255


def test_signature_sniffing() -> None:
    assert looks_like_image(f.jpeg()[:16])
    assert looks_like_image(f.encode(f.coffee(), "PNG")[:16])
    assert looks_like_image(f.encode(f.coffee(), "WEBP")[:16])
    assert not looks_like_image(b"hello world12345")


def test_alpha_compositing_matches_pillows_alpha_composite(pre: Preprocessor) -> None:
    from PIL import Image

    from ics_service.imaging.preprocess import to_rgb

    # Every channel value against every alpha: ICS pastes through the alpha (fewer copies of
    # the image); the pixels must be exactly those of compositing onto opaque white.
    value, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    rgba = Image.fromarray(np.stack([value, 255 - value, value // 3, alpha], axis=-1), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = Image.alpha_composite(white, rgba).convert("RGB")
    for mode in ("RGBA", "LA"):
        img = rgba.convert(mode)
        want = expected if mode == "RGBA" else Image.alpha_composite(white, img.convert("RGBA"))
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(want.convert("RGB"))), mode
