"""Varied real photos for calibrating and judging a model: deterministic, never downloaded.

The photos are scikit-image's bundled ones (`ics_service.samples`), varied by crops, flips,
scales, rotations, colour, brightness, blur and JPEG quality, and fed through the card's
own `Preprocessor`, as the service feeds the model. Calibration and evaluation corpora come
from separate random streams (`CALIBRATION`, `EVALUATION`), so a model is never judged on
the photos it was calibrated on.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ..errors import ModelNotPrepared, install_hint
from ..modelcard import ModelCard

#: Streams of the photo corpora: the same seed never gives the same images to both.
CALIBRATION = 0
EVALUATION = 1

SAMPLES_HINT = install_hint("samples")


@functools.cache
def _source_photo(name: str) -> Image.Image:
    from ..samples import load_photo

    return Image.fromarray(load_photo(name))


def _source_names(photos: Sequence[str] | None) -> tuple[str, ...]:
    if photos is not None:
        return tuple(photos)
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise ModelNotPrepared(
            f"calibrating a quantized model needs the sample photos: {SAMPLES_HINT}"
        ) from None
    from ..samples import PHOTOS

    return PHOTOS


def augment(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random variation of a photo: rotation, crop, flip, scale, colour, sharpness."""
    img = photo
    w, h = img.size
    if rng.random() < 0.4:
        # Rotate, then keep only the inner rectangle, so no corner is filled.
        angle = float(rng.uniform(-25.0, 25.0))
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
        a = abs(np.deg2rad(angle))
        shrink = 1.0 / (np.cos(a) + np.sin(a) * max(w, h) / min(w, h))
        cw, ch = w * shrink, h * shrink
        img = img.crop(((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))
        w, h = img.size
    # A random crop of 20–100 % of the area, aspect ratio 3:4 to 4:3 (as in Inception).
    area = w * h * float(rng.uniform(0.2, 1.0))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = min(w, round(np.sqrt(area * aspect)))
    ch = min(h, round(np.sqrt(area / aspect)))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Scale: the shorter side from a thumbnail to a large photo.
    side = float(rng.uniform(160, 720))
    scale = side / min(cw, ch)
    img = img.resize(
        (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR
    )
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.4)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.6, 1.4)))
    if rng.random() < 0.1:
        img = img.convert("L").convert("RGB")
    else:
        img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.3:
        # A colour cast: scale one channel.
        arr = np.asarray(img, dtype=np.float32)
        arr[..., int(rng.integers(0, 3))] *= float(rng.uniform(0.8, 1.2))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    r = rng.random()
    if r < 0.15:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    elif r < 0.3:
        img = ImageEnhance.Sharpness(img).enhance(float(rng.uniform(1.5, 2.5)))
    return img


def varied_photos(
    count: int, seed: int, *, stream: int = EVALUATION, photos: Sequence[str] | None = None
) -> Iterator[bytes]:
    """`count` JPEGs, each a different random variation of a real photo; deterministic.

    `stream` (CALIBRATION or EVALUATION) separates the corpora drawn with one seed.
    """
    names = _source_names(photos)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    order = rng.permutation(len(names))
    for i in range(count):
        # Every photo equally often, in a shuffled order.
        name = names[int(order[i % len(names)])]
        img = augment(_source_photo(name), rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
        yield buf.getvalue()


def photo_batches(
    card: ModelCard,
    count: int,
    seed: int,
    *,
    stream: int = EVALUATION,
    batch_size: int = 16,
    photos: Sequence[str] | None = None,
) -> Iterator[np.ndarray]:
    """The model's inputs (N, 3, H, W) for `varied_photos`, in batches, via the card's
    preprocessing."""
    yield from preprocess_batches(
        card, varied_photos(count, seed, stream=stream, photos=photos), batch_size=batch_size
    )


def preprocess_batches(
    card: ModelCard, images: Iterable[bytes], *, batch_size: int = 16
) -> Iterator[np.ndarray]:
    """Encoded images → the model's normalised input, batch_size at a time."""
    from ..imaging import Limits, Preprocessor

    pre = Preprocessor(card, Limits())
    batch: list[np.ndarray] = []
    for data in images:
        batch.append(pre(data)[0])
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
