"""Loads the compiled extension ``orw_fast._C`` and reports which of its kernels exist."""

from __future__ import annotations

import torch

_OPS = ("orw_cfm_w2", "quadratic_fm", "quadratic_fm_norms")

try:
    from orw_fast import _C  # noqa: F401  (loading it registers the torch.ops.orw_fast ops)

    IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # not built: the eager backend still works
    IMPORT_ERROR = err

# Looked up once at import: torch.compile traces a dict lookup, not a dispatcher query.
_KERNELS = {
    (op, device): IMPORT_ERROR is None
    and hasattr(torch.ops.orw_fast, op)  # False for an op that a stale build lacks
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"orw_fast::{op}", device.upper())
    for op in _OPS
    for device in ("cpu", "cuda")
}


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.orw_fast.<op>`` has a compiled kernel for ``device_type`` ("cpu"/"cuda")."""
    return _KERNELS.get((op, device_type), False)
