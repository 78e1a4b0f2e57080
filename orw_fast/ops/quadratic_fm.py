"""The fused two-policy flow-matching loss behind DiffusionNFT and AWM: ``torch.ops.orw_fast.quadratic_fm``.

With a = v_old - u and e = v - v_old (per element), k = v - v_ref, and per-sample coefficients
(w1, m1, w2, m2, w3), x1 = a + m1 e, x2 = a + m2 e:

    policy_i = mean_d (w1 x1^2 + w2 x2^2 + w3 e^2),    kl_i = mean_d k^2,
    loss = mean_i (policy_i + alpha kl_i).

Every loss of the reward-weighted family that mixes the policy v with a frozen old policy v_old is a per-sample
quadratic form in (a, e), here written as two weighted squares and an e^2 term, so one kernel serves them all;
each objective only computes its coefficients [5, B]:

    DiffusionNFT  (1/beta) [r |v+ - u|^2 + (1 - r) |v- - u|^2]   w1 = r/beta, m1 = beta, w2 = (1-r)/beta,
                  (v+ - u = a + beta e, v- - u = a - beta e)       m2 = -beta, w3 = 0
    AWM + EMA KL  A |v - u|^2 + alpha_old |v - v_old|^2          w1 = A, m1 = 1, w2 = 0, m2 = 0, w3 = alpha_old
                  (v - u = a + e)

(As a general form p a^2 + q e^2 + 2 s a e — NFT: p = 1/beta, q = beta, s = 2r - 1, i.e. |a|^2 + |d|^2 +
2(2r - 1)<a, d> over beta with d = beta e — the AWM gradient of v_old would be a difference of two terms of size
|A| that cancel to -alpha_old e: lost in float32 for large advantages. The squares keep each term exact.)

The kernels (C++ CPU and CUDA in csrc/quadratic_fm*, Triton in ops/triton/quadratic_fm.py) read v, u, v_old,
v_ref once, write the requested gradients in the same pass (y1 = w1 x1, y2 = w2 x2, y3 = w3 e, c = 2/(B D):
dv = c (m1 y1 + m2 y2 + y3 + alpha k), du = -c (y1 + y2), dv_old = c ((1 - m1) y1 + (1 - m2) y2 - y3),
dv_ref = -c alpha k) and accumulate in float32 for fp16/bf16 (float64 for float64); backward only scales the
saved gradients (ops/fused_op_support.py).
The per-sample factors are known before the pass (they depend on rewards, not on the velocities), so nothing
needs a second read. ORW-CFM-W2 itself is this form with v_old = v (e = 0, p = w); it keeps its own 3-input op
(orw_cfm_w2) because a fourth read would cost it a quarter more traffic.

The exceptions are the adaptive forms, whose factors depend on each sample's own norms of both squares, a
reduction over the sample that must be complete before any of its gradients is written:

- DiffusionNFT's adaptive weight (ops/nft.py), coef [6, B] (row 5 = s = 1 - t): w1, w2 are first multiplied by
  s / max(mean_d |x1|, 1e-5 / s) and s / max(mean_d |x2|, 1e-5 / s);
- AWM's huber and ghuber weightings (ops/awm.py), ``msq_power`` q != 0: w1, w2 are first multiplied by
  (mean_d x1^2 + 1e-10)^q and (mean_d x2^2 + 1e-10)^q.

Both happen in the same call. The CPU kernel runs one task per sample, its norms and then its gradient pass while
the sample's inputs are still in the cache (a separate norms pass read everything twice from memory and was slower
than torch.compile); a sample with m1 = 1 and w2 = 0 (AWM's) needs only x1 = v - u there, so its norms read v and u,
not v_old (both CPU ops compute x1 so when m1 = 1, and the fused op then skips n_2, which w2 = 0 ignores), and its
gradient pass, adaptive or not, computes x1 = v - u and no x2 term; the CUDA and Triton kernels launch
``torch.ops.orw_fast.quadratic_fm_norms(v, u, v_old, coef, p) -> (n_1, n_2)`` (one read of v, u, v_old,
fixed-order reduction, no autograd; p = 1 or 2) and then the gradient pass with the coefficients of
:func:`adaptive_coef`. With coef [5, B] and q = 0 the op is the plain one, bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from orw_fast import _native
from orw_fast.ops.fused_op_support import allocate_norms_outputs, allocate_quadratic_outputs
from orw_fast.ops.orw_cfm_w2 import _kernel_layout, _resolve_backend

OP = "quadratic_fm"
NORMS_OP = "quadratic_fm_norms"  # the per-sample norms of the two squares' residuals (the adaptive forms)
ADAPTIVE_FLOOR = 1e-5  # NFT's adaptive form: the reference code's lower bound of its weight ω
MSQ_OFFSET = 1e-10  # the msq_power form: the AWM reference's offset of the mean square


class PolicyComponents(NamedTuple):
    """Per-sample diagnostics from the same pass as the loss (no gradient), each [B] in the accumulation
    dtype: ``policy`` the objective's policy term, ``kl`` = mean_d (v - v_ref)^2."""

    policy: torch.Tensor
    kl: torch.Tensor


def _triton_op():
    from orw_fast.ops.triton.quadratic_fm import quadratic_fm_triton

    return quadratic_fm_triton


if _native.IMPORT_ERROR is None and hasattr(torch.ops.orw_fast, OP):  # absent from a stale build
    torch.library.register_fake(f"orw_fast::{OP}", allocate_quadratic_outputs)  # autograd: csrc/fused_autograd.cpp
if _native.IMPORT_ERROR is None and hasattr(torch.ops.orw_fast, NORMS_OP):
    torch.library.register_fake(f"orw_fast::{NORMS_OP}", allocate_norms_outputs)


def adaptive_factor(l1: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """NFT's adaptive factor s^2 / max(s l1, 1e-5) per sample (s = 1 - t >= 0, l1 = mean_d |v± - u|), as
    s / max(l1, 1e-5 / s): no s^2 formed, and exactly 0 at s = 0 (1e-5 / 0 = inf)."""
    return s / torch.maximum(l1, torch.full_like(s, ADAPTIVE_FLOOR) / s)  # a division, as the kernels compute it


def adaptive_coef(coef: torch.Tensor, n_1: torch.Tensor, n_2: torch.Tensor, msq_power: float) -> torch.Tensor:
    """The plain [5, B] coefficients of an adaptive form (module docstring) from the per-sample norms n_1, n_2 [B]
    of quadratic_fm_norms (p = 1 for coef [6, B], else p = 2): w1 and w2 rescaled, as the Triton op does after its
    norms pass (the native op's twin is csrc/quadratic_fm.cpp)."""
    if coef.shape[0] == 6:
        factors = (adaptive_factor(n_1, coef[5]), adaptive_factor(n_2, coef[5]))
    else:
        factors = ((n_1 + MSQ_OFFSET).pow(msq_power), (n_2 + MSQ_OFFSET).pow(msq_power))
    return torch.stack([coef[0] * factors[0], coef[1], coef[2] * factors[1], coef[3], coef[4]])


def fused_quadratic_fm(v, u, v_old, v_ref, coef: torch.Tensor, alpha: float, backend: str, msq_power: float = 0.0):
    """(loss, PolicyComponents) from the native or triton op. ``coef``: [5, B] rows w1, m1, w2, m2, w3 in the
    accumulation dtype, or [6, B] with s as row 5; ``msq_power``: q of the mean-square form (0: none; the adaptive
    forms, module docstring); inputs already checked by the caller; ``backend`` already resolved (not "eager" or
    "auto")."""
    op = torch.ops.orw_fast.quadratic_fm.default if backend == "native" else _triton_op()
    tensors = _kernel_layout(v, u, v_old, v_ref)
    grad_on = torch.is_grad_enabled()
    flags = (grad_on and t.requires_grad for t in tensors)
    loss, policy, kl, *_ = op(*tensors, coef.contiguous(), alpha, *flags, msq_power)
    return loss, PolicyComponents(policy, kl)


def resolve_backend(backend: str, device: torch.device, adaptive: bool = False) -> str:
    """ "eager", "native" or "triton" for ``backend`` on ``device`` (see orw_cfm_w2._resolve_backend); ``adaptive``:
    the caller uses an adaptive form (a build with the quadratic_fm_norms op, built from the same sources, has
    them)."""
    return _resolve_backend(backend, device, NORMS_OP if adaptive else OP)
