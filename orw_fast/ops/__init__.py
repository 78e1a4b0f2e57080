"""Fused ops of orw_fast, one module per op."""

from orw_fast.ops.advantages import group_advantages
from orw_fast.ops.awm import awm_loss
from orw_fast.ops.nft import nft_loss, nft_optimality
from orw_fast.ops.orw_cfm_w2 import BACKENDS, LossComponents, ORWCFMW2Loss, orw_cfm_w2_loss
from orw_fast.ops.quadratic_fm import PolicyComponents
from orw_fast.ops.reward_weights import WEIGHTINGS, reward_weights

__all__ = [
    "BACKENDS",
    "WEIGHTINGS",
    "LossComponents",
    "ORWCFMW2Loss",
    "PolicyComponents",
    "awm_loss",
    "group_advantages",
    "nft_loss",
    "nft_optimality",
    "orw_cfm_w2_loss",
    "reward_weights",
]
