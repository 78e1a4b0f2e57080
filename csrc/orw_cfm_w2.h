// Shared contract of the fused ORW-CFM-W2 loss op (schema in orw_cfm_w2.cpp).
//
// orw_fast::orw_cfm_w2(v, u, v_ref, scores, alpha, tau, weighting, grad_v, grad_u, grad_v_ref)
//   v, u, v_ref : [B, ...], one floating dtype, one device, identical strides, dense with the batch
//                 dimension outermost (stride(0) == D = numel / B), so a sample is D adjacent elements.
//   scores      : [B] in the accumulation dtype (float64 for float64 inputs, float32 otherwise):
//                 rewards, or the weights themselves when weighting == kGiven.
//   returns (loss [], fm [B], w2 [B], weights [B], grad_v, grad_u, grad_v_ref):
//     fm_i = mean_d (v-u)^2, w2_i = mean_d (v-v_ref)^2, loss = mean_i(w_i fm_i + alpha w2_i),
//     the three scalars/vectors in the accumulation dtype; each grad is d loss / d input, shaped
//     and strided like v in the input dtype, or an empty [0] tensor when its flag is false.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "fused_common.h"

namespace orw_fast {

enum Weighting : int64_t { kSoftmax = 0, kExp = 1, kNone = 2, kGiven = 3 };

using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>;

// Validates the contract above (TORCH_CHECK) and returns D.
int64_t check_inputs(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                     const at::Tensor& scores, double alpha, double tau, int64_t weighting);

// Allocates the seven outputs (uninitialised) on v's device.
LossOutputs allocate_outputs(const at::Tensor& v, const at::Tensor& scores, bool grad_v,
                             bool grad_u, bool grad_v_ref);

}  // namespace orw_fast
