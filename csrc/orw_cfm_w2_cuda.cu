// CUDA kernels of orw_fast::orw_cfm_w2 (contract in orw_cfm_w2.h).
//
// pass kernel: a task is one chunk of one sample; blocks loop over tasks (grid capped near the
//   device's capacity, so the per-block softmax statistics over the B rewards are computed a
//   bounded number of times). Each task reads its chunk of v, u, v_ref once (16-byte vector loads
//   when aligned), writes the requested gradients and stores its two partial sums.
// finalize kernel: one block sums the partials in chunk order and writes fm, w2, weights, loss.
// Every reduction has a fixed order for given shapes: results are bitwise reproducible.
// Both run on the current stream and allocate only through the caching allocator, so the op can
// be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "fused_common.cuh"
#include "orw_cfm_w2.h"

namespace orw_fast {
namespace {

constexpr int kIters = 4;  // vector loads per thread and tensor per task

// Softmax over the B scores, range-safe for any finite scores and tau (the expression of
// orw_fast/ops/reward_weights.py softmax_logits): logit_i = 2 * (|tau| * (q_i/2 - q*/2)) with
// q = sign(tau) * s and q* = max_j q_j, so every logit is <= 0, the largest is 0, none is NaN.
template <typename acc_t>
struct SoftmaxStats {
  acc_t qmax, sum;  // q* and sum_j exp(logit_j)
};

template <typename acc_t>
__device__ acc_t softmax_logit(acc_t s, acc_t tau, acc_t qmax) {
  const acc_t q = tau >= 0 ? s : -s;
  return acc_t(2) * (abs(tau) * (acc_t(0.5) * q - acc_t(0.5) * qmax));
}

template <typename acc_t>
__device__ SoftmaxStats<acc_t> softmax_stats(const acc_t* scores, int64_t B, acc_t tau,
                                             acc_t* smem) {
  acc_t m = -INFINITY;
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    m = MaxOp<acc_t>()(m, tau >= 0 ? scores[j] : -scores[j]);
  }
  m = block_reduce(m, MaxOp<acc_t>(), smem);
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < B; j += kThreads) s += exp(softmax_logit(scores[j], tau, m));
  s = block_reduce(s, SumOp<acc_t>(), smem);
  return {m, s};
}

template <typename acc_t>
__device__ acc_t weight_of(const acc_t* scores, int64_t B, int64_t i, acc_t tau, int64_t weighting,
                           SoftmaxStats<acc_t> st) {
  switch (weighting) {
    case kSoftmax: return acc_t(B) * exp(softmax_logit(scores[i], tau, st.qmax)) / st.sum;
    case kExp: return exp(tau * scores[i]);
    case kNone: return acc_t(1);
    default: return scores[i];
  }
}

template <typename scalar_t, int VEC, bool GV, bool GU, bool GR>
__global__ void __launch_bounds__(kThreads)
    pass_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ u,
                const scalar_t* __restrict__ r, scalar_t* __restrict__ gv,
                scalar_t* __restrict__ gu, scalar_t* __restrict__ gr,
                const at::opmath_type<scalar_t>* __restrict__ scores, int64_t B, int64_t D,
                int64_t nchunks, at::opmath_type<scalar_t> tau, int64_t weighting,
                at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int64_t kChunk = int64_t(kThreads) * VEC * kIters;
  __shared__ acc_t smem[kWarps];
  SoftmaxStats<acc_t> st{0, 1};
  if (weighting == kSoftmax) st = softmax_stats(scores, B, tau, smem);
  const acc_t c = acc_t(2) / (acc_t(B) * acc_t(D));
  const int64_t ntasks = B * nchunks;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t i = t / nchunks;
    const int64_t begin = i * D + (t % nchunks) * kChunk;
    const int64_t end = min((i + 1) * D, begin + kChunk);
    const acc_t cw = c * weight_of(scores, B, i, tau, weighting, st), ca = c * alpha;
    acc_t s1 = 0, s2 = 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t j = begin + (int64_t(it) * kThreads + threadIdx.x) * VEC;
      if (j < end) {  // VEC divides D and kChunk, so a pack is either whole or absent
        const P pv = *reinterpret_cast<const P*>(v + j);
        const P pu = *reinterpret_cast<const P*>(u + j);
        const P pr = *reinterpret_cast<const P*>(r + j);
        P ov, ou, orr;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t a = pv.val[k], d1 = a - acc_t(pu.val[k]), d2 = a - acc_t(pr.val[k]);
          s1 += d1 * d1;
          s2 += d2 * d2;
          ov.val[k] = scalar_t(cw * d1 + ca * d2);
          ou.val[k] = scalar_t(-cw * d1);
          orr.val[k] = scalar_t(-ca * d2);
        }
        if (GV) store_pack(gv + j, ov);
        if (GU) store_pack(gu + j, ou);
        if (GR) store_pack(gr + j, orr);
      }
    }
    s1 = block_reduce(s1, SumOp<acc_t>(), smem);
    s2 = block_reduce(s2, SumOp<acc_t>(), smem);
    if (threadIdx.x == 0) {
      part[t] = s1;
      part[ntasks + t] = s2;
    }
  }
}

// G threads per sample: G = 32 when there are many chunks to add, else 1.
template <typename acc_t, int G>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc_t* __restrict__ part, const acc_t* __restrict__ scores, int64_t B,
                    int64_t D, int64_t nchunks, acc_t tau, int64_t weighting, acc_t alpha,
                    acc_t* __restrict__ loss, acc_t* __restrict__ fm, acc_t* __restrict__ w2,
                    acc_t* __restrict__ weights) {
  __shared__ acc_t smem[kWarps];
  SoftmaxStats<acc_t> st{0, 1};
  if (weighting == kSoftmax) st = softmax_stats(scores, B, tau, smem);
  const int64_t ntasks = B * nchunks;
  const int lane = threadIdx.x % G;
  acc_t total = 0;
  for (int64_t i = threadIdx.x / G; i < B; i += kThreads / G) {
    acc_t s1 = 0, s2 = 0;
    for (int64_t k = lane; k < nchunks; k += G) {
      s1 += part[i * nchunks + k];
      s2 += part[ntasks + i * nchunks + k];
    }
    if (G > 1) {
      s1 = warp_reduce(s1, SumOp<acc_t>());
      s2 = warp_reduce(s2, SumOp<acc_t>());
    }
    if (lane == 0) {
      const acc_t w = weight_of(scores, B, i, tau, weighting, st);
      fm[i] = s1 / acc_t(D);
      w2[i] = s2 / acc_t(D);
      weights[i] = w;
      total += w * fm[i] + alpha * w2[i];
    }
  }
  total = block_reduce(total, SumOp<acc_t>(), smem);
  if (threadIdx.x == 0) *loss = total / acc_t(B);
}

template <typename scalar_t, int VEC>
void launch_pass(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                 const at::Tensor& scores, at::Tensor& gv, at::Tensor& gu, at::Tensor& gr,
                 int64_t nchunks, double tau, int64_t weighting, double alpha, at::Tensor& part,
                 cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = v.size(0), D = v.numel() / B;
  auto ptr = [](at::Tensor& g) { return g.numel() ? g.mutable_data_ptr<scalar_t>() : nullptr; };
  dispatch_flags([&](auto gv_t, auto gu_t, auto gr_t) {
    constexpr auto kernel = &pass_kernel<scalar_t, VEC, decltype(gv_t)::value, decltype(gu_t)::value,
                                         decltype(gr_t)::value>;
    const int64_t grid = std::min<int64_t>(B * nchunks, resident_blocks<kernel>(v.get_device()));
    kernel<<<grid, kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
        v_ref.const_data_ptr<scalar_t>(), ptr(gv), ptr(gu), ptr(gr),
        scores.const_data_ptr<acc_t>(), B, D, nchunks, acc_t(tau), weighting, acc_t(alpha),
        part.mutable_data_ptr<acc_t>());
  }, gv.numel() > 0, gu.numel() > 0, gr.numel() > 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

LossOutputs orw_cfm_w2_cuda(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                            const at::Tensor& scores, double alpha, double tau, int64_t weighting,
                            bool grad_v, bool grad_u, bool grad_v_ref) {
  const int64_t D = check_inputs(v, u, v_ref, scores, alpha, tau, weighting);
  const int64_t B = v.size(0);
  const c10::cuda::CUDAGuard guard(v.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto outs = allocate_outputs(v, scores, grad_v, grad_u, grad_v_ref);
  at::Tensor &loss = std::get<0>(outs), &fm = std::get<1>(outs), &w2 = std::get<2>(outs);
  at::Tensor &weights = std::get<3>(outs), &gv = std::get<4>(outs), &gu = std::get<5>(outs);
  at::Tensor& gr = std::get<6>(outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = D % kVec == 0 && aligned16(v) && aligned16(u) && aligned16(v_ref) &&
                     aligned16(gv) && aligned16(gu) && aligned16(gr);
    const int64_t chunk = int64_t(kThreads) * kIters * (vec ? kVec : 1);
    const int64_t nchunks = (D + chunk - 1) / chunk;
    auto part = at::empty({2 * B * nchunks}, scores.options());
    if (vec) {
      launch_pass<scalar_t, kVec>(v, u, v_ref, scores, gv, gu, gr, nchunks, tau, weighting, alpha,
                                  part, stream);
    } else {
      launch_pass<scalar_t, 1>(v, u, v_ref, scores, gv, gu, gr, nchunks, tau, weighting, alpha,
                               part, stream);
    }
    auto finalize = nchunks >= 32 ? finalize_kernel<acc_t, 32> : finalize_kernel<acc_t, 1>;
    finalize<<<1, kThreads, 0, stream>>>(
        part.const_data_ptr<acc_t>(), scores.const_data_ptr<acc_t>(), B, D, nchunks, acc_t(tau),
        weighting, acc_t(alpha), loss.mutable_data_ptr<acc_t>(), fm.mutable_data_ptr<acc_t>(),
        w2.mutable_data_ptr<acc_t>(), weights.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(orw_fast, CUDA, m) { m.impl("orw_cfm_w2", &orw_cfm_w2_cuda); }

}  // namespace orw_fast
