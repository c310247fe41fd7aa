"""Model-card preprocessing: from encoded bytes to the model's normalised input, through a
checked, budgeted decode (JPEGs at the smallest DCT scale that covers the resize size).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageTooLarge, InferenceError, InvalidImage
from ..modelcard import ModelCard
from ..types import ImageInfo
from .formats import ICO_MAGIC, declared_size, describe, open_image
from .jpeg import decode_jpeg, simplejpeg
from .limits import ICO_BYTES_PER_PIXEL, DecodeBudget, Limits, memory_need, raise_pillow_guard

# --- preprocessing ------------------------------------------------------------------------


class Preprocessor:
    """Turns encoded image bytes into the model's normalised input (3, H, W) or (H, W, 3)
    float32, as the card's layout says.

    One instance is shared by every decode thread of a run: it owns their decode memory
    budget (`limits.decode_memory`).
    """

    def __init__(
        self,
        card: ModelCard,
        limits: Limits,
        *,
        fast_jpeg: bool = True,
        custom: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        """`fast_jpeg=False` has Pillow decode JPEGs too (benchmarks/decode_compare.py).
        `custom` replaces the card's normalisation: a Python model's own `preprocess`, given
        the decoded, resized and cropped (H, W, 3) uint8 RGB image."""
        self.card = card
        self._custom = custom
        self.fast_jpeg = fast_jpeg and simplejpeg() is not None
        self.limits = limits
        self.size = card.input_size
        self.resize_size = card.resize_size
        self.resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
        }[card.interpolation]
        self._nchw = card.layout == "NCHW"
        channel_shape = (3, 1, 1) if self._nchw else (1, 1, 3)
        self._mean = np.asarray(card.mean, dtype=np.float32).reshape(channel_shape)
        self._inv_std = (1.0 / np.asarray(card.std, dtype=np.float32)).reshape(channel_shape)
        self._scale = card.scale
        self._bgr = card.channels == "BGR"
        self._squash = card.resize_mode == "squash"
        self._jpeg_quality = card.jpeg_quality
        self.budget = DecodeBudget(limits.decode_memory)
        raise_pillow_guard(limits.max_pixels)

    @classmethod
    def for_runtime(cls, runtime: Any, limits: Limits) -> Preprocessor:
        """A model runtime's preprocessing: its card's, or its own `preprocess` when it has
        one (a Python model's)."""
        return cls(runtime.card, limits, custom=getattr(runtime, "preprocess", None))

    def __call__(
        self, data: bytes, stop: threading.Event | None = None
    ) -> tuple[np.ndarray, ImageInfo]:
        img, info = self.decode(data, stop)
        return self.input_of(np.asarray(img)), info

    def input_of(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded (H, W, 3) uint8 RGB image → the model's input: the card's normalisation
        or the model's own preprocess."""
        if self._custom is None:
            return self.normalise(rgb)
        name = self.card.name
        try:
            out = np.asarray(self._custom(rgb), dtype=np.float32)
        except Exception as e:
            raise InferenceError(
                f"model {name}'s preprocess failed: {type(e).__name__}: {e}"
            ) from e
        if out.shape != self.card.input_shape:
            raise InferenceError(
                f"model {name}'s preprocess returned shape {list(out.shape)}; its card's "
                f"input is {list(self.card.input_shape)}"
            )
        return out

    def normalise(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB → the card's layout and channel order, float32,
        (x * scale - mean) / std, in two passes (three with a scale).

        Written through `out=` from the strided uint8 view: `transpose().astype()` first
        would cost about 7 times as much.
        """
        pixels = rgb[:, :, ::-1] if self._bgr else rgb
        if self._nchw:
            pixels = pixels.transpose(2, 0, 1)
        if out is None:
            out = np.empty(pixels.shape, dtype=np.float32)
        if self._scale == 1.0:
            np.subtract(pixels, self._mean, out=out, casting="unsafe")
        else:
            np.multiply(pixels, np.float32(self._scale), out=out, casting="unsafe")
            out -= self._mean
        out *= self._inv_std
        return out

    def decode(
        self, data: bytes, stop: threading.Event | None = None
    ) -> tuple[Image.Image, ImageInfo]:
        """Check, decode, orient, convert to RGB, resize and centre-crop to the model's size.

        Waits until the decode memory shared with the other threads has room for this image;
        a set `stop` ends the wait with DecodeCancelled.
        """
        self._check_file(data)
        sha = hashlib.sha256(data).hexdigest()
        try:
            with self._admitted(data, stop) as (img, (w, h)):
                fmt = img.format or "unknown"
                try:
                    # Only a reduced DCT scale pays for simplejpeg: at full scale it was a
                    # few percent slower than Pillow's own libjpeg-turbo (decode_compare).
                    scaled = img.size != (w, h)
                    rgb = decode_jpeg(data, img) if self.fast_jpeg and scaled else None
                    if rgb is None:
                        rgb = self._load_rgb(img)
                    out = self._resize_crop(rgb)
                except (OSError, ValueError, SyntaxError, EOFError) as e:
                    raise InvalidImage(f"cannot decode {fmt} image: {describe(e)}") from None
        except Image.DecompressionBombError as e:
            # Only where a plugin checks a size that ICS cannot see first (a GIF frame).
            raise ImageTooLarge(
                f"refused as a decompression bomb ({e}); images over "
                f"max_pixels={self.limits.max_pixels:,} are refused"
            ) from None
        except MemoryError:
            # The budget should prevent this; when it does not, the image is what is too big
            # for this machine, not a bug and not a corrupt file.
            raise ImageTooLarge(
                "the machine ran out of memory decoding this image: lower decode_memory "
                "(images then wait for memory), max_pixels or decode_workers"
            ) from None
        orient_w, orient_h = _oriented_size(rgb, w, h)
        return out, ImageInfo(width=orient_w, height=orient_h, format=fmt, sha256=sha)

    def _check_file(self, data: bytes) -> None:
        if len(data) > self.limits.max_bytes:
            raise ImageTooLarge(
                f"file is {len(data):,} bytes, over max_bytes={self.limits.max_bytes:,}"
            )
        if not data:
            raise InvalidImage("empty file (0 bytes)")

    def _check_pixels(self, w: int, h: int) -> None:
        if w * h > self.limits.max_pixels:
            raise ImageTooLarge(
                f"image is {w}×{h} = {w * h:,} pixels, over max_pixels={self.limits.max_pixels:,}"
            )
        if w < 1 or h < 1:
            raise InvalidImage(f"image has no pixels ({w}×{h})")

    @contextlib.contextmanager
    def _admitted(
        self, data: bytes, stop: threading.Event | None
    ) -> Iterator[tuple[Image.Image, tuple[int, int]]]:
        """The opened image and its full size, while its decode memory is held."""
        declared = declared_size(data)
        if declared is not None:
            self._check_pixels(*declared)
        if declared is not None and data.startswith(ICO_MAGIC):
            # Pillow decodes an icon inside Image.open: hold its memory before opening it.
            w, h = declared
            need = w * h * ICO_BYTES_PER_PIXEL + len(data)
            with self._reserve(need, f"this {w}×{h} icon", stop):
                img = open_image(data)
                self._check_pixels(*img.size)
                yield img, img.size
            return
        img = open_image(data)
        full = img.size
        self._check_pixels(*full)
        self._draft(img)
        need = memory_need(img, full, len(data))
        with self._reserve(need, f"this {full[0]}×{full[1]} {img.mode} image", stop):
            yield img, full

    def _reserve(
        self, need: int, what: str, stop: threading.Event | None
    ) -> contextlib.AbstractContextManager[None]:
        if need > self.budget.limit:
            # Waiting would never end: no other image's memory coming back can make room.
            raise ImageTooLarge(
                f"decoding {what} needs about {need:,} bytes of memory, over "
                f"decode_memory={self.budget.limit:,}: raise decode_memory to decode it"
            )
        return self.budget.reserve(need, stop)

    def _draft(self, img: Image.Image) -> None:
        w, h = img.size
        if not self.card.reduced_decode:
            return
        if img.format in ("JPEG", "MPO") and min(w, h) > self.resize_size:
            # DCT scaling: decode at 1/2, 1/4 or 1/8 while the shorter side stays covered.
            scale = self.resize_size / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))

    def _load_rgb(self, img: Image.Image) -> Image.Image:
        with warnings.catch_warnings():
            # Pillow warns about odd but readable metadata (bad EXIF, palette transparency).
            warnings.simplefilter("ignore")
            img.load()
            # In place: otherwise Pillow returns a full-size copy even when nothing turns.
            ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)

    def _resize_crop(self, img: Image.Image) -> Image.Image:
        if self._jpeg_quality is not None:
            return self._squash_round_trip_crop(img, self._jpeg_quality)
        # Resize the shorter side (or, squashing, each side) to resize_size and centre-crop
        # size×size, in one resample of just the source region that the crop keeps.
        w, h = img.size
        if self._squash:
            crop_w = w * self.size / self.resize_size
            crop_h = h * self.size / self.resize_size
        else:
            scale = self.resize_size / min(w, h)
            crop_w = min(w, self.size / scale)
            crop_h = min(h, self.size / scale)
        left = (w - crop_w) / 2
        top = (h - crop_h) / 2
        return img.resize(
            (self.size, self.size),
            self.resample,
            box=(left, top, left + crop_w, top + crop_h),
            reducing_gap=3.0,
        )

    def _squash_round_trip_crop(self, img: Image.Image, quality: int) -> Image.Image:
        # As the reference pipelines of such models do it, step by step: the whole image to
        # resize_size square (Pillow's plain resize), the JPEG round trip, the centre crop.
        r = self.resize_size
        square = jpeg_round_trip(img.resize((r, r), self.resample), quality)
        off = (r - self.size) // 2
        return square.crop((off, off, off + self.size, off + self.size))


def jpeg_round_trip(img: Image.Image, quality: int) -> Image.Image:
    """The image encoded as a baseline JPEG of `quality` (Pillow's defaults otherwise) and
    decoded again: the compression artefacts some models were fitted on."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def _oriented_size(img: Image.Image, w: int, h: int) -> tuple[int, int]:
    # exif_transpose may have swapped the axes; report the size as the photo is seen.
    rw, rh = img.size
    return (h, w) if (rw > rh) != (w > h) and rw != rh else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping (Pillow's convert clips).
        # In place: the same values as `np.clip(arr * k, 0, 255)` without two more float64
        # copies of the image.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or mode != "I" else 255.0
        arr *= 255.0 / top
        grey = np.clip(arr, 0, 255, out=arr).astype(np.uint8)
        del arr
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if hi > lo:
            arr -= lo
            arr *= 255.0 / (hi - lo)
        else:
            arr[...] = 0
        grey = arr.astype(np.uint8)
        del arr
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        # Pasting through the alpha onto white gives exactly alpha_composite's pixels (checked
        # for every value and alpha) without its three more full-size RGBA images.
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    return img.convert("RGB")
