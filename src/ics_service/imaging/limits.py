"""What an image may cost: the limits (pixels, bytes, decode memory), the decode memory an
opened image needs at its peak, and the budget of it that every decode thread shares.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from ..config import Settings, default
from ..errors import DecodeCancelled


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
ICO_BYTES_PER_PIXEL = 14
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


def raise_pillow_guard(max_pixels: int) -> None:
    """Keep Pillow's global bomb guard at or above max_pixels: it never stops an allowed image."""
    with _PILLOW_GUARD_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def memory_need(img: Image.Image, full: tuple[int, int], file_size: int) -> int:
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
