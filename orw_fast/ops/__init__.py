"""Fused ops of orw_fast, one module per op."""
from orw_fast.ops.orw_cfm_w2 import BACKENDS, LossComponents, ORWCFMW2Loss, orw_cfm_w2_loss
from orw_fast.ops.reward_weights import WEIGHTINGS, reward_weights

__all__ = ["BACKENDS", "WEIGHTINGS", "LossComponents", "ORWCFMW2Loss", "orw_cfm_w2_loss", "reward_weights"]
