"""DiffusionNFT's loss (Zheng et al., arXiv 2509.16117) in orw_fast's convention, fused.

Convention: t = 0 noise, t = 1 data, x_t = t x1 + (1 - t) x0, u = x1 - x0, x̂1 = x_t + (1 - t) v, so
x̂1 - x1 = (1 - t)(v - u). The paper and NVlabs/DiffusionNFT write x_σ = (1 - σ) x_data + σ ε with σ = 1 - t and
predict ε - x_data = -v; their x0_prediction = x_σ - σ·pred is our x̂1, so each of their squared x̂-errors is
(1 - t)^2 |v - u|^2 in ours.

Per sample i, with the frozen old policy v_old (an EMA of the policy in the paper), β > 0 and r_i ∈ [0, 1]:

    v+ = (1 - β) v_old + β v,   v- = (1 + β) v_old - β v                (implicit positive / negative policy)
    r_i = clamp(A_i, -c, c) / (2c) + 1/2                                  (c = adv_clip_max, A the advantage)
    policy_i = (1/β) [ r_i mean_d (v+ - u)^2 + (1 - r_i) mean_d (v- - u)^2 ]
    loss = mean_i policy_i + α mean_i mean_d (v - v_ref)^2

With a = v_old - u and d = β (v - v_old): β policy_i = |a|^2 + |d|^2 + 2 (2 r_i - 1) <a, d> (per-dimension
means); the kernel (ops/quadratic_fm.py) takes it as the two squares w1 = r/β, m1 = β, w2 = (1 - r)/β,
m2 = -β. The 1/β keeps the gradient at v = v_old equal to 2 (2r - 1)(v_old - u) / D for every β (r = 1: plain
flow matching toward u). ORW-CFM-W2 is the r = 1, β = 1 case (v+ = v, v_old drops out) with its reward weights in front.

The adaptive weight (``adaptive_scale``, the reference code's recipe; the nft objective passes it by default).
scripts/train_nft_sd3.py divides each branch's squared x̂-error by a weight from the same branch,
ω± = max(mean_d |x̂± - x_data|, 1e-5), computed in float64 under no_grad (a constant per sample). In our convention,
with s = 1 - t: x̂± - x1 = s (v± - u), so the branch term (1 - t)^2 mean_d (v± - u)^2 / ω± is

    policy_i = (1/β) [ r_i f+_i mean_d (v+ - u)^2 + (1 - r_i) f-_i mean_d (v- - u)^2 ],
    f±_i = s_i^2 / max(s_i mean_d |v± - u|, 1e-5)       (no gradient through f±)

computed as s / max(mean_d |v± - u|, 1e-5 / s): no s^2 is formed, and at s = 0 (t = 1, the data end) 1e-5 / s is
inf and f = 0 exactly — the branch has no x̂-error there (x̂1 = x_t = x1 whatever v is), so the sample gives the
policy term nothing (its KL term stays). Where s mean_d |v± - u| < 1e-5 the floor gives f = s^2 / 1e-5: a near
exact branch is not blown up. The weights need an L1 reduction over each sample's own elements before its
gradient can be written: the fused backends pass s as a sixth row of the quadratic_fm op's coefficients, and the op
computes mean_d |a + m1 e| and mean_d |a + m2 e| (= mean_d |v± - u|) first, then the gradient pass with w1, w2
rescaled (ops/quadratic_fm.py: on the CPU per sample while its inputs are in the cache; on a GPU a separate
quadratic_fm_norms launch, 7 tensor reads instead of 4). Without s the op is exactly the plain loss (bit-identical).
Its L1 sums accumulate in float32 for fp16/bf16/fp32 inputs (float64 for float64), not float64 as the reference's.

Where the reference code still differs, and what orw_fast does instead:
- It multiplies the policy term by adv_clip_max (5); here that constant is left to the learning rate.
- Its KL weight (train.beta, 1e-4) is our α; the β above is its config.beta (1 or 0.1).
- Without ``adaptive_scale`` the loss is the plain velocity form above (no (1 - t)^2 and no ω: the paper's loss
  before that reweighting).
See docs/objectives.md.
"""

from __future__ import annotations

import math
import numbers

import torch

from orw_fast.ops.orw_cfm_w2 import _check_predictions
from orw_fast.ops.quadratic_fm import PolicyComponents, adaptive_factor, fused_quadratic_fm, resolve_backend
from orw_fast.ops.reward_weights import (
    _is_capturing_or_compiling,
    accumulation_dtype,
    as_constant,
    check_real,
    check_scores,
    common_dtype,
    largest_finite,
)


def nft_optimality(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """r = clamp(A, -clip, clip) / (2 clip) + 1/2 ∈ [0, 1], DiffusionNFT's optimality probability of each
    sample from its (group-normalised) advantage; clip > 0 (the paper's adv_clip_max, 5)."""
    check_scores(advantages, "advantages", None, None, True)
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    return advantages.detach().clamp(-clip, clip) / (2 * clip) + 0.5


def _eager(v, u, v_old, v_ref, r, beta, alpha, s=None):
    """The formula as written, accumulating in float32 (float64 for float64 inputs)."""
    acc = r.dtype
    v, u, v_old, v_ref = (t.to(acc) for t in (v, u, v_old, v_ref))
    batch = v.shape[0]
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    pos = (positive - u).reshape(batch, -1).pow(2).mean(1)
    neg = (negative - u).reshape(batch, -1).pow(2).mean(1)
    if s is not None:  # the adaptive weights, constants per sample
        with torch.no_grad():
            f_pos = adaptive_factor((positive - u).reshape(batch, -1).abs().mean(1), s)
            f_neg = adaptive_factor((negative - u).reshape(batch, -1).abs().mean(1), s)
        pos, neg = pos * f_pos, neg * f_neg
    policy = (r * pos + (1 - r) * neg) / beta
    kl = (v - v_ref).reshape(batch, -1).pow(2).mean(1)
    return (policy + alpha * kl).mean(), PolicyComponents(policy.detach(), kl.detach())


def nft_loss(
    v: torch.Tensor,
    u: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    alpha: float = 0.0,
    backend: str = "auto",
    return_components: bool = False,
    validate: bool = True,
    adaptive_scale: torch.Tensor | None = None,
):
    """DiffusionNFT loss ``mean_i (1/β)[r_i |v+ - u|^2 + (1-r_i) |v- - u|^2] + α mean_i |v - v_ref|^2``
    (per-dimension means; v+ = (1-β) v_old + β v, v- = (1+β) v_old - β v), with each branch's square optionally
    scaled by the reference code's detached adaptive weight (``adaptive_scale``).

    Args:
        v: policy prediction v_θ(t, x_t), [B, ...], floating (fp16/bf16/fp32/fp64).
        u: target u = x1 - x0; v_old: old-policy prediction; v_ref: reference prediction — all of v's shape,
            on v's device (pass v_old and v_ref detached; any that requires grad gets one).
        r: [B] optimality probabilities in [0, 1] (:func:`nft_optimality` of the advantages); never
            differentiated.
        beta: β > 0, finite.  alpha: KL coefficient α >= 0.
        backend: "auto" | "eager" | "native" | "triton".
        return_components: also return :class:`PolicyComponents` (policy_i, kl_i) from the same pass (policy_i with
            the adaptive weights when given).
        validate: check that r is finite and in [0, 1] and adaptive_scale finite and >= 0 (one device sync on CUDA;
            skipped while torch.compile traces or a CUDA graph is captured).
        adaptive_scale: None (the plain loss above), or s = 1 - t [B] >= 0 (the path times' distance to the data
            end), never differentiated: each branch's mean square is multiplied by the detached
            s^2 / max(s mean_d |v± - u|, 1e-5), the reference code's adaptive weight (0 where s = 0; module
            docstring), computed by the fused op in the same call (its coefficients' sixth row).

    Returns:
        the loss, 0-dim, in float32 (float64 for float64 inputs); with ``return_components`` a tuple
        ``(loss, PolicyComponents)``. Gradients reach the inputs that require grad, in their own dtype.
    """
    _check_predictions(v, u, v_ref, v_old=v_old)
    acc = accumulation_dtype(common_dtype(v, u, v_old, v_ref))
    beta = check_real(beta, "beta", acc)
    if not 1 / largest_finite(acc) < beta:  # 1/beta is a coefficient of the kernels: finite in acc
        raise ValueError(f"beta must be a finite number > 0 with 1/beta finite in {acc}, got {beta!r}")
    alpha = check_real(alpha, "alpha", acc, minimum=0)
    check_scores(r, "r", v.shape[0], v.device, validate)
    r = as_constant(r, acc)
    if validate and not _is_capturing_or_compiling() and bool(((r < 0) | (r > 1)).any()):
        raise ValueError("r must lie in [0, 1] (optimality probabilities; see nft_optimality)")
    s = None
    if adaptive_scale is not None:
        check_scores(adaptive_scale, "adaptive_scale", v.shape[0], v.device, validate)
        s = as_constant(adaptive_scale, acc)
        if validate and not _is_capturing_or_compiling() and bool((s < 0).any()):
            raise ValueError("adaptive_scale must be >= 0 (s = 1 - t, the path time's distance to the data end)")
    backend = resolve_backend(backend, v.device, adaptive=s is not None)
    if backend == "eager":
        loss, parts = _eager(v, u, v_old, v_ref, r, beta, alpha, s)
    else:
        rest = torch.rsub(r, 1)  # 1 - r, without the Python-level wrapper of the reflected operator
        rows = [r / beta, torch.full_like(r, beta), rest / beta, torch.full_like(r, -beta), torch.zeros_like(r)]
        # with s, the op's adaptive form: the L1 norms of v+ - u, v- - u first, in the same call
        coef = torch.stack(rows if s is None else [*rows, s])
        loss, parts = fused_quadratic_fm(v, u, v_old, v_ref, coef, alpha, backend)
    return (loss, parts) if return_components else loss
