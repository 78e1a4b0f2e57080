"""Loads the compiled extension ``orw_fast._C`` and reports which of its kernels exist."""
from __future__ import annotations

import torch

try:
    from orw_fast import _C  # noqa: F401  (loading it registers the torch.ops.orw_fast ops)

    IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # not built: the eager backend still works
    IMPORT_ERROR = err


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.orw_fast.<op>`` has a compiled kernel for ``device_type`` ("cpu"/"cuda")."""
    if IMPORT_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"orw_fast::{op}", device_type.upper())
