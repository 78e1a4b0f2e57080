"""Training objectives, one module each, found by name (``TrainerConfig.objective``) in :data:`OBJECTIVES`."""
from orw_fast.objectives.base import (
    OBJECTIVES,
    Objective,
    group_ids,
    make_objective,
    register,
)
from orw_fast.objectives.orw_cfm_w2 import ORWCFMW2

__all__ = ["OBJECTIVES", "ORWCFMW2", "Objective", "group_ids", "make_objective", "register"]
