"""Advantage Weighted Matching (Xue et al., arXiv 2509.25050) in orw_fast's convention, fused.

Convention: t = 0 noise, t = 1 data, u = x1 - x0; the reference code (scxue/advantage_weighted_matching,
scripts/train_sd3_awm.py) uses σ = 1 - t and predicts ε - x_data = -v, so its |pred - (ε - x_data)|^2 is our
|v - u|^2.

What the reference code computes, per sample i and trained time:
- advantages A_i: (R_i - mean_g R) / (std_g R + 1e-4) per prompt group (population std; ``global_std`` uses the
  batch's std), clipped to [-adv_clip_max, adv_clip_max] (5) and rescaled by advantage_max / adv_clip_max;
- ℓ_i = -mean_d (v - u)^2 (weighting "Uniform"; "t", "t**2" multiply by σ or σ^2, "huber"/"ghuber" transform the
  mean), its "log-probability";
- ratio ρ_i = exp(ℓ_i - ℓ_old_i) with ℓ_old = ℓ detached (on-policy, the published configs) or from the EMA
  adapter (off_policy), and the PPO objective mean_i max(-A_i ρ_i, -A_i clip(ρ_i, 1 - ε, 1 + ε));
- + β mean_i mean_d (v - v_ref)^2 (kl_weight "Uniform"; "ELBO" divides by 2 σ_t^2)
  + ema_beta mean_i mean_d (v - v_ema)^2 (an EMA of the policy; ema_beta = 1 in the published configs).

On-policy ρ = 1 in value, strictly inside the clip range, so the PPO term's gradient is -A_i ∇ρ_i = -A_i ∇ℓ_i:
the gradient of A_i mean_d (v - u)^2 — flow matching weighted by signed advantages. orw_fast's AWM loss is that,
with the two penalties (α = β, α_old = ema_beta, v_old = v_ema):

    loss = mean_i [ A_i mean_d (v - u)^2 + α_old mean_d (v - v_old)^2 ] + α mean_i mean_d (v - v_ref)^2

Its gradients equal the reference's on-policy loss with the "Uniform" weighting; its value differs by a constant
(the reference's policy term is -mean A there). Without v_old it is ORW-CFM-W2 with the signed advantages as given
weights (the 3-input orw_cfm_w2 op); with v_old it is ops/quadratic_fm.py with w1 = A, m1 = 1, w2 = 0, m2 = 0,
w3 = α_old.

The reference's other weightings (``weighting``; the published configs use "ghuber" with power 0.25) make ℓ_i a
function g of mse_i = mean_d (v - u)^2 and of the sample's noise level σ_i = 1 - t_i. On-policy the PPO term's
gradient is then -A_i ∇ℓ_i = A_i f_i ∇mse_i with the per-sample factor f_i = -dℓ_i/dmse_i:

    weighting   ℓ_i                                      f_i
    uniform     -mse                                     1
    t           -σ mse                                   σ
    t**2        -σ^2 mse                                 σ^2
    huber       -(sqrt(mse + 1e-10) - 1e-5) σ            σ / (2 sqrt(mse + 1e-10))
    ghuber      -((mse + 1e-10)^p - 1e-10^p) σ / p       σ (mse + 1e-10)^(p - 1)

so the loss trained is the one above with A_i replaced by the detached weight A_i f_i (its value is
mean_i A_i f_i mse_i + the penalties: the reference's gradient, not its value, which is the constant -mean A).
"huber" and "ghuber" need mse_i before any gradient of the sample can be written. Their factor is
c_i (mse_i + 1e-10)^q with c_i = σ_i, q = p - 1 (ghuber) or c_i = σ_i / 2, q = -1/2 (huber): the fused backends
pass w1 = A_i c_i and q as the quadratic_fm op's ``msq_power`` (ops/quadratic_fm.py), which computes each sample's
mean square of v - u and then its gradient pass in the same call (on the CPU per sample while its inputs are in the
cache: one read of each input; on a GPU a norms launch first, 3 more tensor reads). Without v_old the op gets u as
v_old (a = 0, e = v - u; w3 = 0), so that read hits the cache.
Not covered: the off-policy ratio (its factor exp(ℓ - ℓ_old) needs the same first pass, with the EMA's ℓ_old).
docs/objectives.md lists the other differences (trained times, advantage scale).
"""

from __future__ import annotations

import numbers

import torch

from orw_fast.ops.orw_cfm_w2 import _check_predictions, orw_cfm_w2_loss
from orw_fast.ops.quadratic_fm import MSQ_OFFSET, PolicyComponents, fused_quadratic_fm, resolve_backend
from orw_fast.ops.reward_weights import (
    _is_capturing_or_compiling,
    accumulation_dtype,
    as_constant,
    check_real,
    check_scores,
    common_dtype,
)

WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")  # the reference code's config.train.weighting, lower-cased


def weighting_factor(
    weighting: str, mse: torch.Tensor | None, sigma: torch.Tensor | None, power: float
) -> torch.Tensor:
    """f_i = -dℓ_i/dmse_i of the reference's ``weighting`` (module docstring) per sample, from mse [B] (read by
    "uniform", "huber" and "ghuber" only) and the noise levels σ = 1 - t [B] (unused by "uniform"), in their dtype;
    ``power`` is ghuber's p."""
    if weighting == "uniform":
        return torch.ones_like(mse)
    if weighting == "t":
        return sigma
    if weighting == "t**2":
        return sigma.square()
    scale, q = mse_form(weighting, sigma, power)
    return scale * (mse + MSQ_OFFSET).pow(q)


def mse_form(weighting: str, sigma: torch.Tensor, power: float) -> tuple[torch.Tensor, float]:
    """(c_i [B], q) with f_i = c_i (mse_i + 1e-10)^q for "huber" (σ/2, -1/2) and "ghuber" (σ, p - 1): the per-sample
    scale and the exponent the fused op's msq_power form takes."""
    return (sigma / 2, -0.5) if weighting == "huber" else (sigma, power - 1)


def _eager(v, u, v_ref, adv, alpha, v_old, alpha_old, weighting="uniform", sigma=None, power=0.25):
    """The formula as written, accumulating in float32 (float64 for float64 inputs)."""
    acc = adv.dtype
    batch = v.shape[0]
    v = v.to(acc)
    mse = (v - u.to(acc)).reshape(batch, -1).pow(2).mean(1)
    policy = adv * weighting_factor(weighting, mse.detach(), sigma, power) * mse
    if v_old is not None:
        policy = policy + alpha_old * (v - v_old.to(acc)).reshape(batch, -1).pow(2).mean(1)
    kl = (v - v_ref.to(acc)).reshape(batch, -1).pow(2).mean(1)
    return (policy + alpha * kl).mean(), PolicyComponents(policy.detach(), kl.detach())


def awm_loss(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    advantages: torch.Tensor,
    *,
    alpha: float = 0.0,
    v_old: torch.Tensor | None = None,
    alpha_old: float = 0.0,
    weighting: str = "uniform",
    sigma: torch.Tensor | None = None,
    ghuber_power: float = 0.25,
    backend: str = "auto",
    return_components: bool = False,
    validate: bool = True,
):
    """AWM loss ``mean_i [A_i f_i |v - u|^2 + α_old |v - v_old|^2] + α mean_i |v - v_ref|^2`` (per-dimension means;
    f_i = 1 with the default weighting, else the detached factor of the reference's ``weighting``).

    Args:
        v: policy prediction v_θ(t, x_t), [B, ...], floating (fp16/bf16/fp32/fp64).
        u: target u = x1 - x0; v_ref: reference prediction; v_old (optional): EMA-policy prediction — of v's
            shape, on v's device (pass v_ref, v_old detached; any that requires grad gets one).
        advantages: [B] signed advantages (:func:`orw_fast.ops.advantages.group_advantages`), finite; never
            differentiated.
        alpha: α >= 0, the KL coefficient to v_ref.  alpha_old: α_old >= 0, the coefficient to v_old (needs v_old).
        weighting: one of :data:`WEIGHTINGS`, the reference code's ``train.weighting`` (module docstring).
        sigma: [B] noise levels σ = 1 - t of the samples' path times, in [0, 1], never differentiated: needed by
            every weighting but "uniform".  ghuber_power: ghuber's p, in (0, 1] (the published configs: 0.25).
        backend: "auto" | "eager" | "native" | "triton".
        return_components: also return :class:`PolicyComponents` (policy_i, kl_i) from the same pass.
        validate: check that the advantages and sigma are finite and sigma in [0, 1] (one device sync on CUDA;
            skipped while torch.compile traces or a CUDA graph is captured).

    Returns:
        the loss, 0-dim, in float32 (float64 for float64 inputs); with ``return_components`` a tuple
        ``(loss, PolicyComponents)``. Gradients reach the inputs that require grad, in their own dtype.
    """
    others = {} if v_old is None else {"v_old": v_old}
    _check_predictions(v, u, v_ref, **others)
    acc = accumulation_dtype(common_dtype(v, u, v_ref, *others.values()))
    alpha = check_real(alpha, "alpha", acc, minimum=0)
    alpha_old = check_real(alpha_old, "alpha_old", acc, minimum=0)
    if v_old is None and alpha_old:
        raise ValueError("alpha_old > 0 needs v_old (the EMA policy's prediction)")
    check_scores(advantages, "advantages", v.shape[0], v.device, validate)
    adv = as_constant(advantages, acc)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "ghuber" and not (isinstance(ghuber_power, numbers.Real) and 0 < ghuber_power <= 1):
        raise ValueError(f"ghuber_power must be a number in (0, 1], got {ghuber_power!r}")
    if weighting != "uniform":
        if sigma is None:
            raise ValueError(f"weighting={weighting!r} needs sigma, the samples' noise levels 1 - t [B]")
        check_scores(sigma, "sigma", v.shape[0], v.device, validate)
        sigma = as_constant(sigma, acc)
        if validate and not _is_capturing_or_compiling() and bool(((sigma < 0) | (sigma > 1)).any()):
            raise ValueError("sigma must lie in [0, 1] (the noise levels 1 - t of the path times)")
    by_mse = weighting in ("huber", "ghuber")  # the op's mean-square form (module docstring)
    backend = resolve_backend(backend, v.device, adaptive=by_mse)
    if backend == "eager":
        loss, parts = _eager(v, u, v_ref, adv, alpha, v_old, alpha_old, weighting, sigma, ghuber_power)
        return (loss, parts) if return_components else loss
    msq_power = 0.0
    if by_mse:
        scale, msq_power = mse_form(weighting, sigma, ghuber_power)
        adv = adv * scale
    elif weighting != "uniform":
        adv = adv * weighting_factor(weighting, None, sigma, ghuber_power)
    if v_old is None and not by_mse:
        loss, comp = orw_cfm_w2_loss(
            v, u, v_ref, weights=adv, alpha=alpha, backend=backend, return_components=True, validate=False
        )
        parts = PolicyComponents(comp.weights * comp.fm, comp.w2)
    else:
        zeros = torch.zeros_like(adv)
        coef = torch.stack([adv, torch.ones_like(adv), zeros, zeros, torch.full_like(adv, alpha_old)])
        old = u if v_old is None else v_old  # without v_old: a = 0, e = v - u (module docstring)
        loss, parts = fused_quadratic_fm(v, u, old, v_ref, coef, alpha, backend, msq_power)
    return (loss, parts) if return_components else loss
