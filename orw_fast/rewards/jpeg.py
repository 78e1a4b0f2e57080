"""JPEG (in)compressibility rewards, DDPO's definition: the size in kB (bytes / 1000) of the uint8 image
saved by PIL as JPEG with quality=95. Images are encoded in a thread pool (PIL releases the GIL)."""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from orw_fast.rewards.base import to_uint8_images

_WORKERS = os.cpu_count() or 1


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """One pool per process: a forked child gets its own (the parent's threads do not survive a fork)."""
    return ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=f"orw_fast_jpeg_{pid}")


def _jpeg_kb_each(images: np.ndarray) -> list[float]:
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_sizes_kb(x: torch.Tensor) -> torch.Tensor:
    """JPEG size in kB of each model-space image [B, C, H, W] (C = 1: mode "L", C = 3: "RGB"), as a
    float32 [B] tensor on x's device, in batch order."""
    images = to_uint8_images(x)
    chunks = np.array_split(images, max(1, min(_WORKERS, len(images))))  # one task per worker: less pool overhead
    sizes = [kb for chunk in _pool(os.getpid()).map(_jpeg_kb_each, chunks) for kb in chunk]
    return torch.tensor(sizes, dtype=torch.float32, device=x.device)


def jpeg_incompressibility(x: torch.Tensor) -> torch.Tensor:
    """Reward = JPEG size in kB (larger is more detailed), float32 [B] on x's device."""
    return jpeg_sizes_kb(x)


def jpeg_compressibility(x: torch.Tensor) -> torch.Tensor:
    """Reward = -JPEG size in kB (larger is simpler), float32 [B] on x's device."""
    return -jpeg_sizes_kb(x)
