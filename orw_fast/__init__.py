"""orw_fast: fused kernels and a fast engine for ORW-CFM-W2 (Fan et al., ICLR 2025)."""

import importlib

from orw_fast import ops
from orw_fast.ops import *  # noqa: F403 - the fused losses are the package's top-level API (ops.__all__)

__version__ = "0.1.0"

# The engine's heavier parts load on first use, so `import orw_fast` for the loss stays light.
_LAZY = {
    "sample": "orw_fast.sampling",
    "ORWCFMTrainer": "orw_fast.trainer",
    "TrainerConfig": "orw_fast.config",
    "ConfigError": "orw_fast.config",
}

__all__ = [*ops.__all__, *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'orw_fast' has no attribute {name!r}")
