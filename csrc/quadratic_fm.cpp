// Schema of the fused quadratic_fm loss op and the checks shared by its CPU and CUDA kernels.
#include "quadratic_fm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace orw_fast {

int64_t check_quadratic_inputs(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old,
                               const at::Tensor& v_ref, const at::Tensor& coef, double alpha,
                               double msq_power) {
  TORCH_CHECK(v.dim() >= 1 && v.numel() > 0, "quadratic_fm: v must be a non-empty [B, ...] tensor");
  for (const at::Tensor* t : {&u, &v_old, &v_ref}) {
    TORCH_CHECK(t->sizes() == v.sizes(), "quadratic_fm: v, u, v_old, v_ref must have one shape, got ",
                v.sizes(), " and ", t->sizes());
    TORCH_CHECK(same_layout(*t, v), "quadratic_fm: v, u, v_old, v_ref must have identical strides");
    TORCH_CHECK(t->scalar_type() == v.scalar_type() && at::isFloatingType(v.scalar_type()),
                "quadratic_fm: v, u, v_old, v_ref must share one floating dtype");
    TORCH_CHECK(t->device() == v.device(), "quadratic_fm: all tensors must be on one device");
  }
  TORCH_CHECK(coef.device() == v.device(), "quadratic_fm: all tensors must be on one device");
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  TORCH_CHECK(v.is_non_overlapping_and_dense() && (B == 1 || v.stride(0) == D),
              "quadratic_fm: v must be dense with the batch dimension outermost");
  const auto acc = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.dim() == 2 && (coef.size(0) == 5 || coef.size(0) == 6) && coef.size(1) == B &&
                  coef.scalar_type() == acc && coef.is_contiguous(),
              "quadratic_fm: coef must be a contiguous [5, B] or [6, B] tensor of dtype ", acc);
  const double limit = acc == at::kDouble ? std::numeric_limits<double>::max()
                                          : double(std::numeric_limits<float>::max());
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0 && alpha <= limit,
              "quadratic_fm: alpha must be >= 0 and finite in ", acc, ", got ", alpha);
  TORCH_CHECK(std::isfinite(msq_power) && (msq_power == 0 || coef.size(0) == 5),
              "quadratic_fm: msq_power must be finite, and 0 with a [6, B] coef, got ", msq_power);
  return D;
}

at::Tensor adaptive_coef(const at::Tensor& coef, const at::Tensor& n_1, const at::Tensor& n_2, double msq_power) {
  at::Tensor out = coef.narrow(0, 0, 5).clone();
  if (coef.size(0) == 6) {
    const at::Tensor s = coef[5];
    const at::Tensor floor = at::full_like(s, kAdaptiveFloor) / s;  // inf where s = 0: the factor is 0 there
    out[0].mul_(s / at::maximum(n_1, floor));
    out[2].mul_(s / at::maximum(n_2, floor));
  } else {
    out[0].mul_((n_1 + kMsqOffset).pow(msq_power));
    out[2].mul_((n_2 + kMsqOffset).pow(msq_power));
  }
  return out;
}

QuadraticOutputs allocate_quadratic_outputs(const at::Tensor& v, const at::Tensor& coef, bool grad_v,
                                            bool grad_u, bool grad_v_old, bool grad_v_ref) {
  const auto opts = coef.options();
  const int64_t B = v.size(0);
  auto grad = [&](bool wanted) { return wanted ? at::empty_like(v) : v.new_empty({0}); };
  return {at::empty({}, opts), at::empty({B}, opts), at::empty({B}, opts), grad(grad_v),
          grad(grad_u),        grad(grad_v_old),     grad(grad_v_ref)};
}

TORCH_LIBRARY_FRAGMENT(orw_fast, m) {
  m.def(
      "quadratic_fm(Tensor v, Tensor u, Tensor v_old, Tensor v_ref, Tensor coef, float alpha, "
      "bool grad_v, bool grad_u, bool grad_v_old, bool grad_v_ref, float msq_power=0.0) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("quadratic_fm_norms(Tensor v, Tensor u, Tensor v_old, Tensor coef, int p) -> (Tensor, Tensor)");
}

}  // namespace orw_fast
