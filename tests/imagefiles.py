"""Builders of image files in every shape a user may have, good and broken."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ics_service.samples import load_photo


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def coffee() -> Image.Image:
    return Image.fromarray(load_photo("coffee"))


def jpeg(img: Image.Image | None = None, **kw: object) -> bytes:
    return encode(img or coffee(), "JPEG", quality=kw.pop("quality", 92), **kw)


def rotated_exif_jpeg() -> bytes:
    """Coffee stored rotated 90° with EXIF orientation 6 saying how to show it upright."""
    img = coffee().transpose(Image.Transpose.ROTATE_90)  # stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    return jpeg(img, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return jpeg(coffee().convert("CMYK"))


def grey16_png() -> bytes:
    arr = np.asarray(coffee().convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(arr), "PNG")


def palette_gif() -> bytes:
    return encode(coffee().convert("P", palette=Image.Palette.ADAPTIVE), "GIF")


def rgba_png() -> bytes:
    img = coffee().convert("RGBA")
    img.putalpha(200)
    return encode(img, "PNG")


def multiframe_gif() -> bytes:
    first = coffee().convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("P", first.size, 0)
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second], duration=100)
    return buf.getvalue()


def big_jpeg(size: tuple[int, int] = (4000, 3000)) -> bytes:
    return jpeg(coffee().resize(size, Image.Resampling.BILINEAR), quality=90)


def truncated_jpeg() -> bytes:
    data = jpeg()
    return data[: len(data) // 3]


def png_bomb(side: int = 30_000) -> bytes:
    """A tiny PNG file that claims side×side pixels (900 megapixels for the default)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    row = b"\x00" + b"\x00" * (side // 8 + 1)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def flat_png(size: tuple[int, int], mode: str = "RGBA") -> bytes:
    """A PNG of one colour built row by row: a large image in a small file, made in a moment."""
    colour_type, pixel = {
        "L": (0, b"\x80"),
        "RGB": (2, b"\xc8\x78\x28"),
        "RGBA": (6, b"\xc8\x78\x28\xb4"),
    }[mode]
    w, h = size
    row = b"\x00" + pixel * w  # filter type 0, then the pixels
    comp = zlib.compressobj(1)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def ico(image: bytes) -> bytes:
    """An icon file holding one image (a PNG, or a BMP without its file header)."""
    # The directory says 256×256 (0 means 256); readers take the size from the image itself.
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(image), 6 + 16)
    return header + entry + image


def webp_claiming(size: tuple[int, int]) -> bytes:
    """A small RGBA WebP whose extended header (VP8X) claims a canvas of `size`."""
    data = bytearray(encode(Image.new("RGBA", (16, 16), (10, 20, 30, 128)), "WEBP"))
    assert data[12:16] == b"VP8X"
    data[24:27] = (size[0] - 1).to_bytes(3, "little")
    data[27:30] = (size[1] - 1).to_bytes(3, "little")
    return bytes(data)


def gif_frame_bigger_than_screen(frame: tuple[int, int]) -> bytes:
    """A GIF whose 10×10 screen holds a first frame that claims `frame` (Pillow grows to it)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return screen + descriptor + b"\x02\x02\x44\x01\x00" + b";"


def linked_copies(paths: list[Path], folder: Path) -> list[Path]:
    """A hard link per path in a new `folder`, each under a name of its own (a run
    classifies a file listed twice once): many items, no bytes copied."""
    folder.mkdir()
    copies = [folder / f"{i:04d}-{p.name}" for i, p in enumerate(paths)]
    for path, copy in zip(paths, copies, strict=True):
        os.link(path, copy)
    return copies
