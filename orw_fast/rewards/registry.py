"""Rewards by name, and any callable made into a checked reward function."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from orw_fast.rewards.base import check_rewards
from orw_fast.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility

RewardFn = Callable[[torch.Tensor], torch.Tensor]

REWARDS: dict[str, RewardFn] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


def get_reward(name: str) -> RewardFn:
    """The registered reward function called ``name`` (a key of REWARDS)."""
    if name not in REWARDS:
        raise ValueError(f"reward must be one of {tuple(REWARDS)}, got {name!r}")
    return REWARDS[name]


def as_reward_fn(obj) -> RewardFn:
    """A checked reward function from a registered name or any callable ``images -> rewards``.

    The callable may return a tensor, a list or a numpy array of B numbers. The wrapper returns a detached
    [B] tensor on the images' device (a floating tensor keeps its dtype; anything else becomes float32) and
    raises ValueError for a wrong shape or any non-finite reward.
    """
    if isinstance(obj, str):
        obj = get_reward(obj)
    if not callable(obj):
        raise TypeError(f"reward must be a callable images -> [B] rewards or a name in {tuple(REWARDS)}, got "
                        f"{type(obj).__name__}")

    def reward_fn(images: torch.Tensor) -> torch.Tensor:
        out = obj(images)
        if isinstance(out, torch.Tensor):
            rewards = out.detach() if out.is_floating_point() else out.detach().float()
        else:
            rewards = torch.as_tensor(np.asarray(out, dtype=np.float32))
        check_rewards(rewards, images.shape[0])
        return rewards.to(images.device)

    reward_fn.__wrapped__ = obj
    return reward_fn
