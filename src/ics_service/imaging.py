"""Safe image decoding and model-card preprocessing.

Limits are checked before pixels are decoded; JPEGs are decoded at the smallest DCT scale
that still covers the model's resize size, so a 12-megapixel photo costs about what a
small one does. Every failure becomes an `ItemError` with a message a person understands.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import Settings, default
from .errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from .models.card import ModelCard
from .types import ImageInfo

# ICS checks max_pixels itself before decoding; Pillow's own global bomb guard would only
# warn or refuse at its fixed limit, whatever the user configured.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

Image.init()  # register every plugin, so Image.OPEN is complete
#: Formats decoded. Pillow can open more (EPS, PSD, ...), but those are not photos and
#: some run external programs.
FORMATS = tuple(
    f
    for f in ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "AVIF")
    if f in Image.OPEN
)

# Signatures of formats that are images but not decoded here, for a better message.
_UNSUPPORTED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"),
    (0, b"%PDF", "PDF"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "SVG/XML"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjXL ", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
)

#: Signatures used to recognise image files by content when a folder is listed.
_IMAGE_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"\xff\xd8\xff"),  # JPEG / MPO
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),
    (0, b"II*\x00"),  # TIFF little-endian
    (0, b"MM\x00*"),  # TIFF big-endian
    (8, b"WEBP"),
    (0, b"P1"),
    (0, b"P2"),
    (0, b"P3"),
    (0, b"P4"),
    (0, b"P5"),
    (0, b"P6"),
    (0, b"\x00\x00\x01\x00"),  # ICO
    (4, b"ftypavif"),
    *((o, s) for o, s, _ in _UNSUPPORTED_SIGNATURES if s not in (b"%PDF", b"<?xml")),
)
SNIFF_BYTES = 16
IMAGE_EXTENSIONS = frozenset(
    (
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".ico",
        ".tga",
        ".avif",
        ".heic",
        ".heif",
        ".mpo",
    )
)


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file carry the signature of an image format."""
    return any(head[off : off + len(sig)] == sig for off, sig in _IMAGE_SIGNATURES)


@dataclass(frozen=True)
class Limits:
    """What an image may cost; the defaults are the settings' (config.Settings)."""

    max_pixels: int = default("max_pixels")
    max_bytes: int = default("max_bytes")
    decode_memory: int = default("decode_memory")

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_pixels=settings.max_pixels,
            max_bytes=settings.max_bytes,
            decode_memory=settings.decode_memory,
        )


class Preprocessor:
    """Turns encoded image bytes into the model's normalised input (3, H, W) float32."""

    def __init__(self, card: ModelCard, limits: Limits) -> None:
        self.card = card
        self.limits = limits
        self.size = card.input_size
        self.resize_size = card.resize_size
        self.resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
        }[card.interpolation]
        self._mean = np.asarray(card.mean, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(card.std, dtype=np.float32)).reshape(3, 1, 1)

    def __call__(self, data: bytes) -> tuple[np.ndarray, ImageInfo]:
        img, info = self.decode(data)
        return self.normalise(np.asarray(img)), info

    def normalise(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(H, W, 3) uint8 → (3, H, W) float32, (x - mean) / std, in two passes.

        Written through `out=` from the strided uint8 view: `transpose().astype()` first
        would cost about 7 times as much.
        """
        if out is None:
            out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        np.subtract(rgb.transpose(2, 0, 1), self._mean, out=out, casting="unsafe")
        out *= self._inv_std
        return out

    def decode(self, data: bytes) -> tuple[Image.Image, ImageInfo]:
        """Check, decode, orient, convert to RGB, resize and centre-crop to the model's size."""
        if len(data) > self.limits.max_bytes:
            raise ImageTooLarge(
                f"file is {len(data):,} bytes, over max_bytes={self.limits.max_bytes:,}"
            )
        if not data:
            raise InvalidImage("empty file (0 bytes)")
        sha = hashlib.sha256(data).hexdigest()
        img = _open(data)
        fmt = img.format or "unknown"
        w, h = img.size
        if w * h > self.limits.max_pixels:
            raise ImageTooLarge(
                f"image is {w}×{h} = {w * h:,} pixels, over max_pixels={self.limits.max_pixels:,}"
            )
        if w < 1 or h < 1:
            raise InvalidImage(f"image has no pixels ({w}×{h})")
        try:
            img = self._load_rgb(img)
            out = self._resize_crop(img)
        except (
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
            MemoryError,
            Image.DecompressionBombError,
        ) as e:
            raise InvalidImage(f"cannot decode {fmt} image: {_describe(e)}") from None
        orient_w, orient_h = _oriented_size(img, w, h)
        return out, ImageInfo(width=orient_w, height=orient_h, format=fmt, sha256=sha)

    def _load_rgb(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if img.format in ("JPEG", "MPO") and min(w, h) > self.resize_size:
            # DCT scaling: decode at 1/2, 1/4 or 1/8 while the shorter side stays covered.
            scale = self.resize_size / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        with warnings.catch_warnings():
            # Pillow warns about odd but readable metadata (bad EXIF, palette transparency).
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)

    def _resize_crop(self, img: Image.Image) -> Image.Image:
        # Resize the shorter side to resize_size and centre-crop size×size, in one resample
        # of just the source region that the crop keeps.
        w, h = img.size
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


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        head = data[:32]
        for off, sig, name in _UNSUPPORTED_SIGNATURES:
            if head[off : off + len(sig)] == sig:
                raise UnsupportedFormat(
                    f"{name} files are not supported; convert to JPEG or PNG "
                    f"(supported: {', '.join(FORMATS)})"
                ) from None
        if looks_like_image(head):
            raise InvalidImage("corrupt image: the header is damaged or truncated") from None
        raise InvalidImage(f"not an image (unrecognised content starting {head[:8]!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidImage(f"cannot read image header: {_describe(e)}") from None


def _describe(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    lowered = msg.lower()
    if "truncated" in lowered or "premature end" in lowered or isinstance(e, EOFError):
        return f"truncated or damaged file ({msg})"
    return msg


def _oriented_size(img: Image.Image, w: int, h: int) -> tuple[int, int]:
    # exif_transpose may have swapped the axes; report the size as the photo is seen.
    rw, rh = img.size
    return (h, w) if (rw > rh) != (w > h) and rw != rh else (w, h)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping (Pillow's convert clips).
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or mode != "I" else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
