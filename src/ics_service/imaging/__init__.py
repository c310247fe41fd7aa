"""Safe image decoding and model-card preprocessing.

Limits are checked before pixels are decoded; JPEGs are decoded at the smallest DCT scale
that still covers the model's resize size, so a 12-megapixel photo costs about what a
small one does. Decoding runs under a memory budget shared by every decode thread
(`DecodeBudget`): an image is admitted by the memory its decode needs, estimated from its
header, and waits while other images hold it. Every failure becomes an `ItemError` with a
message a person understands.
"""

from __future__ import annotations

from .formats import FORMATS, IMAGE_EXTENSIONS, SNIFF_BYTES, looks_like_image
from .limits import DecodeBudget, Limits
from .preprocess import Preprocessor

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "SNIFF_BYTES",
    "DecodeBudget",
    "Limits",
    "Preprocessor",
    "looks_like_image",
]
