"""The 8x8 handwritten digits of scikit-learn (1797 images, bundled with sklearn: no download)."""

from __future__ import annotations

import torch


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] int64 in 0..9).

    sklearn's pixel values 0..16 map linearly to model space: x / 16 * 2 - 1.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).div_(8.0).sub_(1.0).unsqueeze_(1)
    return images.contiguous(), torch.from_numpy(digits.target).to(torch.int64)
