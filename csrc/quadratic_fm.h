// Shared contract of the fused two-policy flow-matching loss op (schema in quadratic_fm.cpp), the
// kernel behind DiffusionNFT and AWM (orw_fast/ops/quadratic_fm.py derives their coefficients).
//
// orw_fast::quadratic_fm(v, u, v_old, v_ref, coef, alpha, grad_v, grad_u, grad_v_old, grad_v_ref,
//                        msq_power=0)
//   v, u, v_old, v_ref : [B, ...], one floating dtype, one device, identical strides, dense with the
//                        batch dimension outermost (stride(0) == D = numel / B).
//   coef               : [5, B] contiguous in the accumulation dtype (float64 for float64 inputs,
//                        float32 otherwise): rows w1, m1, w2, m2, w3 of each sample's quadratic form.
//   With a = v_old - u, e = v - v_old (per element), x1 = a + m1 e, x2 = a + m2 e and k = v - v_ref:
//     policy_i = mean_d (w1 x1^2 + w2 x2^2 + w3 e^2),  kl_i = mean_d k^2,
//     loss = mean_i (policy_i + alpha kl_i)
//   returns (loss [], policy [B], kl [B], grad_v, grad_u, grad_v_old, grad_v_ref): the scalars and
//   vectors in the accumulation dtype; each grad is d loss / d input, shaped and strided like v in the
//   input dtype, or an empty [0] tensor when its flag is false. With c = 2 / (B D), y1 = w1 x1,
//   y2 = w2 x2, y3 = w3 e: grad_v = c (m1 y1 + m2 y2 + y3 + alpha k), grad_u = -c (y1 + y2),
//   grad_v_old = c ((1 - m1) y1 + (1 - m2) y2 - y3), grad_v_ref = -c alpha k.
//   (Two weighted squares rather than a general form p a^2 + q e^2 + 2 s a e: no cancellation, e.g.
//   AWM's grad_v_old is exactly -c w3 e for any advantage, m1 = 1.)
//   Two adaptive forms rescale w1 and w2 by a function of the sample's own norms first (the norms need a
//   reduction over the sample before any of its gradients can be written), all in the same call:
//   - coef [6, B], row 5 = s >= 0 (DiffusionNFT's adaptive weight, orw_fast/ops/nft.py): w1, w2 times
//     s / max(n_1, 1e-5 / s) and s / max(n_2, 1e-5 / s) with the L1 norms (p = 1) below (0 where s = 0);
//   - msq_power = q != 0 (coef [5, B]; AWM's huber and ghuber weightings, orw_fast/ops/awm.py): w1, w2 times
//     (n_1 + 1e-10)^q and (n_2 + 1e-10)^q with the mean squares (p = 2) below.
//   The CPU kernel reads each sample for its norms and its gradients in one task, while it is in the cache;
//   the CUDA kernel runs quadratic_fm_norms first.
//
// orw_fast::quadratic_fm_norms(v, u, v_old, coef, p) -> (n_1 [B], n_2 [B])
//   Same inputs and checks (v_ref absent; only the rows m1, m2 of coef are read), p in {1, 2}: the
//   per-sample norms of the two squares' residuals, n_k = mean_d |a + m_k e|^p, in the accumulation
//   dtype, reduced in a fixed order. Never differentiated (no autograd: callers pass detached tensors).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "fused_common.h"

namespace orw_fast {

using QuadraticOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                    at::Tensor, at::Tensor>;

// Validates the contract above (TORCH_CHECK) and returns D.
int64_t check_quadratic_inputs(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old,
                               const at::Tensor& v_ref, const at::Tensor& coef, double alpha,
                               double msq_power = 0.0);

// The adaptive weight's floor (the reference code's max(mean |x̂ - x|, 1e-5)).
constexpr double kAdaptiveFloor = 1e-5;
// The offset of the mean square in the msq_power form (the AWM reference's mse + 1e-10).
constexpr double kMsqOffset = 1e-10;

// The plain [5, B] coef of an adaptive form from the sample norms n_1, n_2 (the L1 norms for coef [6, B],
// else the mean squares and msq_power): w1, w2 rescaled (ATen ops, any device).
at::Tensor adaptive_coef(const at::Tensor& coef, const at::Tensor& n_1, const at::Tensor& n_2, double msq_power);

// Allocates the seven outputs (uninitialised) on v's device.
QuadraticOutputs allocate_quadratic_outputs(const at::Tensor& v, const at::Tensor& coef, bool grad_v,
                                            bool grad_u, bool grad_v_old, bool grad_v_ref);

}  // namespace orw_fast
