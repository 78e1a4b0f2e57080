"""The fused ORW-CFM-W2 loss: public function, nn.Module, eager reference and backend dispatch.

loss = mean_i( w_i * mean_d (v - u)^2 + alpha * mean_d (v - v_ref)^2 ),  w = weights of the rewards.

Backends: "eager" (plain PyTorch, the readable reference), "native" (torch.ops.orw_fast.orw_cfm_w2,
the C++ CPU / CUDA kernels of csrc/), "triton" (torch.ops.orw_fast.orw_cfm_w2_triton), "auto".
The native and triton ops compute the gradients during the forward pass (one read of v, u, v_ref,
one write per gradient); their backward only scales the saved gradients by grad_output.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

from orw_fast import _native
from orw_fast.ops.fused_op_support import allocate_outputs
from orw_fast.ops.reward_weights import (
    accumulation_dtype,
    as_constant,
    check_exp_range,
    check_real,
    check_scores,
    check_weighting,
    common_dtype,
    reward_weights,
)

BACKENDS = ("auto", "eager", "native", "triton")
_WEIGHTING_CODE = {"softmax": 0, "exp": 1, "none": 2}
_GIVEN_WEIGHTS = 3  # the scores passed to the kernel are the weights themselves


class LossComponents(NamedTuple):
    """Per-sample diagnostics from the same pass as the loss (no gradient), each [B] in the
    accumulation dtype: fm_i = mean_d (v-u)^2, w2_i = mean_d (v-v_ref)^2, weights w_i."""

    fm: torch.Tensor
    w2: torch.Tensor
    weights: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Input checks (metadata only, no device sync)


def _check_predictions(v, u, v_ref, **others) -> None:
    """Tensors, floating, one shape and one device as v; ``others`` are further named predictions."""
    for name, t in (("v", v), ("u", u), ("v_ref", v_ref), *others.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
        if t is v:
            shape, device = v.shape, v.device
            if v.dim() == 0 or v.numel() == 0:
                raise ValueError(f"v must be a non-empty [B, ...] tensor, got shape {list(shape)}")
            continue
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of v {list(shape)}, got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but v is on {device}; put all inputs on one device")


# ---------------------------------------------------------------------------------------------
# Backends


def _eager(v, u, v_ref, w, alpha):
    """Plain PyTorch, accumulating in float32 (float64 for float64 inputs)."""
    acc = w.dtype
    batch = v.shape[0]
    fm = (v.to(acc) - u.to(acc)).reshape(batch, -1).pow(2).mean(dim=1)
    w2 = (v.to(acc) - v_ref.to(acc)).reshape(batch, -1).pow(2).mean(dim=1)
    loss = (w * fm + alpha * w2).mean()
    return loss, fm.detach(), w2.detach(), w


def _triton_op():
    from orw_fast.ops.triton.orw_cfm_w2 import orw_cfm_w2_triton

    return orw_cfm_w2_triton


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_available(device: torch.device) -> bool:
    if not _HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


_warned_eager_fallback = False


def _resolve_backend(backend: str, device: torch.device, op: str = "orw_cfm_w2") -> str:
    """The backend that runs ``op`` for ``backend`` on ``device``: "auto" picks native, else triton (CUDA),
    else eager with a warning; an explicit backend that cannot run is a ValueError."""
    global _warned_eager_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and not _native.has_kernel(op, device.type):
        reason = (
            f"the extension failed to load ({_native.IMPORT_ERROR})"
            if _native.IMPORT_ERROR is not None
            else f"it was built without {device.type} kernels"
        )
        raise ValueError(
            f"backend='native' has no kernel for {device.type} tensors: {reason}. "
            "Rebuild with `pip install --no-build-isolation -e .` or use backend='eager'"
        )
    if backend == "triton" and not _triton_available(device):
        raise ValueError(
            "backend='triton' needs triton and CUDA tensors (on CPU: set TRITON_INTERPRET=1 before importing triton)"
        )
    if backend != "auto":
        return backend
    if _native.has_kernel(op, device.type):
        return "native"
    if device.type == "cuda" and _triton_available(device):
        return "triton"
    if not _warned_eager_fallback:
        _warned_eager_fallback = True
        warnings.warn(
            f"orw_fast: no compiled kernel for {device.type} tensors, using the eager backend "
            "(build the extension with `pip install --no-build-isolation -e .`)",
            stacklevel=3,
        )
    return "eager"


def _kernel_layout(v, *others):
    """One floating dtype and one dense, batch-outermost layout (v's own when possible, e.g.
    channels_last) for v and the others; copies only what does not match already."""
    dtype = common_dtype(v, *others)
    fmt = torch.contiguous_format
    if v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif v.dim() == 5 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    # (the checks first: a no-op .to / .contiguous call costs microseconds, a step makes eight)
    return tuple(
        t if t.dtype == dtype and t.is_contiguous(memory_format=fmt) else t.to(dtype).contiguous(memory_format=fmt)
        for t in (v, *others)
    )


if _native.IMPORT_ERROR is None:  # its autograd is C++ (csrc/fused_autograd.cpp)
    torch.library.register_fake("orw_fast::orw_cfm_w2", allocate_outputs)


# ---------------------------------------------------------------------------------------------
# Public API


def orw_cfm_w2_loss(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    rewards: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    alpha: float = 1.0,
    tau: float = 1.0,
    weighting: str = "softmax",
    backend: str = "auto",
    return_components: bool = False,
    validate: bool = True,
):
    """ORW-CFM-W2 loss ``mean_i( w_i * mean_d (v-u)^2 + alpha * mean_d (v-v_ref)^2 )``.

    Args:
        v: policy prediction v_theta(t, x_t), [B, ...], floating (fp16/bf16/fp32/fp64).
        u: target field u_t(x | x1), shape of v.
        v_ref: reference model prediction, shape of v (pass it detached; if it requires grad it gets one).
        rewards: [B] rewards, turned into weights by ``weighting`` and ``tau`` (never differentiated).
        weights: [B] precomputed weights instead of ``rewards`` (e.g. a slice of a softmax normalized
            over the global batch in multi-process training); used as constants.
        alpha: W2 coefficient, >= 0.  tau: reward temperature, finite.
        weighting: "softmax" (B * softmax(tau r), default), "exp" (exp(tau r), the official code), "none".
        backend: "auto" | "eager" | "native" | "triton".
        return_components: also return :class:`LossComponents` (fm, w2, weights) from the same pass.
        validate: check that rewards/weights are finite (one device sync on CUDA; skipped while
            torch.compile traces or a CUDA graph is captured).

    Returns:
        the loss, a 0-dim tensor accumulated in float32 (float64 for float64 inputs); with
        ``return_components`` a tuple ``(loss, LossComponents)``. Gradients reach v, and u and v_ref
        when they require grad, in their own dtype.
    """
    _check_predictions(v, u, v_ref)
    acc = accumulation_dtype(common_dtype(v, u, v_ref))
    alpha = check_real(alpha, "alpha", acc, minimum=0)
    tau = check_weighting(weighting, tau, acc)
    if (rewards is None) == (weights is None):
        raise ValueError("pass exactly one of rewards= or weights=")
    batch, device = v.shape[0], v.device
    if rewards is not None:
        check_scores(rewards, "rewards", batch, device, validate)
        if validate and weighting == "exp":
            check_exp_range(rewards, tau, acc)
        if rewards.dtype == torch.float64 and acc != torch.float64:
            # float64 rewards may lie beyond the kernels' float32 range: weigh them in float64 first.
            weights, rewards = reward_weights(rewards, tau, weighting, validate=False), None
    if weights is not None:
        check_scores(weights, "weights", batch, device, False)
        scores, code = as_constant(weights, acc).contiguous(), _GIVEN_WEIGHTS
        check_scores(scores, "weights" if weights.dtype == acc else f"weights (in {acc})", batch, device, validate)
    else:
        scores, code = as_constant(rewards, acc).contiguous(), _WEIGHTING_CODE[weighting]

    backend = _resolve_backend(backend, device)
    if backend == "eager":
        w = scores if code == _GIVEN_WEIGHTS else reward_weights(scores, tau, weighting, validate=False)
        loss, fm, w2, w = _eager(v, u, v_ref, w, alpha)
    else:
        op = torch.ops.orw_fast.orw_cfm_w2.default if backend == "native" else _triton_op()
        grad_on = torch.is_grad_enabled()
        kv, ku, kr = _kernel_layout(v, u, v_ref)
        loss, fm, w2, w, *_ = op(
            kv,
            ku,
            kr,
            scores,
            alpha,
            tau,
            code,
            grad_on and kv.requires_grad,
            grad_on and ku.requires_grad,
            grad_on and kr.requires_grad,
        )
    return (loss, LossComponents(fm, w2, w)) if return_components else loss


class ORWCFMW2Loss(torch.nn.Module):
    """Drop-in module for flow-matching trainers: ``loss = criterion(v, u, v_ref, rewards)``.

    Same arguments and semantics as :func:`orw_cfm_w2_loss`; ``forward`` also takes ``weights=``
    instead of rewards and ``return_components=``.
    """

    def __init__(self, alpha: float = 1.0, tau: float = 1.0, weighting: str = "softmax", backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.alpha = check_real(alpha, "alpha", torch.float64, minimum=0)
        self.tau, self.weighting, self.backend = check_weighting(weighting, tau, torch.float64), weighting, backend

    def forward(self, v, u, v_ref, rewards=None, *, weights=None, return_components: bool = False):
        return orw_cfm_w2_loss(
            v,
            u,
            v_ref,
            rewards,
            weights=weights,
            alpha=self.alpha,
            tau=self.tau,
            weighting=self.weighting,
            backend=self.backend,
            return_components=return_components,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, tau={self.tau}, weighting={self.weighting!r}, backend={self.backend!r}"
