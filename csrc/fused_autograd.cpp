// Autograd of the native fused-loss ops (orw_cfm_w2, quadratic_fm), registered for every device at the
// Autograd key. The ops compute their gradients in the forward pass and return them as their last
// outputs; backward only scales them by d(out)/d(loss). This is the C++ twin of
// orw_fast/ops/fused_op_support.py, which the Triton ops keep (a triton_op takes a Python autograd):
// the Python autograd layer cost about 0.2-0.4 ms a training step on the CPU (forward and backward),
// as much as the kernel itself at 256x3x32x32.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <tuple>

namespace orw_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;

// Saves the last num_grads outputs (the gradients) and marks every output but the loss as not
// differentiable.
variable_list finish_forward(AutogradContext* ctx, const Outputs& outs, int num_grads) {
  variable_list out = {std::get<0>(outs), std::get<1>(outs), std::get<2>(outs), std::get<3>(outs),
                       std::get<4>(outs), std::get<5>(outs), std::get<6>(outs)};
  ctx->save_for_backward(variable_list(out.end() - num_grads, out.end()));
  ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
  ctx->set_materialize_grads(false);  // no zero-filled buffers for the diagnostics' gradients
  return out;
}

// The value of a one-element CPU tensor, read directly for float and double (the loss's dtypes): item()
// dispatches two ops, about 15 us a backward on a slow CPU.
double cpu_scalar(const at::Tensor& t) {
  if (t.is_neg()) return t.item<double>();
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  return t.item<double>();
}

// One gradient per argument of the op (its first num_grads are the differentiable tensors).
variable_list scaled_grads(AutogradContext* ctx, const at::Tensor& grad_loss, int num_args) {
  variable_list grads(num_args);  // undefined: no gradient
  if (!grad_loss.defined()) return grads;
  const variable_list saved = ctx->get_saved_variables();
  // Traced (torch.compile / AOTAutograd: a dispatch mode or a tensor subclass): the product enters the
  // graph. Retained graph: the saved gradients may be used again, so a new tensor. A CPU 1 (a plain
  // loss.backward()): the saved gradient itself, nothing read or written. Else scaled in place: the
  // graph is freed after this backward and the op's raw gradient outputs are never handed out.
  const bool traced = c10::impl::TorchDispatchModeTLS::any_modes_set() ||
                      grad_loss.key_set().has(c10::DispatchKey::Python);
  const bool fresh = traced || torch::autograd::get_current_graph_task_keep_graph();
  const bool one = !fresh && grad_loss.is_cpu() && cpu_scalar(grad_loss) == 1.0;
  for (size_t i = 0; i < saved.size(); ++i) {
    const at::Tensor& g = saved[i];
    if (!ctx->needs_input_grad(i) || g.sym_numel() == 0) continue;  // [0]: not computed
    grads[i] = one ? g : fresh ? g * grad_loss : g.mul_(grad_loss);
  }
  return grads;
}

struct OrwCfmW2Function : torch::autograd::Function<OrwCfmW2Function> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& v, const at::Tensor& u,
                               const at::Tensor& v_ref, const at::Tensor& scores, double alpha,
                               double tau, int64_t weighting, bool grad_v, bool grad_u,
                               bool grad_v_ref) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("orw_fast::orw_cfm_w2", "")
                               .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, double, double, int64_t, bool, bool,
                                              bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return finish_forward(
        ctx, op.call(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u, grad_v_ref), 3);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scaled_grads(ctx, grad_outputs[0], 10);
  }
};

struct QuadraticFmFunction : torch::autograd::Function<QuadraticFmFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& v, const at::Tensor& u,
                               const at::Tensor& v_old, const at::Tensor& v_ref,
                               const at::Tensor& coef, double alpha, bool grad_v, bool grad_u,
                               bool grad_v_old, bool grad_v_ref, double msq_power) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("orw_fast::quadratic_fm", "")
                               .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, double, bool, bool,
                                              bool, bool, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return finish_forward(
        ctx, op.call(v, u, v_old, v_ref, coef, alpha, grad_v, grad_u, grad_v_old, grad_v_ref, msq_power),
        4);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scaled_grads(ctx, grad_outputs[0], 11);
  }
};

Outputs as_tuple(const variable_list& out) {
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

Outputs orw_cfm_w2_autograd(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                            const at::Tensor& scores, double alpha, double tau, int64_t weighting,
                            bool grad_v, bool grad_u, bool grad_v_ref) {
  return as_tuple(OrwCfmW2Function::apply(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u,
                                          grad_v_ref));
}

Outputs quadratic_fm_autograd(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old,
                              const at::Tensor& v_ref, const at::Tensor& coef, double alpha,
                              bool grad_v, bool grad_u, bool grad_v_old, bool grad_v_ref,
                              double msq_power) {
  return as_tuple(QuadraticFmFunction::apply(v, u, v_old, v_ref, coef, alpha, grad_v, grad_u,
                                             grad_v_old, grad_v_ref, msq_power));
}

}  // namespace

TORCH_LIBRARY_IMPL(orw_fast, Autograd, m) {
  m.impl("orw_cfm_w2", &orw_cfm_w2_autograd);
  m.impl("quadratic_fm", &quadratic_fm_autograd);
}

}  // namespace orw_fast
