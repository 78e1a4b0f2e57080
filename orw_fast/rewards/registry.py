"""Rewards by name, and any callable made into a checked reward function."""

from __future__ import annotations

import inspect
from collections.abc import Callable

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


def _as_reward_tensor(out, batch: int) -> torch.Tensor:
    """A reward function's output as a detached [batch] real tensor, or a TypeError/ValueError that says it is
    the reward function's output that is wrong."""
    expected = f"a tensor, numpy array or list of B = {batch} real numbers"
    if isinstance(out, torch.Tensor):
        rewards = out.detach()
    else:
        try:
            array = np.asarray(out)
        except (TypeError, ValueError) as err:  # ragged nesting and the like
            raise TypeError(f"the reward function returned {type(out).__name__}, expected {expected} ({err})") from None
        if array.dtype.kind not in "biuf":
            raise TypeError(
                f"the reward function returned {type(out).__name__} holding {array.dtype} values, expected {expected}"
            )
        rewards = torch.as_tensor(array.astype(np.float32, copy=False) if array.dtype.kind != "f" else array)
    if rewards.is_complex():
        raise TypeError(f"the reward function returned a {rewards.dtype} tensor, expected {expected}")
    if tuple(rewards.shape) != (batch,):
        raise ValueError(
            f"the reward function returned rewards of shape {list(rewards.shape)} for {batch} images, "
            f"expected {expected} (shape [{batch}])"
        )
    return rewards if rewards.is_floating_point() else rewards.float()


def takes_prompts(fn) -> bool:
    """Whether a reward function wants the batch's prompts: it has a parameter named ``prompts``, or two
    positional parameters without defaults (``reward(images, prompts)``)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins and the like: images only
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return any(p.name == "prompts" for p in params) or len(required) >= 2


def as_reward_fn(obj) -> RewardFn:
    """A checked reward function from a registered name or any callable ``images -> rewards``.

    The callable takes the images [B, C, H, W] in [-1, 1], and the batch's B prompts too when it asks for them
    (:func:`takes_prompts`); the wrapper is called as ``reward_fn(images, prompts=None)``. It may return a
    tensor, a list or a numpy array of B real numbers. The wrapper returns a detached
    [B] tensor on the images' device (floating values keep their dtype, so Python floats become float64; integers
    and booleans become float32) and raises TypeError/ValueError naming the reward function's output for anything
    else (strings, dicts, nested lists, a wrong length) and ValueError for any non-finite reward.
    """
    if isinstance(obj, str):
        obj = get_reward(obj)
    if not callable(obj):
        raise TypeError(
            f"reward must be a callable images -> [B] rewards or a name in {tuple(REWARDS)}, got {type(obj).__name__}"
        )

    with_prompts = takes_prompts(obj)

    def reward_fn(images: torch.Tensor, prompts=None) -> torch.Tensor:
        rewards = _as_reward_tensor(obj(images, prompts) if with_prompts else obj(images), images.shape[0])
        check_rewards(rewards, images.shape[0])
        return rewards.to(images.device)

    reward_fn.__wrapped__ = obj
    return reward_fn
