"""Safe image decoding and model-card preprocessing.

Limits are checked before pixels are decoded; JPEGs are decoded at the smallest DCT scale
that still covers the model's resize size, so a 12-megapixel photo costs about what a
small one does. Decoding runs under a memory budget shared by every decode thread
(`DecodeBudget`): an image is admitted by the memory its decode needs, estimated from its
header, and waits while other images hold it. Every failure becomes an `ItemError` with a
message a person understands.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import struct
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import Settings, default
from .errors import DecodeCancelled, ImageTooLarge, InvalidImage, UnsupportedFormat
from .modelcard import ModelCard
from .types import ImageInfo

# Pillow's decompression-bomb guard (Image.MAX_IMAGE_PIXELS) stays on: it is the last line
# of defence inside plugins that allocate before ICS can look. It is a process-wide global,
# so a Preprocessor only ever raises it to its own max_pixels (_raise_pillow_guard), and
# ICS's own checks (_check_pixels, _declared_size) run first with each run's max_pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Pillow's plugin (PIL.NAMEImagePlugin) of each format decoded. Pillow can open more (EPS,
#: PSD, ...), but those are not photos and some run external programs.
_PLUGINS = {
    "JPEG": "Jpeg",
    "MPO": "Mpo",
    "PNG": "Png",
    "GIF": "Gif",
    "BMP": "Bmp",
    "TIFF": "Tiff",
    "WEBP": "WebP",
    "PPM": "Ppm",
    "ICO": "Ico",
    "TGA": "Tga",
    "AVIF": "Avif",
}
# Only these plugins: Image.init() imports all of Pillow's (about 45), 15 to 35 ms of every
# `ics classify` start-up, for formats that Image.open(formats=FORMATS) never tries.
for _plugin in _PLUGINS.values():
    with contextlib.suppress(ImportError):  # an older Pillow has no AVIF plugin
        importlib.import_module(f"PIL.{_plugin}ImagePlugin")
#: Formats decoded: those whose plugin this Pillow has and registered.
FORMATS = tuple(f for f in _PLUGINS if f in Image.OPEN)

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


# --- decode memory ------------------------------------------------------------------------

#: Peak bytes per pixel of loading an image that Pillow decodes in this mode, orienting it
#: (EXIF, in place), converting it to RGB and resizing it, pixels counted after JPEG draft
#: scaling. Measured as VmHWM (peak RSS) minus VmRSS just before the decode, in a fresh
#: process that had decoded the same file once (then malloc_trim and /proc/self/clear_refs),
#: on 4- and 16-megapixel PNG, GIF, TIFF, BMP, TGA and PPM files and JPEGs, with Pillow 13.0
#: and numpy 2 on Linux: the larger measure in the comment, rounded up with a margin. Pillow
#: keeps RGB, LA and CMYK in 4 bytes a pixel; an EXIF rotation holds two copies for a
#: moment; the resize's first reduction holds up to 1 byte a pixel.
_BYTES_PER_PIXEL: dict[str, int] = {
    "1": 7,  # 6.0: 1 byte, then RGB
    "L": 7,  # 6.0
    "P": 7,  # 6.0
    "P+alpha": 11,  # 9.0, later 10.3: a palette with a transparent colour goes through RGBA
    "LA": 13,  # 12.0
    "RGB": 9,  # 5.0; 8.0 and 8.3 when EXIF rotates it
    "RGBX": 9,
    "RGBA": 10,  # 9.0, rotated too
    "CMYK": 10,  # 9.0
    "YCbCr": 10,  # as CMYK: 4 bytes, then RGB
    "I;16": 15,  # 14.0: 16-bit and 32-bit greys are scaled through a float64 array
    "I;16B": 15,
    "I;16L": 15,
    "I;16N": 15,
    "I": 21,  # 20.0
    "F": 18,  # 17.0
}
#: Modes not measured (LAB, HSV, I;16S...): more than the costliest measured one.
_UNKNOWN_MODE_BYTES = 24
#: What a decoder holds on top, per pixel: libwebp two canvases and a copy of the frame
#: (WebP RGB 16.1 in all, RGBA 17.0 lossy to 20.0 lossless); libavif its YUV planes and an
#: RGB copy (AVIF 4:4:4 RGB and 4:2:0 RGBA: 11.0 and 12.0; 6 leaves room for 10- and
#: 12-bit planes).
_DECODER_BYTES: dict[str, int] = {"WEBP": 12, "AVIF": 6}
#: Decoders that keep a copy of the whole file while they decode.
_COPIES_FILE = frozenset(("WEBP", "AVIF"))
#: Pillow decodes an icon inside Image.open, then ICS composites its alpha: 9.0 for a PNG
#: icon, 13.0 for a 32-bit BMP one (Pillow reads its alpha into two more buffers).
_ICO_BYTES_PER_PIXEL = 14
#: Working buffers of the decoders (libjpeg, zlib), whatever the image: 0.2 to 0.5 MB.
_FIXED_BYTES = 1_000_000
#: A progressive JPEG keeps every DCT coefficient (2 bytes) of the full-size image, whatever
#: the draft scale: 3.1 bytes a pixel for 4:2:0 colour.
_COEFFICIENT_BYTES = 2
#: How often a wait with a stop event looks at it.
_POLL_S = 0.1


class DecodeBudget:
    """Bytes of memory that images being decoded may hold at once, shared by threads.

    First come, first served: a big image that waits is not overtaken for ever by small
    ones. A waiter given a stop event ends with DecodeCancelled once it is set.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        """Decodes waiting for memory now."""
        return len(self._waiting)

    @contextlib.contextmanager
    def reserve(self, need: int, stop: threading.Event | None = None) -> Iterator[None]:
        """Hold `need` bytes for the body of the `with`, waiting for them if need be."""
        self.acquire(need, stop)
        try:
            yield
        finally:
            self.release(need)

    def acquire(self, need: int, stop: threading.Event | None = None) -> None:
        if need > self.limit:
            raise ValueError(f"{need:,} bytes can never fit in a budget of {self.limit:,}")
        with self._cond:
            if not self._waiting and self.used + need <= self.limit:
                self.used += need
                return
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self.used + need > self.limit:
                    if stop is not None and stop.is_set():
                        raise DecodeCancelled(
                            "not decoded: the run stopped while the image waited for decode memory"
                        )
                    self._cond.wait(_POLL_S if stop is not None else None)
                self.used += need
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may fit as well

    def release(self, need: int) -> None:
        with self._cond:
            self.used -= need
            self._cond.notify_all()


_PILLOW_GUARD_LOCK = threading.Lock()


def _raise_pillow_guard(max_pixels: int) -> None:
    """Keep Pillow's global bomb guard at or above max_pixels: it never stops an allowed image."""
    with _PILLOW_GUARD_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


# --- preprocessing ------------------------------------------------------------------------


class Preprocessor:
    """Turns encoded image bytes into the model's normalised input (3, H, W) float32.

    One instance is shared by every decode thread of a run: it owns their decode memory
    budget (`limits.decode_memory`).
    """

    def __init__(self, card: ModelCard, limits: Limits, *, fast_jpeg: bool = True) -> None:
        """`fast_jpeg=False` has Pillow decode JPEGs too (benchmarks/decode_compare.py)."""
        self.card = card
        self.fast_jpeg = fast_jpeg and _simplejpeg() is not None
        self.limits = limits
        self.size = card.input_size
        self.resize_size = card.resize_size
        self.resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
        }[card.interpolation]
        self._mean = np.asarray(card.mean, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(card.std, dtype=np.float32)).reshape(3, 1, 1)
        self.budget = DecodeBudget(limits.decode_memory)
        _raise_pillow_guard(limits.max_pixels)

    def __call__(
        self, data: bytes, stop: threading.Event | None = None
    ) -> tuple[np.ndarray, ImageInfo]:
        img, info = self.decode(data, stop)
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
                    rgb = _decode_jpeg(data, img) if self.fast_jpeg and scaled else None
                    if rgb is None:
                        rgb = self._load_rgb(img)
                    out = self._resize_crop(rgb)
                except (OSError, ValueError, SyntaxError, EOFError) as e:
                    raise InvalidImage(f"cannot decode {fmt} image: {_describe(e)}") from None
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
        declared = _declared_size(data)
        if declared is not None:
            self._check_pixels(*declared)
        if declared is not None and data.startswith(_ICO_MAGIC):
            # Pillow decodes an icon inside Image.open: hold its memory before opening it.
            w, h = declared
            need = w * h * _ICO_BYTES_PER_PIXEL + len(data)
            with self._reserve(need, f"this {w}×{h} icon", stop):
                img = _open(data)
                self._check_pixels(*img.size)
                yield img, img.size
            return
        img = _open(data)
        full = img.size
        self._check_pixels(*full)
        self._draft(img)
        need = _memory_need(img, full, len(data))
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


# --- JPEG through simplejpeg ---------------------------------------------------------------
# simplejpeg's libjpeg-turbo decodes at the DCT scale that Pillow's draft chose, to the same
# pixels (benchmarks/decode_compare.py checks it), from the bytes in one call: about 4 %
# less CPU than Pillow's decoder on a 12-megapixel photo, 4 % more at full scale (so only
# drafted JPEGs come here). Pillow still reads the header, so every check above runs
# first, and it decodes whatever simplejpeg does not take.

#: EXIF orientation → the transpose that shows the photo upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _simplejpeg() -> Any:
    try:
        import simplejpeg  # type: ignore[import-untyped]
    except ImportError:  # an install without it: Pillow decodes every format
        return None
    return simplejpeg


def _decode_jpeg(data: bytes, img: Image.Image) -> Image.Image | None:
    """The upright RGB pixels of an opened (and drafted) JPEG, or None for Pillow to decode.

    Only YCbCr and greyscale JPEGs: Pillow converts CMYK ones (and Adobe's inverted CMYK).
    A file that libjpeg-turbo finds fault with, even one it could read (strict), is left to
    Pillow as well, which reads what it can and names what is wrong with the rest.
    """
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    w, h = img.size  # the draft's size: the DCT scale is the same
    try:
        arr = _simplejpeg().decode_jpeg(data, "RGB", min_width=w, min_height=h, strict=True)
    except ValueError:
        return None
    if arr.shape[:2] != (h, w):
        return None
    out = Image.fromarray(arr)
    # Freed before a rotation copies it: the memory need counted (_BYTES_PER_PIXEL, RGB)
    # has room for two 4-byte-a-pixel images, not for this array beside them.
    del arr
    method = _UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    return out.transpose(method) if method is not None else out


def _memory_need(img: Image.Image, full: tuple[int, int], file_size: int) -> int:
    """Bytes that decoding this opened (and drafted) image holds at its peak."""
    w, h = img.size
    mode = "P+alpha" if img.mode == "P" and "transparency" in img.info else img.mode
    fmt = img.format or ""
    per_pixel = _BYTES_PER_PIXEL.get(mode, _UNKNOWN_MODE_BYTES) + _DECODER_BYTES.get(fmt, 0)
    need = w * h * per_pixel + _FIXED_BYTES
    if fmt in _COPIES_FILE:
        need += file_size
    if fmt in ("JPEG", "MPO") and "progressive" in img.info:
        need += _coefficients(img, full) * _COEFFICIENT_BYTES
    return need


def _coefficients(img: Image.Image, full: tuple[int, int]) -> int:
    """DCT coefficients of a JPEG at full size, from its components' sampling factors."""
    layers: list[tuple[object, int, int, object]] = (
        getattr(img, "layer", None) or [("", 1, 1, 0)] * 4
    )
    h_max = max(h for _, h, _, _ in layers)
    v_max = max(v for _, _, v, _ in layers)
    mcus_x = -(-full[0] // (8 * h_max))
    mcus_y = -(-full[1] // (8 * v_max))
    return sum(mcus_x * h * mcus_y * v * 64 for _, h, v, _ in layers)


# --- what Image.open itself decodes --------------------------------------------------------
# Of the formats decoded here, Pillow's ICO plugin decodes the embedded PNG or BMP inside
# Image.open, and its WebP plugin allocates the canvas (libwebp's WebPAnimDecoder) there.
# The others (JPEG, MPO, PNG and APNG, GIF, BMP, TIFF, PPM, TGA, AVIF) read headers only.

_ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The size of what Image.open itself decodes or allocates, read from the bytes."""
    if data.startswith(_ICO_MAGIC):
        return _ico_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


def _ico_size(data: bytes) -> tuple[int, int] | None:
    """The largest image an icon embeds, by that image's own header.

    The directory's sizes stop at 256 and Pillow trusts the embedded header, so a tiny file
    can hold a PNG that says it is 30000×30000.
    """
    (count,) = struct.unpack_from("<H", data, 4) if len(data) >= 6 else (0,)
    largest: tuple[int, int] | None = None
    for entry in range(6, min(6 + 16 * count, len(data) - 15), 16):
        (offset,) = struct.unpack_from("<I", data, entry + 12)
        size = _embedded_size(data[offset : offset + 24])
        if size is not None and (largest is None or size[0] * size[1] > largest[0] * largest[1]):
            largest = size
    return largest


def _embedded_size(head: bytes) -> tuple[int, int] | None:
    if head.startswith(_PNG_MAGIC):
        if head[12:16] != b"IHDR" or len(head) < 24:
            return None  # Pillow cannot read it either
        w, h = struct.unpack_from(">II", head, 16)
        return w, h
    if len(head) >= 12:  # a BMP without its file header: BITMAPCOREHEADER or larger
        (header_size,) = struct.unpack_from("<I", head)
        w, h = struct.unpack_from("<HH" if header_size == 12 else "<ii", head, 4)
        return abs(w), abs(h) // 2  # the height counts the AND mask below the image too
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size from a WebP's first chunk (as libwebp reads it)."""
    kind = data[12:16]
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a" and len(data) >= 30:
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and data[20:21] == b"\x2f" and len(data) >= 25:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


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
