"""Sample grids as PNG files (pillow), optionally with a caption (the sample's prompt) under each image."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from orw_fast.checkpoint import write_bytes_atomic
from orw_fast.rewards import to_uint8_images

_LINE = 11  # pixels per caption line of PIL's default font
_CHAR = 6  # its average character width


def image_grid(
    x: torch.Tensor,
    nrow: int | None = None,
    pad: int = 1,
    scale: int = 1,
    captions: list[str] | None = None,
    row_captions: list[str] | None = None,
) -> Image.Image:
    """A grid of model-space images x [B, C, H, W] in [-1, 1] (values outside are clipped), each enlarged ``scale``
    times (nearest); with ``captions`` (B strings) each image has its caption under it, wrapped to its width; with
    ``row_captions`` (one string per row) each row has one under it, across the row."""
    images = to_uint8_images(x)  # [B, H, W, C] uint8
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, c = images.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"captions must have one string per image ({b}), got {len(captions)}")
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    if row_captions is not None:
        if captions is not None or len(row_captions) != rows:
            raise ValueError(f"row_captions must have one string per row ({rows}), without captions")
        captions = [row_captions[i // nrow] if i % nrow == 0 else "" for i in range(b)]
    cell_w = max(w, 8 * _CHAR) if captions is not None and row_captions is None else w
    text_w = nrow * (cell_w + pad) if row_captions is not None else cell_w
    wrapped = [textwrap.wrap(text, max(1, text_w // _CHAR))[:4] or [""] for text in captions or ()]
    text_h = _LINE * max((len(lines) for lines in wrapped), default=0) + (2 if captions is not None else 0)
    grid = np.zeros((rows * (h + text_h + pad) + pad, nrow * (cell_w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + text_h + pad), pad + col * (cell_w + pad)
        grid[top : top + h, left : left + w] = img
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if captions is not None:
        draw, font = ImageDraw.Draw(image), ImageFont.load_default()
        for i, lines in enumerate(wrapped):
            r, col = divmod(i, nrow)
            top, left = pad + r * (h + text_h + pad) + h + 1, pad + col * (cell_w + pad)
            draw.multiline_text(
                (left, top), "\n".join(lines), fill=255 if c == 1 else (255, 255, 255), font=font, spacing=_LINE - 10
            )
    return image


def save_image_grid(
    x: torch.Tensor,
    path,
    nrow: int | None = None,
    scale: int = 1,
    captions: list[str] | None = None,
    row_captions: list[str] | None = None,
) -> Path:
    """Writes :func:`image_grid` of x (enlarged ``scale`` times, captions under the images or rows) to ``path``
    (PNG), atomically."""
    img = image_grid(x, nrow, scale=scale, captions=captions, row_captions=row_captions)
    return write_bytes_atomic(path, lambda f: img.save(f, format="PNG"))
