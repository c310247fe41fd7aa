"""Which files are images, and opening one safely: the formats decoded (only their Pillow
plugins are loaded), signatures to recognise images and name unsupported ones, and the size
of what Image.open itself decodes, read from the bytes before it runs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import struct
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import InvalidImage, UnsupportedFormat

# Pillow's decompression-bomb guard (Image.MAX_IMAGE_PIXELS) stays on: it is the last line
# of defence inside plugins that allocate before ICS can look. It is a process-wide global,
# so a Preprocessor only ever raises it to its own max_pixels (limits.raise_pillow_guard), and
# ICS's own checks (Preprocessor._check_pixels, declared_size) run first with each run's max_pixels.
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


# --- what Image.open itself decodes --------------------------------------------------------
# Of the formats decoded here, Pillow's ICO plugin decodes the embedded PNG or BMP inside
# Image.open, and its WebP plugin allocates the canvas (libwebp's WebPAnimDecoder) there.
# The others (JPEG, MPO, PNG and APNG, GIF, BMP, TIFF, PPM, TGA, AVIF) read headers only.

ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def declared_size(data: bytes) -> tuple[int, int] | None:
    """The size of what Image.open itself decodes or allocates, read from the bytes."""
    if data.startswith(ICO_MAGIC):
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


def open_image(data: bytes) -> Image.Image:
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
        raise InvalidImage(f"cannot read image header: {describe(e)}") from None


def describe(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    lowered = msg.lower()
    if "truncated" in lowered or "premature end" in lowered or isinstance(e, EOFError):
        return f"truncated or damaged file ({msg})"
    return msg
