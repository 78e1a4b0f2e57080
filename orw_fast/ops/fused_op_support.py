"""What the native and triton fused-loss ops share: their fake (meta) kernels and their autograd.

Each op takes its n differentiable tensors first and returns (loss, diagnostics..., one gradient per
differentiable tensor) with the gradients already computed in the forward pass, so backward only scales
them by grad_output: orw_cfm_w2 -> (loss, fm, w2, weights, grad_v, grad_u, grad_v_ref),
quadratic_fm -> (loss, policy, kl, grad_v, grad_u, grad_v_old, grad_v_ref). quadratic_fm_norms (the adaptive forms)
has only a fake kernel here: it is never differentiated. The autograd below serves the Triton ops (a triton_op's
autograd is Python); the native ops have the same backward in C++ (csrc/fused_autograd.cpp), which saves a CPU
training step the Python layer's 0.2-0.4 ms."""

from __future__ import annotations

import torch


def allocate_outputs(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u, grad_v_ref):
    """The outputs of the contract (csrc/orw_cfm_w2.h), allocated, not computed: the fake kernel
    of both ops and the Triton op's allocation."""
    batch = v.shape[0]
    grads = (torch.empty_like(v) if wanted else v.new_empty(0) for wanted in (grad_v, grad_u, grad_v_ref))
    return (scores.new_empty(()), scores.new_empty(batch), scores.new_empty(batch), scores.new_empty(batch), *grads)


def allocate_quadratic_outputs(v, u, v_old, v_ref, coef, alpha, grad_v, grad_u, grad_v_old, grad_v_ref, msq_power=0.0):
    """The outputs of the quadratic_fm contract (csrc/quadratic_fm.h), allocated, not computed."""
    batch = v.shape[0]
    wanted = (grad_v, grad_u, grad_v_old, grad_v_ref)
    grads = (torch.empty_like(v) if w else v.new_empty(0) for w in wanted)
    return (coef.new_empty(()), coef.new_empty(batch), coef.new_empty(batch), *grads)


def allocate_norms_outputs(v, u, v_old, coef, p):
    """The outputs of quadratic_fm_norms (csrc/quadratic_fm.h), allocated, not computed: two [B] vectors in the
    accumulation dtype (no gradients: the op has no autograd)."""
    return coef.new_empty(v.shape[0]), coef.new_empty(v.shape[0])


def _setup_context(ctx, inputs, output, num_grads):
    ctx.save_for_backward(*output[len(output) - num_grads :])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradient-sized buffers for the unused outputs


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * len(ctx.needs_input_grad)
    tracing = torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor
    if tracing or torch._C._autograd._get_current_graph_task_keep_graph():
        # The graph (and the saved gradients) may be used again: a new tensor. Under a tracer
        # (torch.compile, AOTAutograd) Inductor fuses the product into its neighbours.
        scale = lambda g: g * grad_loss  # noqa: E731
    elif grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        scale = lambda g: g  # noqa: E731  (reading a CPU scalar costs no device sync)
    else:
        # The graph is freed after this backward: the saved gradient becomes the returned one (so the op's raw
        # gradient outputs, which the public functions never hand out, are scaled in place).
        scale = lambda g: g.mul_(grad_loss)  # noqa: E731
    saved = ctx.saved_tensors
    grads = tuple(scale(g) if needed and g.numel() else None for g, needed in zip(saved, ctx.needs_input_grad))
    return grads + (None,) * (len(ctx.needs_input_grad) - len(saved))


def register_fused_autograd(op, num_grads: int = 3) -> None:
    """Registers the backward above for ``op`` (a name or a custom-op object): its first ``num_grads``
    arguments are the differentiable tensors, its last ``num_grads`` outputs their gradients."""
    setup = lambda ctx, inputs, output: _setup_context(ctx, inputs, output, num_grads)  # noqa: E731
    torch.library.register_autograd(op, _backward, setup_context=setup)
