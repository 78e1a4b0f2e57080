// Schema of the fused ORW-CFM-W2 loss op and the checks shared by its CPU and CUDA kernels.
#include "orw_cfm_w2.h"

#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

extern "C" {
// `import orw_fast._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace orw_fast {

int64_t check_inputs(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                     const at::Tensor& scores, double alpha, double tau, int64_t weighting) {
  TORCH_CHECK(v.dim() >= 1 && v.numel() > 0, "orw_cfm_w2: v must be a non-empty [B, ...] tensor");
  TORCH_CHECK(u.sizes() == v.sizes() && v_ref.sizes() == v.sizes(),
              "orw_cfm_w2: v, u, v_ref must have one shape, got ", v.sizes(), ", ", u.sizes(),
              ", ", v_ref.sizes());
  TORCH_CHECK(same_layout(u, v) && same_layout(v_ref, v),
              "orw_cfm_w2: v, u, v_ref must have identical strides");
  TORCH_CHECK(at::isFloatingType(v.scalar_type()) && u.scalar_type() == v.scalar_type() &&
                  v_ref.scalar_type() == v.scalar_type(),
              "orw_cfm_w2: v, u, v_ref must share one floating dtype");
  TORCH_CHECK(u.device() == v.device() && v_ref.device() == v.device() &&
                  scores.device() == v.device(),
              "orw_cfm_w2: all tensors must be on one device");
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  TORCH_CHECK(v.is_non_overlapping_and_dense() && (B == 1 || v.stride(0) == D),
              "orw_cfm_w2: v must be dense with the batch dimension outermost");
  const auto acc = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == B && scores.scalar_type() == acc &&
                  scores.is_contiguous(),
              "orw_cfm_w2: scores must be a contiguous [B] tensor of dtype ", acc);
  // alpha and tau enter the arithmetic in the accumulation dtype: they must be finite there.
  const double limit = acc == at::kDouble ? std::numeric_limits<double>::max()
                                          : double(std::numeric_limits<float>::max());
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0 && alpha <= limit,
              "orw_cfm_w2: alpha must be >= 0 and finite in ", acc, ", got ", alpha);
  TORCH_CHECK(std::isfinite(tau) && std::abs(tau) <= limit, "orw_cfm_w2: tau must be finite in ",
              acc, ", got ", tau);
  TORCH_CHECK(weighting >= kSoftmax && weighting <= kGiven, "orw_cfm_w2: unknown weighting ",
              weighting);
  return D;
}

LossOutputs allocate_outputs(const at::Tensor& v, const at::Tensor& scores, bool grad_v,
                             bool grad_u, bool grad_v_ref) {
  const auto vec_opts = scores.options();
  const int64_t B = v.size(0);
  auto grad = [&](bool wanted) { return wanted ? at::empty_like(v) : v.new_empty({0}); };
  return {at::empty({}, vec_opts), at::empty({B}, vec_opts), at::empty({B}, vec_opts),
          at::empty({B}, vec_opts), grad(grad_v),  grad(grad_u),
          grad(grad_v_ref)};
}

TORCH_LIBRARY(orw_fast, m) {
  m.def(
      "orw_cfm_w2(Tensor v, Tensor u, Tensor v_ref, Tensor scores, float alpha, float tau, "
      "int weighting, bool grad_v, bool grad_u, bool grad_v_ref) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace orw_fast
