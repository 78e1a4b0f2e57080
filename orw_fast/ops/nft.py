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

Where the reference code (scripts/train_nft_sd3.py) differs, and what orw_fast does instead:
- It divides each branch's squared x̂-error by an *adaptive weight*, computed per sample from the same branch:
  ω± = max(mean_d |x̂±(x_σ) - x_data|, 1e-5), in float64 under no_grad (detached: a constant per sample). In our
  convention ω± = max((1 - t) mean_d |v± - u|, 1e-5), so its positive term is
  (1 - t) mean_d (v+ - u)^2 / max(mean_d |v+ - u|, 1e-5 / (1 - t)). orw_fast does not apply it: it depends on an
  L1 reduction over the sample's own elements, so the gradient could be written only after that reduction — a
  second read of v, u, v_old (a pass computing the two L1 sums, then the gradient pass: 7 tensor reads instead of
  4, ~1.6x the traffic of the one-pass op). The plain velocity form above is the paper's loss before that
  reweighting; a caller wanting a per-time weight scales the loss.
- It multiplies the policy term by adv_clip_max (5); here that constant is left to the learning rate.
- Its KL weight (train.beta, 1e-4) is our α; the β above is its config.beta (1 or 0.1).
See docs/objectives.md.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from orw_fast.ops.orw_cfm_w2 import _check_predictions
from orw_fast.ops.quadratic_fm import PolicyComponents, fused_quadratic_fm, resolve_backend
from orw_fast.ops.reward_weights import _is_capturing_or_compiling, accumulation_dtype, check_real, check_scores


def nft_optimality(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """r = clamp(A, -clip, clip) / (2 clip) + 1/2 ∈ [0, 1], DiffusionNFT's optimality probability of each
    sample from its (group-normalised) advantage; clip > 0 (the paper's adv_clip_max, 5)."""
    check_scores(advantages, "advantages", None, None, True)
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    return advantages.detach().clamp(-clip, clip) / (2 * clip) + 0.5


def _eager(v, u, v_old, v_ref, r, beta, alpha):
    """The formula as written, accumulating in float32 (float64 for float64 inputs)."""
    acc = r.dtype
    v, u, v_old, v_ref = (t.to(acc) for t in (v, u, v_old, v_ref))
    batch = v.shape[0]
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    pos = (positive - u).reshape(batch, -1).pow(2).mean(1)
    neg = (negative - u).reshape(batch, -1).pow(2).mean(1)
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
):
    """DiffusionNFT loss ``mean_i (1/β)[r_i |v+ - u|^2 + (1-r_i) |v- - u|^2] + α mean_i |v - v_ref|^2``
    (per-dimension means; v+ = (1-β) v_old + β v, v- = (1+β) v_old - β v).

    Args:
        v: policy prediction v_θ(t, x_t), [B, ...], floating (fp16/bf16/fp32/fp64).
        u: target u = x1 - x0; v_old: old-policy prediction; v_ref: reference prediction — all of v's shape,
            on v's device (pass v_old and v_ref detached; any that requires grad gets one).
        r: [B] optimality probabilities in [0, 1] (:func:`nft_optimality` of the advantages); never
            differentiated.
        beta: β > 0, finite.  alpha: KL coefficient α >= 0.
        backend: "auto" | "eager" | "native" | "triton".
        return_components: also return :class:`PolicyComponents` (policy_i, kl_i) from the same pass.
        validate: check that r is finite and in [0, 1] (one device sync on CUDA; skipped while torch.compile
            traces or a CUDA graph is captured).

    Returns:
        the loss, 0-dim, in float32 (float64 for float64 inputs); with ``return_components`` a tuple
        ``(loss, PolicyComponents)``. Gradients reach the inputs that require grad, in their own dtype.
    """
    _check_predictions(v, u, v_ref, v_old=v_old)
    acc = accumulation_dtype(functools.reduce(torch.promote_types, (t.dtype for t in (u, v_old, v_ref)), v.dtype))
    beta = check_real(beta, "beta", acc)
    if not 1 / torch.finfo(acc).max < beta:  # 1/beta is a coefficient of the kernels: finite in acc
        raise ValueError(f"beta must be a finite number > 0 with 1/beta finite in {acc}, got {beta!r}")
    alpha = check_real(alpha, "alpha", acc, minimum=0)
    check_scores(r, "r", v.shape[0], v.device, validate)
    r = r.detach().to(acc)
    if validate and not _is_capturing_or_compiling() and bool(((r < 0) | (r > 1)).any()):
        raise ValueError("r must lie in [0, 1] (optimality probabilities; see nft_optimality)")
    backend = resolve_backend(backend, v.device)
    if backend == "eager":
        loss, parts = _eager(v, u, v_old, v_ref, r, beta, alpha)
    else:
        coef = torch.stack(
            [r / beta, torch.full_like(r, beta), (1 - r) / beta, torch.full_like(r, -beta), torch.zeros_like(r)]
        )
        loss, parts = fused_quadratic_fm(v, u, v_old, v_ref, coef, alpha, backend)
    return (loss, parts) if return_components else loss
