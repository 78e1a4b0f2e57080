"""Triton backend of the fused quadratic_fm loss: ``torch.ops.orw_fast.quadratic_fm_triton``.

Same contract as the native op (csrc/quadratic_fm.h):

    quadratic_fm_triton(v, u, v_old, v_ref, coef, alpha, grad_v, grad_u, grad_v_old, grad_v_ref, msq_power=0.0)
        -> (loss [], policy [B], kl [B], grad_v, grad_u, grad_v_old, grad_v_ref)

With a = v_old - u, e = v - v_old, x1 = a + m1 e, x2 = a + m2 e, k = v - v_ref and coef = [w1; m1; w2; m2; w3]
([5, B], accumulation dtype): policy_i = mean_d (w1 x1^2 + w2 x2^2 + w3 e^2), kl_i = mean_d k^2,
loss = mean_i (policy_i + alpha kl_i); the adaptive forms (coef [6, B], msq_power != 0: ops/quadratic_fm.py) run
the norms op below first and then the plain kernels with ``adaptive_coef``.

Two launches, one read of the data: the pass kernel (one program per chunk of a sample, launch parameters from
ops/triton/orw_cfm_w2.CONFIG) computes the chunk's partial sums and gradients; the finalize kernel of
orw_cfm_w2 (unweighted) adds them in a fixed order.

``quadratic_fm_norms_triton(v, u, v_old, coef, p) -> (n_1 [B], n_2 [B])``, mean_d |a + m1 e|^p and
mean_d |a + m2 e|^p for p = 1 or 2 (never differentiated: no autograd), runs the norms kernel on the same chunks
(v, u, v_old only) and the same finalize kernel.
"""

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from orw_fast.ops.fused_op_support import allocate_norms_outputs, allocate_quadratic_outputs, register_fused_autograd
from orw_fast.ops.triton import orw_cfm_w2 as shared


@triton.jit
def _pass_kernel(
    v_ptr,
    u_ptr,
    o_ptr,
    r_ptr,
    gv_ptr,
    gu_ptr,
    go_ptr,
    gr_ptr,
    coef_ptr,
    part_ptr,
    B,
    D,
    nchunks,
    alpha: tl.float64,
    GRAD_V: tl.constexpr,
    GRAD_U: tl.constexpr,
    GRAD_V_OLD: tl.constexpr,
    GRAD_V_REF: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    """Program t = i * nchunks + c: chunk c of sample i. Writes the chunk's gradients and its sums of the
    quadratic form and of (v - v_ref)^2 to part[0, i, c] and part[1, i, c]."""
    t = tl.program_id(0)
    i = t // nchunks
    c = t - i * nchunks
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    CHUNK: tl.constexpr = BLOCK * TILES

    w1 = tl.load(coef_ptr + i)
    m1 = tl.load(coef_ptr + B + i)
    w2 = tl.load(coef_ptr + 2 * B + i)
    m2 = tl.load(coef_ptr + 3 * B + i)
    w3 = tl.load(coef_ptr + 4 * B + i)
    coef = 2.0 / (tl.full([], B, ACC) * tl.full([], D, ACC))
    ca = coef * tl.full([], alpha, ACC)

    start = c.to(tl.int64) * CHUNK
    base = i.to(tl.int64) * D + start
    n = tl.minimum(D - start, CHUNK).to(tl.int32)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    for k0 in tl.static_range(0, CHUNK, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < n
        vj = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        oj = tl.load(o_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        a = oj - tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        e = vj - oj
        kl = vj - tl.load(r_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        x1 = a + m1 * e
        x2 = a + m2 * e
        y1 = w1 * x1
        y2 = w2 * x2
        y3 = w3 * e
        s1 += x1 * y1 + x2 * y2 + e * y3
        s2 += kl * kl
        if GRAD_V:
            tl.store(
                gv_ptr + base + offs, (coef * (m1 * y1 + m2 * y2 + y3) + ca * kl).to(gv_ptr.dtype.element_ty), mask=mask
            )
        if GRAD_U:
            tl.store(gu_ptr + base + offs, (-coef * (y1 + y2)).to(gu_ptr.dtype.element_ty), mask=mask)
        if GRAD_V_OLD:
            go = coef * ((1.0 - m1) * y1 + (1.0 - m2) * y2 - y3)
            tl.store(go_ptr + base + offs, go.to(go_ptr.dtype.element_ty), mask=mask)
        if GRAD_V_REF:
            tl.store(gr_ptr + base + offs, (-ca * kl).to(gr_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + t, tl.sum(s1, 0))
    tl.store(part_ptr + B * nchunks + t, tl.sum(s2, 0))


@triton.jit
def _norms_kernel(
    v_ptr, u_ptr, o_ptr, coef_ptr, part_ptr, B, D, nchunks, P: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr
):
    """quadratic_fm_norms, program t = i * nchunks + c: the sums of |a + m1 e|^P and |a + m2 e|^P (P = 1 or 2)
    over chunk c of sample i, to part[0, i, c] and part[1, i, c]."""
    t = tl.program_id(0)
    i = t // nchunks
    c = t - i * nchunks
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    CHUNK: tl.constexpr = BLOCK * TILES
    m1 = tl.load(coef_ptr + B + i)
    m2 = tl.load(coef_ptr + 3 * B + i)
    start = c.to(tl.int64) * CHUNK
    base = i.to(tl.int64) * D + start
    n = tl.minimum(D - start, CHUNK).to(tl.int32)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    for k0 in tl.static_range(0, CHUNK, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < n
        oj = tl.load(o_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        a = oj - tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        e = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(ACC) - oj
        x1 = a + m1 * e
        x2 = a + m2 * e
        if P == 1:
            s1 += tl.abs(x1)
            s2 += tl.abs(x2)
        else:
            s1 += x1 * x1
            s2 += x2 * x2
    tl.store(part_ptr + t, tl.sum(s1, 0))
    tl.store(part_ptr + B * nchunks + t, tl.sum(s2, 0))


def _check_inputs(v, u, v_old, v_ref, coef, alpha, msq_power=0.0) -> int:
    """The checks of csrc/quadratic_fm.cpp (metadata only); returns D."""
    torch._check(v.dim() >= 1 and v.numel() > 0, lambda: "quadratic_fm: v must be a non-empty [B, ...] tensor")
    for t in (u, v_old, v_ref):
        torch._check(
            t.shape == v.shape,
            lambda t=t: f"quadratic_fm: v, u, v_old, v_ref must have one shape, got {v.shape} and {t.shape}",
        )
        torch._check(shared._same_layout(t, v), lambda: "quadratic_fm: v, u, v_old, v_ref must have identical strides")
        torch._check(
            v.is_floating_point() and t.dtype == v.dtype,
            lambda: "quadratic_fm: v, u, v_old, v_ref must share one floating dtype",
        )
        torch._check(t.device == v.device, lambda: "quadratic_fm: all tensors must be on one device")
    torch._check(coef.device == v.device, lambda: "quadratic_fm: all tensors must be on one device")
    batch = v.shape[0]
    dim = v.numel() // batch
    torch._check(
        shared._is_dense(v) and (batch == 1 or v.stride(0) == dim),
        lambda: "quadratic_fm: v must be dense with the batch dimension outermost",
    )
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    torch._check(
        coef.dim() == 2
        and coef.shape[0] in (5, 6)
        and coef.shape[1] == batch
        and coef.dtype == acc
        and coef.is_contiguous(),
        lambda: f"quadratic_fm: coef must be a contiguous [5, B] or [6, B] tensor of dtype {acc}",
    )
    torch._check(
        math.isfinite(alpha) and 0 <= alpha <= torch.finfo(acc).max,
        lambda: f"quadratic_fm: alpha must be >= 0 and finite in {acc}, got {alpha}",
    )
    torch._check(
        math.isfinite(msq_power) and (msq_power == 0 or coef.shape[0] == 5),
        lambda: f"quadratic_fm: msq_power must be finite, and 0 with a [6, B] coef, got {msq_power}",
    )
    return dim


def _quadratic_fm_triton(
    v: torch.Tensor,
    u: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    coef: torch.Tensor,
    alpha: float,
    grad_v: bool,
    grad_u: bool,
    grad_v_old: bool,
    grad_v_ref: bool,
    msq_power: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dim = _check_inputs(v, u, v_old, v_ref, coef, alpha, msq_power)
    if coef.shape[0] == 6 or msq_power != 0:  # an adaptive form: its norms pass, then the plain kernels
        from orw_fast.ops.quadratic_fm import adaptive_coef

        norms = _quadratic_fm_norms_triton(v, u, v_old, coef, 1 if coef.shape[0] == 6 else 2)
        coef = adaptive_coef(coef, *norms, msq_power)
    batch, cfg = v.shape[0], shared.CONFIG
    block = shared._pow2_at_least(dim, cfg.block)
    nchunks = triton.cdiv(dim, block * cfg.tiles)
    outs = allocate_quadratic_outputs(v, u, v_old, v_ref, coef, alpha, grad_v, grad_u, grad_v_old, grad_v_ref)
    loss, policy, kl, gv, gu, go, gr = outs
    part = coef.new_empty((2, batch, nchunks))
    cols = shared._pow2_at_least(nchunks, cfg.finalize_tile)
    with torch.cuda.device(v.device) if v.is_cuda else contextlib.nullcontext():  # launch on v's GPU
        torch.library.wrap_triton(_pass_kernel)[(batch * nchunks,)](
            v,
            u,
            v_old,
            v_ref,
            gv,
            gu,
            go,
            gr,
            coef,
            part,
            batch,
            dim,
            nchunks,
            alpha,
            GRAD_V=grad_v,
            GRAD_U=grad_u,
            GRAD_V_OLD=grad_v_old,
            GRAD_V_REF=grad_v_ref,
            BLOCK=block,
            TILES=cfg.tiles,
            num_warps=cfg.num_warps,
        )
        torch.library.wrap_triton(shared._finalize_kernel)[(1,)](
            part,
            coef,
            policy,
            kl,
            loss,
            batch,
            dim,
            nchunks,
            alpha,
            ROWS=cfg.finalize_tile // cols,
            COLS=cols,
            WEIGHTED=False,
            num_warps=4,
        )
    return outs


def _quadratic_fm_norms_triton(
    v: torch.Tensor, u: torch.Tensor, v_old: torch.Tensor, coef: torch.Tensor, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    dim = _check_inputs(v, u, v_old, v_old, coef, 0.0)
    torch._check(p in (1, 2), lambda: f"quadratic_fm_norms: p must be 1 or 2, got {p}")
    batch, cfg = v.shape[0], shared.CONFIG
    block = shared._pow2_at_least(dim, cfg.block)
    nchunks = triton.cdiv(dim, block * cfg.tiles)
    n_1, n_2 = allocate_norms_outputs(v, u, v_old, coef, p)
    scratch = coef.new_empty(())  # the finalize kernel's loss, unused
    part = coef.new_empty((2, batch, nchunks))
    cols = shared._pow2_at_least(nchunks, cfg.finalize_tile)
    with torch.cuda.device(v.device) if v.is_cuda else contextlib.nullcontext():
        torch.library.wrap_triton(_norms_kernel)[(batch * nchunks,)](
            v, u, v_old, coef, part, batch, dim, nchunks, P=p, BLOCK=block, TILES=cfg.tiles, num_warps=cfg.num_warps
        )
        torch.library.wrap_triton(shared._finalize_kernel)[(1,)](
            part,
            coef,
            n_1,
            n_2,
            scratch,
            batch,
            dim,
            nchunks,
            0.0,
            ROWS=cfg.finalize_tile // cols,
            COLS=cols,
            WEIGHTED=False,
            num_warps=4,
        )
    return n_1, n_2


_NAME = "orw_fast::quadratic_fm_triton"
if os.environ.get("TRITON_INTERPRET") == "1":
    # As for orw_cfm_w2_triton: under the interpreter an opaque custom op with a fake kernel.
    quadratic_fm_triton = torch.library.custom_op(_NAME, _quadratic_fm_triton, mutates_args=())
    quadratic_fm_triton.register_fake(allocate_quadratic_outputs)
else:
    quadratic_fm_triton = torch.library.triton_op(_NAME, _quadratic_fm_triton, mutates_args=())
register_fused_autograd(quadratic_fm_triton, num_grads=4)

_NORMS_NAME = "orw_fast::quadratic_fm_norms_triton"
if os.environ.get("TRITON_INTERPRET") == "1":
    quadratic_fm_norms_triton = torch.library.custom_op(_NORMS_NAME, _quadratic_fm_norms_triton, mutates_args=())
    quadratic_fm_norms_triton.register_fake(allocate_norms_outputs)
else:
    quadratic_fm_norms_triton = torch.library.triton_op(_NORMS_NAME, _quadratic_fm_norms_triton, mutates_args=())
