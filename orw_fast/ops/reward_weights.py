"""Per-sample weights from rewards: the "softmax", "exp" and "none" weightings of ORW-CFM-W2, and the checks
of the scalars and score vectors the fused loss takes."""

from __future__ import annotations

import math
import numbers

import torch

WEIGHTINGS = ("softmax", "exp", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def common_dtype(first: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The promoted dtype of the tensors (no promotion call when they already agree, the common case)."""
    dtype = first.dtype
    for t in others:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_constant(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.detach().to(dtype)``, skipping the calls that would change nothing (each costs microseconds, and the
    loss functions run them on every step)."""
    t = t.detach() if t.requires_grad else t
    return t if t.dtype == dtype else t.to(dtype)


# A plain dict, not functools.cache: torch.compile warns on every lru_cache-wrapped call it traces.
_LARGEST_FINITE = {
    dtype: torch.finfo(dtype).max for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def largest_finite(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).max``, looked up (the loss functions check their scalars against it on every call)."""
    limit = _LARGEST_FINITE.get(dtype)
    return torch.finfo(dtype).max if limit is None else limit


def _is_capturing_or_compiling() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_real(value, name: str, dtype: torch.dtype = torch.float32, *, minimum: float | None = None) -> float:
    """``value`` as a float: a real number (not a bool), finite and representable in ``dtype`` (where the
    kernels compute with it), and >= ``minimum`` when given. Raises ValueError naming ``name``."""

    def error(detail: str = "") -> ValueError:  # the message is built only for a bad value
        expected = f"a finite number{'' if minimum is None else f' >= {minimum:g}'}"
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:12]}... ({len(repr(value))} characters)"
        return ValueError(f"{name} must be {expected}{detail}, got {shown}")

    kind = type(value)  # float and int first: the ABC check below is slow and they are what callers pass
    if kind is not float and kind is not int and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise error()
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64's range
        number = math.inf
    limit = largest_finite(dtype)
    if not math.isfinite(number) or abs(number) > limit:
        raise error(f" representable in {dtype} (|{name}| <= {limit:.4g})")
    if minimum is not None and number < minimum:
        raise error()
    return number


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
                f"{name} has {bad} non-finite value(s) (NaN or inf) out of {scores.shape[0]}; "
                "drop or fix those samples before computing weights"
            )


def check_weighting(weighting: str, tau, dtype: torch.dtype = torch.float32) -> float:
    """Checks the weighting name and returns tau as a float representable in ``dtype``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return check_real(tau, "tau", dtype)


def check_exp_range(rewards: torch.Tensor, tau: float, dtype: torch.dtype) -> None:
    """Raises ValueError when exp(tau * r) overflows ``dtype`` for some reward (one device sync; skipped while
    torch.compile traces or a CUDA graph is captured)."""
    if _is_capturing_or_compiling():
        return
    largest = (tau * rewards.detach().double()).max().item()
    limit = math.log(largest_finite(dtype))
    if largest > limit:
        raise ValueError(
            f"weighting='exp' overflows: tau * reward reaches {largest:.4g}, above log(max {dtype}) = "
            f"{limit:.4g}, so exp(tau * r) is inf; use weighting='softmax' (B * softmax(tau * r) is "
            "finite for any rewards) or a smaller tau, or rescale the rewards"
        )


def softmax_logits(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """tau * (s - s*) with s* the score of the largest tau * s: the logits of B * softmax(tau * s), all <= 0 and
    never NaN for finite scores and tau, even where tau * s or s - s* is beyond the dtype's range.

    Computed as 2 * (|tau| * (q/2 - q*/2)) with q = sign(tau) * s: the halves never overflow (so neither does
    their difference), a product beyond the range is -inf (weight 0, which is right there), and for ordinary
    values this is exactly tau * (s - s*). The native and Triton kernels compute the same expression.
    """
    q = scores if tau >= 0 else -scores
    return 2 * (abs(tau) * (0.5 * q - 0.5 * q.max()))


def reward_weights(
    rewards: torch.Tensor, tau: float = 1.0, weighting: str = "softmax", *, validate: bool = True
) -> torch.Tensor:
    """Weights w [B] for rewards r [B] (no gradient), in float64 for float64 rewards, else float32.

    "softmax": w = B * softmax(tau * r), mean 1 and finite for any finite rewards and tau;
    "exp": w = exp(tau * r), the official ORW-CFM-W2 code (inf for tau * r > ~88 in float32: a ValueError
    with ``validate``);
    "none": w = 1.
    """
    acc = accumulation_dtype(rewards.dtype) if isinstance(rewards, torch.Tensor) else torch.float32
    tau = check_weighting(weighting, tau, acc)
    check_scores(rewards, "rewards", None, None, validate)
    r = as_constant(rewards, acc)
    if weighting == "softmax":
        return r.shape[0] * torch.softmax(softmax_logits(r, tau), dim=0)
    if weighting == "exp":
        if validate:
            check_exp_range(rewards, tau, acc)
        return torch.exp(tau * r)
    return torch.ones_like(r)
