"""Group-normalised advantages: the reward normaliser shared by the NFT and AWM objectives.

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        g = the group of sample i

as Flow-GRPO, DiffusionNFT and AWM compute them (their ``PerPromptStatTracker``: population std, ddof = 0,
eps = 1e-4). A group is ``group_size`` consecutive samples (the samples of one prompt); ``group_size=None``
makes the whole batch one group (an unconditional model, or the papers' non-per-prompt branch).
``std="batch"`` divides by the std of the whole batch instead of the group's (AWM's ``global_std``).
``clip=c`` clamps A to [-c, c] (both papers' ``adv_clip_max``, 5 by default there).

A group whose rewards are all equal has advantage exactly 0 (not rounding noise divided by eps).

The function is pure in the full reward vector: under torchrun all-gather the rewards first
(``orw_fast.distributed.all_gather_cat``), normalise the gathered vector on every rank and keep the rank's
share; this equals normalising the whole batch in one process. The gathered vector is in rank order, so each
group must be ``group_size`` consecutive entries of it (e.g. every rank holds whole groups).
"""

from __future__ import annotations

import math
import numbers

import torch

STDS = ("group", "batch")


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
    std: str = "group",
) -> torch.Tensor:
    """Advantages [B] of rewards [B] (no gradient), in float64 for float64 rewards, else float32.

    Args:
        rewards: finite floating [B] tensor, groups of ``group_size`` consecutive samples.
        group_size: samples per group (must divide B); None: the whole batch is one group.
        eps: added to the std, > 0.  clip: clamp the advantages to [-clip, clip] (> 0), or None.
        std: "group" (each group's own std) or "batch" (the std of the whole batch).

    Computed in float64 whatever the input dtype. Raises TypeError / ValueError naming the argument.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor of shape [B], got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty [B] tensor, got shape {list(rewards.shape)}")
    batch = rewards.shape[0]
    if group_size is None:
        group_size = batch
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if batch % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {batch} rewards")
    eps = _positive(eps, "eps")
    if clip is not None:
        clip = _positive(clip, "clip")
    if std not in STDS:
        raise ValueError(f"std must be one of {STDS}, got {std!r}")
    bad = int((~torch.isfinite(rewards)).sum())
    if bad:
        raise ValueError(f"rewards has {bad} non-finite value(s) (NaN or inf) out of {batch}")

    r = rewards.detach().double().reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    spread = r.std(dim=1, correction=0, keepdim=True) if std == "group" else r.std(correction=0)
    adv = centred / (spread + eps)
    # A constant group: r - mean is rounding noise (the mean of equal floats need not be that float).
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(batch).to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
