"""Contracts shared by all rewards: images in model space ([-1, 1] floats [B, C, H, W]) in, one finite
reward per image ([B] floating tensor) out."""

from __future__ import annotations

import numpy as np
import torch


def check_images(x, name: str = "images") -> None:
    """Checks that ``x`` is a finite floating tensor [B, C, H, W] with C = 1 (grey) or 3 (RGB)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must be a floating tensor [B, C, H, W] with C = 1 or 3, got {x.dtype} of shape {list(x.shape)}"
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Model-space images [B, C, H, W] in [-1, 1] -> numpy uint8 [B, H, W, C], ((x + 1) / 2 * 255) rounded
    and clamped to [0, 255] (C = 1 stays a trailing axis of 1; PIL mode "L" once squeezed)."""
    check_images(x)
    u8 = ((x.detach().float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def check_rewards(rewards, batch: int) -> None:
    """Checks that ``rewards`` is a floating [batch] tensor with no NaN or inf."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor of shape [B], got {type(rewards).__name__}")
    if not rewards.is_floating_point() or rewards.shape != (batch,):
        raise ValueError(
            f"rewards must be a floating tensor of shape [B] = [{batch}], got {rewards.dtype} "
            f"of shape {list(rewards.shape)}"
        )
    bad = int((~torch.isfinite(rewards)).sum())
    if bad:
        raise ValueError(
            f"{bad} of {batch} rewards are non-finite (NaN or inf); fix the reward function or drop those samples"
        )
