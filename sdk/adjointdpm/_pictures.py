"""PNGs a person can look at: small images upscaled (nearest neighbour, so pixels stay pixels)
and labeled grids (classes, before/after). Pillow is an SDK dependency."""

from __future__ import annotations

import io
import math
from typing import Sequence

__all__ = ["auto_scale", "upscale_png", "labeled_grid"]

MIN_SIDE = 256  # px: an 8×8 digit is a speck on a screen


def auto_scale(png: bytes, min_side: int = MIN_SIDE) -> int:
    """The smallest integer factor that makes the image's shorter side at least ``min_side``."""
    width, height = (int.from_bytes(png[i:i + 4], "big") for i in (16, 20))  # PNG IHDR
    return max(1, math.ceil(min_side / max(1, min(width, height))))


def _open(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _encode(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def upscale_png(png: bytes, scale: int) -> bytes:
    if scale <= 1:
        return png
    from PIL import Image

    image = _open(png)
    return _encode(image.resize((image.width * scale, image.height * scale), Image.NEAREST))


def labeled_grid(rows: Sequence[Sequence[bytes]], *, scale: int, row_labels: Sequence[str] = (),
                 column_labels: Sequence[str] = ()) -> bytes:
    """One PNG: ``rows`` of images (upscaled by ``scale``), a label left of each row and above
    each column."""
    from PIL import Image, ImageDraw, ImageFont

    cells = [[_open(upscale_png(png, scale)) for png in row] for row in rows]
    width = max(c.width for row in cells for c in row)
    height = max(c.height for row in cells for c in row)
    font = ImageFont.load_default()
    left = 8 + max((int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font))
                    for t in row_labels), default=0)
    top, pad = (18 if column_labels else 0), 4
    columns = max(len(row) for row in cells)
    grid = Image.new("RGB", (left + columns * (width + pad), top + len(cells) * (height + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(column_labels[:columns]):
        draw.text((left + j * (width + pad) + 2, 3), text, fill="black", font=font)
    for i, row in enumerate(cells):
        y = top + i * (height + pad)
        if i < len(row_labels):
            draw.text((4, y + height // 2 - 6), row_labels[i], fill="black", font=font)
        for j, cell in enumerate(row):
            grid.paste(cell, (left + j * (width + pad), y))
    return _encode(grid)
