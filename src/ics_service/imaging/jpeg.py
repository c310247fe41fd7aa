"""JPEGs decoded by simplejpeg at the DCT scale that Pillow's draft chose."""

from __future__ import annotations

from typing import Any

from PIL import ExifTags, Image

# --- JPEG through simplejpeg ---------------------------------------------------------------
# simplejpeg's libjpeg-turbo decodes at the DCT scale that Pillow's draft chose, to the same
# pixels (benchmarks/decode_compare.py checks it), from the bytes in one call: about 4 %
# less CPU than Pillow's decoder on a 12-megapixel photo, 4 % more at full scale (so only
# drafted JPEGs come here). Pillow still reads the header, so every check of the Preprocessor runs
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


def simplejpeg() -> Any:
    try:
        import simplejpeg  # type: ignore[import-untyped]
    except ImportError:  # an install without it: Pillow decodes every format
        return None
    return simplejpeg


def decode_jpeg(data: bytes, img: Image.Image) -> Image.Image | None:
    """The upright RGB pixels of an opened (and drafted) JPEG, or None for Pillow to decode.

    Only YCbCr and greyscale JPEGs: Pillow converts CMYK ones (and Adobe's inverted CMYK).
    A file that libjpeg-turbo finds fault with, even one it could read (strict), is left to
    Pillow as well, which reads what it can and names what is wrong with the rest.
    """
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    w, h = img.size  # the draft's size: the DCT scale is the same
    try:
        arr = simplejpeg().decode_jpeg(data, "RGB", min_width=w, min_height=h, strict=True)
    except ValueError:
        return None
    if arr.shape[:2] != (h, w):
        return None
    out = Image.fromarray(arr)
    # Freed before a rotation copies it: the memory need counted (limits, RGB)
    # has room for two 4-byte-a-pixel images, not for this array beside them.
    del arr
    method = _UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    return out.transpose(method) if method is not None else out
