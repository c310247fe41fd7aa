"""Pictures drawn with PIL: the contact sheet of the lowest-confidence images and the
annotated image of `ics show`. Images are decoded by the project's Preprocessor (its
limits, checked before decoding); one that cannot be read or decoded gets a placeholder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import IcsError
from ..imaging import Preprocessor
from ..logs import printable
from ..types import Prediction
from .rows import ReportRow

TILE = 192
CAPTION = 78
COLUMNS = 6
BACKGROUND = (255, 255, 255)
INK = (33, 33, 33)
BAR = (21, 101, 192)
PLACEHOLDER = (224, 224, 224)


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> str:
    """The text cut with an ellipsis to fit `width` pixels."""
    text = printable(text)
    if draw.textlength(text, font=font(size)) <= width:
        return text
    while text and draw.textlength(text + "…", font=font(size)) > width:
        text = text[:-1]
    return text + "…"


def thumbnail(row: ReportRow, preprocessor: Preprocessor) -> Image.Image:
    """The row's image as the model saw it (resized and centre-cropped), or a placeholder."""
    if row.fetch is None:
        return _placeholder("no image")
    try:
        img, _ = preprocessor.decode(row.fetch())
    except IcsError as e:
        return _placeholder(e.type)
    except Exception as e:  # one unreadable image (bad base64, I/O) must not end the sheet
        return _placeholder(type(e).__name__)
    return img.resize((TILE, TILE))


def _placeholder(reason: str) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE), PLACEHOLDER)
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, TILE, TILE), fill=(189, 189, 189), width=2)
    draw.line((0, TILE, TILE, 0), fill=(189, 189, 189), width=2)
    draw.text((TILE / 2, TILE / 2), "image unavailable", fill=INK, font=font(13), anchor="md")
    text = _fit(draw, reason, TILE - 8, 12)
    draw.text((TILE / 2, TILE / 2 + 4), text, fill=INK, font=font(12), anchor="ma")
    return tile


def tile_name(row: ReportRow) -> str:
    """What names a tile's image: its file's name (the last part of a path or URL), or the
    whole URI when it is no path (a capture record's EXECUTION_ID/ITEM_ID)."""
    uri = row.uri or "?"
    if uri.startswith("/") or "://" in uri:
        return uri.rstrip("/").rsplit("/", 1)[-1] or uri
    return uri


def contact_sheet(rows: Sequence[ReportRow], preprocessor: Preprocessor, path: Path) -> None:
    """A grid of the rows' images, each captioned with its top 3 labels and confidences."""
    if not rows:
        sheet = Image.new("RGB", (TILE * 3, TILE), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        draw.text(
            (TILE * 1.5, TILE / 2),
            "no classified items: no images to show",
            fill=INK,
            font=font(16),
            anchor="mm",
        )
        sheet.save(path, format="PNG")
        return
    columns = min(COLUMNS, len(rows))
    lines = math.ceil(len(rows) / columns)
    cell_w, cell_h = TILE + 8, TILE + CAPTION + 8
    sheet = Image.new("RGB", (columns * cell_w, lines * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        x, y = (n % columns) * cell_w + 4, (n // columns) * cell_h + 4
        sheet.paste(thumbnail(row, preprocessor), (x, y))
        caption = [f"{c:.1%} {label}" for label, c in row.top_k[:3]] or [
            f"{row.confidence or 0:.1%} {row.label or '?'}"
        ]
        for i, text in enumerate(caption):
            weight = INK if i == 0 else (97, 97, 97)
            draw.text(
                (x, y + TILE + 3 + i * 19), _fit(draw, text, TILE, 13), fill=weight, font=font(13)
            )
        # Which file it is, under its labels: the last line of the caption.
        draw.text(
            (x, y + TILE + 3 + 3 * 19),
            _fit(draw, tile_name(row), TILE, 12),
            fill=(97, 97, 97),
            font=font(12),
        )
    sheet.save(path, format="PNG")


def annotated(image: Image.Image, top_k: Sequence[Prediction], title: str) -> Image.Image:
    """The image with a title and a bar chart of its top-k confidences beside it."""
    panel_w, row_h, pad = 420, 34, 16
    height = max(image.height, pad * 3 + 30 + row_h * len(top_k))
    out = Image.new("RGB", (image.width + panel_w, height + 40), BACKGROUND)
    out.paste(image, (0, 40))
    draw = ImageDraw.Draw(out)
    draw.text((pad, 10), _fit(draw, title, out.width - 2 * pad, 18), fill=INK, font=font(18))
    x0 = image.width + pad
    bar_w = panel_w - 2 * pad
    for i, p in enumerate(top_k):
        y = 40 + pad + i * row_h
        draw.text(
            (x0, y),
            _fit(draw, f"{p.label}  {p.confidence:.1%}", bar_w, 14),
            fill=INK,
            font=font(14),
        )
        draw.rectangle((x0, y + 18, x0 + bar_w, y + 28), fill=(236, 239, 241))
        draw.rectangle((x0, y + 18, x0 + max(1, round(bar_w * p.confidence)), y + 28), fill=BAR)
    return out
