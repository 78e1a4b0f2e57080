"""Sample grids as PNG files (pillow)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orw_fast.checkpoint import write_bytes_atomic
from orw_fast.rewards import to_uint8_images


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> Image.Image:
    """A grid of model-space images x [B, C, H, W] in [-1, 1] (values outside are clipped)."""
    images = to_uint8_images(x)  # [B, H, W, C] uint8
    b, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_image_grid(x: torch.Tensor, path, nrow: int | None = None, scale: int = 1) -> Path:
    """Writes image_grid(x) to ``path`` (PNG), enlarged ``scale`` times (nearest), atomically."""
    img = image_grid(x, nrow)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return write_bytes_atomic(path, lambda f: img.save(f, format="PNG"))
