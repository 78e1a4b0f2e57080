"""Training objectives, one module each, found by name (``TrainerConfig.objective``) in :data:`OBJECTIVES`."""

from orw_fast.objectives.awm import AWM
from orw_fast.objectives.base import (
    OBJECTIVES,
    Objective,
    group_ids,
    grouped_advantages,
    make_objective,
    register,
)
from orw_fast.objectives.nft import NFT
from orw_fast.objectives.orw_cfm_w2 import ORWCFMW2

__all__ = [
    "AWM",
    "NFT",
    "OBJECTIVES",
    "ORWCFMW2",
    "Objective",
    "group_ids",
    "grouped_advantages",
    "make_objective",
    "register",
]
