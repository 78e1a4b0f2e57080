"""Per-sample weights from rewards: the "softmax", "exp" and "none" weightings of ORW-CFM-W2."""
from __future__ import annotations

import math

import torch

WEIGHTINGS = ("softmax", "exp", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_capturing_or_compiling() -> bool:
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    )


def check_scores(scores, name: str, batch: int | None, device: torch.device | None, validate: bool) -> None:
    """Checks that ``scores`` (rewards or weights) is a finite floating [batch] tensor on ``device``
    (``None``: any length / any device).

    The finiteness check reads the values (one device sync on CUDA); it is skipped when ``validate`` is
    False and while torch.compile traces or a CUDA graph is captured.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {scores.dtype}; convert it with .float()")
    if scores.dim() != 1 or (batch is not None and scores.shape[0] != batch):
        expected = "[B]" if batch is None else f"[B] = [{batch}]"
        raise ValueError(f"{name} must have shape {expected}, got {list(scores.shape)}")
    if device is not None and scores.device != device:
        raise ValueError(f"{name} is on {scores.device} but the predictions are on {device}; move it with .to()")
    if validate and not _is_capturing_or_compiling():
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise ValueError(
                f"{name} has {bad} non-finite value(s) (NaN or inf) out of {batch}; "
                "drop or fix those samples before computing weights"
            )


def check_weighting(weighting: str, tau: float) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")


def reward_weights(
    rewards: torch.Tensor, tau: float = 1.0, weighting: str = "softmax", *, validate: bool = True
) -> torch.Tensor:
    """Weights w [B] for rewards r [B] (no gradient), in float64 for float64 rewards, else float32.

    "softmax": w = B * softmax(tau * r), mean 1 and finite for any finite rewards;
    "exp": w = exp(tau * r), the official ORW-CFM-W2 code (overflows for tau * r > ~88 in float32);
    "none": w = 1.
    """
    check_weighting(weighting, tau)
    check_scores(rewards, "rewards", None, None, validate)
    z = rewards.detach().to(accumulation_dtype(rewards.dtype)) * tau
    if weighting == "softmax":
        return z.shape[0] * torch.softmax(z, dim=0)
    if weighting == "exp":
        return torch.exp(z)
    return torch.ones_like(z)
