"""What the native and triton fused-loss ops share: their fake (meta) kernel and their autograd.

Both return (loss, fm, w2, weights, grad_v, grad_u, grad_v_ref) with the gradients already
computed in the forward pass, so backward only scales them by grad_output."""
from __future__ import annotations

import torch


def allocate_outputs(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u, grad_v_ref):
    """The outputs of the contract (csrc/orw_cfm_w2.h), allocated, not computed: the fake kernel
    of both ops and the Triton op's allocation."""
    batch = v.shape[0]
    grads = (torch.empty_like(v) if wanted else v.new_empty(0) for wanted in (grad_v, grad_u, grad_v_ref))
    return (scores.new_empty(()), scores.new_empty(batch), scores.new_empty(batch), scores.new_empty(batch), *grads)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    # Out of place, so a retained graph can be differentiated again (gradcheck does so); the
    # saved gradient is freed with the graph.
    grads = tuple(
        g * grad_loss if needed and g.numel() else None
        for g, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[:3])
    )
    return grads + (None,) * 7


def register_fused_autograd(op) -> None:
    """Registers the backward above for ``op`` (a name or a custom-op object) with the fused-loss schema."""
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)
