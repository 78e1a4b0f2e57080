"""Noise/data couplings and the conditional probability path of (OT-)CFM, in torchcfm's convention
(t=0 noise, t=1 data).

Every coupling keeps each data sample x1[i] exactly once and with its own weight weights[i]: only the
noise is drawn or re-ordered. (torchcfm's ExactOptimalTransportConditionalFlowMatcher instead resamples
(x0, x1) pairs from the OT plan with replacement, which duplicates some x1 and drops others, so weights
computed per original x1 no longer line up with the samples it returns.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

COUPLINGS = ("independent", "ot", "rollout")


def _check_batch(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must be a floating tensor of shape [B, ...] with B >= 1, got {x.dtype} of shape {list(x.shape)}"
        )


def _check_vector(v, name: str, batch: int) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(v).__name__}")
    if v.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {list(v.shape)}")


def _check_pair(x0, x1) -> None:
    _check_batch(x0, "x0")
    _check_batch(x1, "x1")
    if x0.shape != x1.shape or x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(
            f"x0 and x1 must have the same shape, dtype and device, got {list(x0.shape)} {x0.dtype} "
            f"{x0.device} and {list(x1.shape)} {x1.dtype} {x1.device}"
        )


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Exact mini-batch OT as a permutation: a LongTensor ``perm`` [B] on x0's device such that pairing
    x0[perm[j]] with x1[j] minimises sum_j ||x0[perm[j]] - x1[j]||^2.

    The [B, B] squared-distance matrix is computed in float64 on the CPU and solved with
    scipy.optimize.linear_sum_assignment (deterministic).
    """
    _check_pair(x0, x1)
    a = x0.detach().reshape(x0.shape[0], -1).to("cpu", torch.float64)
    b = x1.detach().reshape(x1.shape[0], -1).to("cpu", torch.float64)
    cost = (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)
    rows, cols = linear_sum_assignment(cost.numpy())  # x0[rows[k]] goes to x1[cols[k]]; rows == arange(B)
    return torch.from_numpy(np.argsort(cols)).to(x0.device)


def couple(
    x1: torch.Tensor,
    weights: torch.Tensor,
    *,
    coupling: str,
    x0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise x0 for the data x1 [B, ...]: returns (x0, x1, weights) with x1 and weights [B] unchanged.

    "independent": x0 ~ N(0, I), drawn like x1 (its device and dtype) from ``generator``;
    "ot": the same draw, re-ordered by ot_permutation so that the pairs solve exact mini-batch OT;
    "rollout": the given ``x0``, the noise each x1 was generated from (required, same shape as x1).
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    _check_batch(x1, "x1")
    _check_vector(weights, "weights", x1.shape[0])
    if coupling == "rollout":
        if x0 is None:
            raise ValueError("coupling='rollout' needs x0, the noise each x1 was generated from")
        _check_pair(x0, x1)
        return x0, x1, weights
    if x0 is not None:
        raise ValueError(f"x0 is only used by coupling='rollout'; coupling={coupling!r} draws fresh noise")
    noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if coupling == "ot":
        noise = noise[ot_permutation(noise, x1)]
    return noise, x1, weights


def stratified_times(
    batch: int,
    times: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``times`` path times for each of ``batch`` samples, stratified over [0, 1): [batch * times], sample-major (the
    rows of ``x.repeat_interleave(times, 0)``), sample i's j-th time (j < times) t[i * times + j] = (j + U) / times
    with U ~ U(0, 1) drawn afresh for every entry (AWM's trained-time draw over its strata). With times = 1 exactly
    ``torch.rand(batch)`` from the same generator."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be an integer >= 1, got {times!r}")
    u = torch.rand(times * batch, generator=generator, device=device, dtype=dtype)
    return (torch.arange(times, device=device, dtype=dtype).repeat(batch) + u) / times


def sample_path(
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor | None = None,
    *,
    sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A point on the conditional path and its target velocity: returns (t, xt, ut).

    t ~ U(0, 1) [B] (x0's dtype and device, from ``generator``) unless given;
    xt = t * x1 + (1 - t) * x0 + sigma * eps with eps ~ N(0, I) drawn only when sigma > 0; ut = x1 - x0.
    Identical to torchcfm's ConditionalFlowMatcher(sigma).sample_location_and_conditional_flow for the same
    t and eps (with sigma > 0 and one seed, also the same draws: t first, then eps).
    """
    _check_pair(x0, x1)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    batch = x0.shape[0]
    if t is None:
        t = torch.rand(batch, generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        _check_vector(t, "t", batch)
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
    xt = tb * x1 + (1 - tb) * x0
    if sigma > 0:
        xt = xt + sigma * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, xt, x1 - x0
