"""orw_fast: fused kernels and a fast engine for ORW-CFM-W2 (Fan et al., ICLR 2025)."""
from orw_fast.ops import BACKENDS, WEIGHTINGS, LossComponents, ORWCFMW2Loss, orw_cfm_w2_loss, reward_weights

__version__ = "0.1.0"
__all__ = ["BACKENDS", "WEIGHTINGS", "LossComponents", "ORWCFMW2Loss", "orw_cfm_w2_loss", "reward_weights"]
