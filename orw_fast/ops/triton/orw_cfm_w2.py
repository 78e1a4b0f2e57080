"""Triton backend of the fused ORW-CFM-W2 loss: ``torch.ops.orw_fast.orw_cfm_w2_triton``.

Same contract as the native op (csrc/orw_cfm_w2.h):

    orw_cfm_w2_triton(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u, grad_v_ref)
        -> (loss [], fm [B], w2 [B], weights [B], grad_v, grad_u, grad_v_ref)

v, u, v_ref: [B, ...], one floating dtype, identical strides, dense with the batch outermost (sample i
is the D = numel / B adjacent elements at i * D). scores: contiguous [B] in the accumulation dtype
(float64 for float64 inputs, float32 otherwise); weighting 0 softmax (B * softmax(tau s)), 1 exp
(exp(tau s)), 2 none (1), 3 given (s). fm_i = mean_d (v-u)^2, w2_i = mean_d (v-v_ref)^2,
loss = mean_i(w_i fm_i + alpha w2_i) in the accumulation dtype; each requested gradient is
d loss / d input, shaped and strided like v in the input dtype, the others empty [0] tensors.

Two launches, one read of the data: the pass kernel (one program per chunk of a sample) computes
its sample's weight, the chunk's partial sums and the gradients; the finalize kernel (one program)
adds the partial sums in a fixed order, so results are the same bits run to run.
"""

import contextlib
import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from orw_fast.ops.fused_op_support import allocate_outputs, register_fused_autograd


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Launch parameters (powers of 2). Replace the module's ``CONFIG`` to change them; torch.compile
    reads it when it traces the op."""

    block: int = 1024  # elements per tile of the pass kernel (lowered to D's power of 2 for small D)
    tiles: int = 4  # tiles per program: a program owns block * tiles elements of one sample
    num_warps: int = 4  # of the pass kernel
    score_block: int = 1024  # tile over the B scores of the softmax
    finalize_tile: int = 1024  # partial sums per tile of the finalize kernel


CONFIG = LaunchConfig()


@triton.jit
def _weight(scores_ptr, i, B, tau, WEIGHTING: tl.constexpr, SCORE_BLOCK: tl.constexpr):
    """w_i for weighting 0 softmax, 1 exp, 2 none, 3 given, in the dtype of the scores."""
    ACC: tl.constexpr = scores_ptr.dtype.element_ty
    s_i = tl.load(scores_ptr + i)
    if WEIGHTING == 0:
        # Two passes over the scores (few, cached): the max of q = sign(tau) s, then the sum of exp of the
        # range-safe logits 2 (|tau| (q/2 - q*/2)) of orw_fast/ops/reward_weights.py softmax_logits.
        t = tl.full([], tau, ACC)
        sign = tl.where(t >= 0, tl.full([], 1.0, ACC), tl.full([], -1.0, ACC))
        a = tl.abs(t)
        m = tl.full([SCORE_BLOCK], float("-inf"), ACC)
        for b0 in range(0, B, SCORE_BLOCK):
            offs = b0 + tl.arange(0, SCORE_BLOCK)
            q = sign * tl.load(scores_ptr + offs, mask=offs < B, other=0.0)
            m = tl.maximum(m, tl.where(offs < B, q, float("-inf")))
        q_max = tl.max(m, 0)
        total = tl.zeros([SCORE_BLOCK], ACC)
        for b0 in range(0, B, SCORE_BLOCK):
            offs = b0 + tl.arange(0, SCORE_BLOCK)
            q = sign * tl.load(scores_ptr + offs, mask=offs < B, other=0.0)
            e = tl.exp(2.0 * (a * (0.5 * q - 0.5 * q_max)))
            total += tl.where(offs < B, e, 0.0)
        w = tl.full([], B, ACC) * tl.exp(2.0 * (a * (0.5 * (sign * s_i) - 0.5 * q_max))) / tl.sum(total, 0)
    elif WEIGHTING == 1:
        w = tl.exp(tl.full([], tau, ACC) * s_i)
    elif WEIGHTING == 2:
        w = tl.full([], 1.0, ACC)
    else:
        w = s_i
    return w


# Scalars enter the arithmetic through tl.full(..., ACC): it accepts them as runtime values,
# as constexprs (Triton and Inductor turn ints equal to 1 into constexprs) and, under the
# interpreter, as Python floats, without a detour through float32.
@triton.jit
def _pass_kernel(
    v_ptr,
    u_ptr,
    r_ptr,
    gv_ptr,
    gu_ptr,
    gr_ptr,
    scores_ptr,
    weights_ptr,
    part_ptr,
    B,
    D,
    nchunks,
    alpha: tl.float64,
    tau: tl.float64,
    WEIGHTING: tl.constexpr,
    GRAD_V: tl.constexpr,
    GRAD_U: tl.constexpr,
    GRAD_V_REF: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    SCORE_BLOCK: tl.constexpr,
):
    """Program t = i * nchunks + c: chunk c of sample i. Writes w_i (from chunk 0), the gradients
    of the chunk and its sums of (v-u)^2 and (v-v_ref)^2 to part[0, i, c] and part[1, i, c]."""
    t = tl.program_id(0)
    i = t // nchunks
    c = t - i * nchunks
    ACC: tl.constexpr = scores_ptr.dtype.element_ty
    CHUNK: tl.constexpr = BLOCK * TILES

    w = _weight(scores_ptr, i, B, tau, WEIGHTING, SCORE_BLOCK)
    if c == 0:
        tl.store(weights_ptr + i, w)
    coef = 2.0 / (tl.full([], B, ACC) * tl.full([], D, ACC))
    cw = coef * w
    ca = coef * tl.full([], alpha, ACC)

    # 64-bit scalar offset of the chunk; 32-bit offsets inside it.
    start = c.to(tl.int64) * CHUNK
    base = i.to(tl.int64) * D + start
    n = tl.minimum(D - start, CHUNK).to(tl.int32)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    for k in tl.static_range(0, CHUNK, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        d1 = a - tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        d2 = a - tl.load(r_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        s1 += d1 * d1
        s2 += d2 * d2
        if GRAD_V:
            tl.store(gv_ptr + base + offs, (cw * d1 + ca * d2).to(gv_ptr.dtype.element_ty), mask=mask)
        if GRAD_U:
            tl.store(gu_ptr + base + offs, (-cw * d1).to(gu_ptr.dtype.element_ty), mask=mask)
        if GRAD_V_REF:
            tl.store(gr_ptr + base + offs, (-ca * d2).to(gr_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + t, tl.sum(s1, 0))
    tl.store(part_ptr + B * nchunks + t, tl.sum(s2, 0))


@triton.jit
def _finalize_kernel(
    part_ptr,
    weights_ptr,
    fm_ptr,
    w2_ptr,
    loss_ptr,
    B,
    D,
    nchunks,
    alpha: tl.float64,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """One program: fm, w2 from the partial sums [2, B, nchunks] in a fixed order, and the loss
    mean_i(w_i fm_i + alpha w2_i) (w_i = 1 when not WEIGHTED: the quadratic_fm op, whose fm is its policy term).
    Shared by the Triton ops of orw_cfm_w2 and quadratic_fm."""
    ACC: tl.constexpr = fm_ptr.dtype.element_ty
    d = tl.full([], D, ACC)
    a = tl.full([], alpha, ACC)
    total = tl.zeros([ROWS], ACC)
    for b0 in range(0, B, ROWS):
        rows = b0 + tl.arange(0, ROWS)
        row_ok = rows < B
        s1 = tl.zeros([ROWS, COLS], ACC)
        s2 = tl.zeros([ROWS, COLS], ACC)
        for c0 in range(0, nchunks, COLS):
            cols = c0 + tl.arange(0, COLS)
            idx = rows[:, None] * nchunks + cols[None, :]
            mask = row_ok[:, None] & (cols < nchunks)[None, :]
            s1 += tl.load(part_ptr + idx, mask=mask, other=0.0)
            s2 += tl.load(part_ptr + B * nchunks + idx, mask=mask, other=0.0)
        fm = tl.sum(s1, 1) / d
        w2 = tl.sum(s2, 1) / d
        tl.store(fm_ptr + rows, fm, mask=row_ok)
        tl.store(w2_ptr + rows, w2, mask=row_ok)
        if WEIGHTED:
            fm = fm * tl.load(weights_ptr + rows, mask=row_ok, other=0.0)
        total += tl.where(row_ok, fm + a * w2, 0.0)
    tl.store(loss_ptr, tl.sum(total, 0) / tl.full([], B, ACC))


def _pow2_at_least(n, cap: int) -> int:
    """Smallest power of 2 >= n, at most cap (comparisons only, so n may be a SymInt)."""
    p = 1
    while p < cap and p < n:
        p *= 2
    return p


def _is_dense(t) -> bool:
    """Non-overlapping and dense: some order of the dims is contiguous."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a, b) -> bool:
    """Equal strides in every dimension of size > 1 (a size-1 dimension's stride is arbitrary)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _check_inputs(v, u, v_ref, scores, alpha, tau, weighting) -> int:
    """The checks of csrc/orw_cfm_w2.cpp (metadata only); returns D."""
    torch._check(v.dim() >= 1 and v.numel() > 0, lambda: "orw_cfm_w2: v must be a non-empty [B, ...] tensor")
    torch._check(
        u.shape == v.shape and v_ref.shape == v.shape,
        lambda: f"orw_cfm_w2: v, u, v_ref must have one shape, got {v.shape}, {u.shape}, {v_ref.shape}",
    )
    torch._check(
        _same_layout(u, v) and _same_layout(v_ref, v), lambda: "orw_cfm_w2: v, u, v_ref must have identical strides"
    )
    torch._check(
        v.is_floating_point() and u.dtype == v.dtype and v_ref.dtype == v.dtype,
        lambda: "orw_cfm_w2: v, u, v_ref must share one floating dtype",
    )
    torch._check(
        u.device == v.device and v_ref.device == v.device and scores.device == v.device,
        lambda: "orw_cfm_w2: all tensors must be on one device",
    )
    batch = v.shape[0]
    dim = v.numel() // batch
    torch._check(
        _is_dense(v) and (batch == 1 or v.stride(0) == dim),
        lambda: "orw_cfm_w2: v must be dense with the batch dimension outermost",
    )
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    torch._check(
        scores.dim() == 1 and scores.shape[0] == batch and scores.dtype == acc and scores.is_contiguous(),
        lambda: f"orw_cfm_w2: scores must be a contiguous [B] tensor of dtype {acc}",
    )
    limit = torch.finfo(acc).max  # alpha and tau enter the arithmetic in the accumulation dtype
    torch._check(
        math.isfinite(alpha) and 0 <= alpha <= limit,
        lambda: f"orw_cfm_w2: alpha must be >= 0 and finite in {acc}, got {alpha}",
    )
    torch._check(
        math.isfinite(tau) and abs(tau) <= limit, lambda: f"orw_cfm_w2: tau must be finite in {acc}, got {tau}"
    )
    torch._check(0 <= weighting <= 3, lambda: f"orw_cfm_w2: unknown weighting {weighting}")
    return dim


def _orw_cfm_w2_triton(
    v: torch.Tensor,
    u: torch.Tensor,
    v_ref: torch.Tensor,
    scores: torch.Tensor,
    alpha: float,
    tau: float,
    weighting: int,
    grad_v: bool,
    grad_u: bool,
    grad_v_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dim = _check_inputs(v, u, v_ref, scores, alpha, tau, weighting)
    batch, cfg = v.shape[0], CONFIG
    block = _pow2_at_least(dim, cfg.block)
    nchunks = triton.cdiv(dim, block * cfg.tiles)
    outs = allocate_outputs(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u, grad_v_ref)
    loss, fm, w2, weights, gv, gu, gr = outs
    part = scores.new_empty((2, batch, nchunks))
    cols = _pow2_at_least(nchunks, cfg.finalize_tile)
    with torch.cuda.device(v.device) if v.is_cuda else contextlib.nullcontext():  # launch on v's GPU
        torch.library.wrap_triton(_pass_kernel)[(batch * nchunks,)](
            v,
            u,
            v_ref,
            gv,
            gu,
            gr,
            scores,
            weights,
            part,
            batch,
            dim,
            nchunks,
            alpha,
            tau,
            WEIGHTING=weighting,
            GRAD_V=grad_v,
            GRAD_U=grad_u,
            GRAD_V_REF=grad_v_ref,
            BLOCK=block,
            TILES=cfg.tiles,
            SCORE_BLOCK=_pow2_at_least(batch, cfg.score_block),
            num_warps=cfg.num_warps,
        )
        torch.library.wrap_triton(_finalize_kernel)[(1,)](
            part,
            weights,
            fm,
            w2,
            loss,
            batch,
            dim,
            nchunks,
            alpha,
            ROWS=cfg.finalize_tile // cols,
            COLS=cols,
            WEIGHTED=True,
            num_warps=4,
        )
    return outs


_NAME = "orw_fast::orw_cfm_w2_triton"
if os.environ.get("TRITON_INTERPRET") == "1":
    # Under the interpreter wrap_triton returns the raw kernel, so triton_op's fake kernel (the body
    # itself) would run the interpreter on FakeTensors: define an opaque custom op with a fake instead.
    orw_cfm_w2_triton = torch.library.custom_op(_NAME, _orw_cfm_w2_triton, mutates_args=())
    orw_cfm_w2_triton.register_fake(allocate_outputs)
else:
    # triton_op: torch.compile traces into the body and sees the Triton kernels.
    orw_cfm_w2_triton = torch.library.triton_op(_NAME, _orw_cfm_w2_triton, mutates_args=())
register_fused_autograd(orw_cfm_w2_triton)
