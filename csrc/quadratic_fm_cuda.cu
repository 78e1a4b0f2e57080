// CUDA kernels of orw_fast::quadratic_fm (contract in quadratic_fm.h), in the pattern of
// orw_cfm_w2_cuda.cu: a grid-stride pass kernel (a task is one chunk of one sample; it reads its chunk
// of v, u, v_old, v_ref once with 16-byte vector loads when aligned, writes the requested gradients and
// stores its two partial sums) and a one-block finalize kernel that adds the partials in chunk order.
// quadratic_fm_norms runs a norms kernel on the same tasks (v, u, v_old only) and the same finalize kernel.
// Fixed reduction orders: bitwise reproducible. Current stream, caching allocator only: capturable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fused_common.cuh"
#include "quadratic_fm.h"

namespace orw_fast {
namespace {

constexpr int kIters = 4;  // vector loads per thread and tensor per task

template <typename scalar_t, int VEC, bool GV, bool GU, bool GO, bool GR>
__global__ void __launch_bounds__(kThreads)
    quadratic_pass_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ u,
                          const scalar_t* __restrict__ o, const scalar_t* __restrict__ r,
                          scalar_t* __restrict__ gv, scalar_t* __restrict__ gu, scalar_t* __restrict__ go,
                          scalar_t* __restrict__ gr, const at::opmath_type<scalar_t>* __restrict__ coef,
                          int64_t B, int64_t D, int64_t nchunks, at::opmath_type<scalar_t> alpha,
                          at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int64_t kChunk = int64_t(kThreads) * VEC * kIters;
  __shared__ acc_t smem[kWarps];
  const acc_t c = acc_t(2) / (acc_t(B) * acc_t(D)), ca = c * alpha;
  const int64_t ntasks = B * nchunks;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t i = t / nchunks;
    const int64_t begin = i * D + (t % nchunks) * kChunk;
    const int64_t end = min((i + 1) * D, begin + kChunk);
    const acc_t w1 = coef[i], m1 = coef[B + i], w2 = coef[2 * B + i], m2 = coef[3 * B + i], w3 = coef[4 * B + i];
    acc_t s1 = 0, s2 = 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t j = begin + (int64_t(it) * kThreads + threadIdx.x) * VEC;
      if (j < end) {  // VEC divides D and kChunk, so a pack is either whole or absent
        const P pv = *reinterpret_cast<const P*>(v + j);
        const P pu = *reinterpret_cast<const P*>(u + j);
        const P po = *reinterpret_cast<const P*>(o + j);
        const P pr = *reinterpret_cast<const P*>(r + j);
        P ov, ou, oo, orr;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t vk = pv.val[k], ok = po.val[k];
          const acc_t a = ok - acc_t(pu.val[k]), e = vk - ok, kl = vk - acc_t(pr.val[k]);
          const acc_t x1 = a + m1 * e, x2 = a + m2 * e;
          const acc_t y1 = w1 * x1, y2 = w2 * x2, y3 = w3 * e;
          s1 += x1 * y1 + x2 * y2 + e * y3;
          s2 += kl * kl;
          ov.val[k] = scalar_t(c * (m1 * y1 + m2 * y2 + y3) + ca * kl);
          ou.val[k] = scalar_t(-c * (y1 + y2));
          oo.val[k] = scalar_t(c * ((1 - m1) * y1 + (1 - m2) * y2 - y3));
          orr.val[k] = scalar_t(-ca * kl);
        }
        if (GV) store_pack(gv + j, ov);
        if (GU) store_pack(gu + j, ou);
        if (GO) store_pack(go + j, oo);
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

// quadratic_fm_norms: the same tasks as the pass kernel, reading v, u, v_old only; partial sums of
// |a + m1 e|^NORM and |a + m2 e|^NORM (added by the finalize kernel below, with alpha = 0).
template <typename scalar_t, int VEC, int NORM>
__global__ void __launch_bounds__(kThreads)
    quadratic_norms_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ u,
                        const scalar_t* __restrict__ o, const at::opmath_type<scalar_t>* __restrict__ coef,
                        int64_t B, int64_t D, int64_t nchunks, at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int64_t kChunk = int64_t(kThreads) * VEC * kIters;
  __shared__ acc_t smem[kWarps];
  const int64_t ntasks = B * nchunks;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t i = t / nchunks;
    const int64_t begin = i * D + (t % nchunks) * kChunk;
    const int64_t end = min((i + 1) * D, begin + kChunk);
    const acc_t m1 = coef[B + i], m2 = coef[3 * B + i];
    acc_t s1 = 0, s2 = 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t j = begin + (int64_t(it) * kThreads + threadIdx.x) * VEC;
      if (j < end) {
        const P pv = *reinterpret_cast<const P*>(v + j);
        const P pu = *reinterpret_cast<const P*>(u + j);
        const P po = *reinterpret_cast<const P*>(o + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t ok = po.val[k], a = ok - acc_t(pu.val[k]), e = acc_t(pv.val[k]) - ok;
          const acc_t x1 = a + m1 * e, x2 = a + m2 * e;
          s1 += NORM == 1 ? ::abs(x1) : x1 * x1;
          s2 += NORM == 1 ? ::abs(x2) : x2 * x2;
        }
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

// One block; G threads per sample: G = 32 when there are many chunks to add, else 1.
template <typename acc_t, int G>
__global__ void __launch_bounds__(kThreads)
    quadratic_finalize_kernel(const acc_t* __restrict__ part, int64_t B, int64_t D, int64_t nchunks, acc_t alpha,
                              acc_t* __restrict__ loss, acc_t* __restrict__ policy, acc_t* __restrict__ kl) {
  __shared__ acc_t smem[kWarps];
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
      policy[i] = s1 / acc_t(D);
      kl[i] = s2 / acc_t(D);
      total += policy[i] + alpha * kl[i];
    }
  }
  total = block_reduce(total, SumOp<acc_t>(), smem);
  if (threadIdx.x == 0) *loss = total / acc_t(B);
}

template <typename scalar_t, int VEC>
void launch_pass(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old, const at::Tensor& v_ref,
                 const at::Tensor& coef, at::Tensor& gv, at::Tensor& gu, at::Tensor& go, at::Tensor& gr,
                 int64_t nchunks, double alpha, at::Tensor& part, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = v.size(0), D = v.numel() / B;
  auto ptr = [](at::Tensor& g) { return g.numel() ? g.mutable_data_ptr<scalar_t>() : nullptr; };
  dispatch_flags([&](auto gv_t, auto gu_t, auto go_t, auto gr_t) {
    constexpr auto kernel = &quadratic_pass_kernel<scalar_t, VEC, decltype(gv_t)::value, decltype(gu_t)::value,
                                                   decltype(go_t)::value, decltype(gr_t)::value>;
    const int64_t grid = std::min<int64_t>(B * nchunks, resident_blocks<kernel>(v.get_device()));
    kernel<<<grid, kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), v_old.const_data_ptr<scalar_t>(),
        v_ref.const_data_ptr<scalar_t>(), ptr(gv), ptr(gu), ptr(go), ptr(gr), coef.const_data_ptr<acc_t>(), B, D,
        nchunks, acc_t(alpha), part.mutable_data_ptr<acc_t>());
  }, gv.numel() > 0, gu.numel() > 0, go.numel() > 0, gr.numel() > 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quadratic_fm_norms_cuda(const at::Tensor& v, const at::Tensor& u,
                                                           const at::Tensor& v_old, const at::Tensor& coef,
                                                           int64_t p);

QuadraticOutputs quadratic_fm_cuda(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old,
                                   const at::Tensor& v_ref, const at::Tensor& coef, double alpha, bool grad_v,
                                   bool grad_u, bool grad_v_old, bool grad_v_ref, double msq_power) {
  const int64_t D = check_quadratic_inputs(v, u, v_old, v_ref, coef, alpha, msq_power);
  const bool l1_form = coef.size(0) == 6;
  if (l1_form || msq_power != 0) {  // an adaptive form: its norms pass, then this op with w1, w2 rescaled
    const auto [n_1, n_2] = quadratic_fm_norms_cuda(v, u, v_old, coef, l1_form ? 1 : 2);
    return quadratic_fm_cuda(v, u, v_old, v_ref, adaptive_coef(coef, n_1, n_2, msq_power), alpha, grad_v,
                             grad_u, grad_v_old, grad_v_ref, 0.0);
  }
  const int64_t B = v.size(0);
  const c10::cuda::CUDAGuard guard(v.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto outs = allocate_quadratic_outputs(v, coef, grad_v, grad_u, grad_v_old, grad_v_ref);
  at::Tensor &loss = std::get<0>(outs), &policy = std::get<1>(outs), &kl = std::get<2>(outs);
  at::Tensor &gv = std::get<3>(outs), &gu = std::get<4>(outs), &go = std::get<5>(outs), &gr = std::get<6>(outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "quadratic_fm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = D % kVec == 0 && aligned16(v) && aligned16(u) && aligned16(v_old) && aligned16(v_ref) &&
                     aligned16(gv) && aligned16(gu) && aligned16(go) && aligned16(gr);
    const int64_t chunk = int64_t(kThreads) * kIters * (vec ? kVec : 1);
    const int64_t nchunks = (D + chunk - 1) / chunk;
    auto part = at::empty({2 * B * nchunks}, coef.options());
    if (vec) {
      launch_pass<scalar_t, kVec>(v, u, v_old, v_ref, coef, gv, gu, go, gr, nchunks, alpha, part, stream);
    } else {
      launch_pass<scalar_t, 1>(v, u, v_old, v_ref, coef, gv, gu, go, gr, nchunks, alpha, part, stream);
    }
    auto finalize = nchunks >= 32 ? quadratic_finalize_kernel<acc_t, 32> : quadratic_finalize_kernel<acc_t, 1>;
    finalize<<<1, kThreads, 0, stream>>>(part.const_data_ptr<acc_t>(), B, D, nchunks, acc_t(alpha),
                                         loss.mutable_data_ptr<acc_t>(), policy.mutable_data_ptr<acc_t>(),
                                         kl.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outs;
}

template <typename scalar_t, int VEC, int NORM>
void launch_norms(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old, const at::Tensor& coef,
                  int64_t nchunks, at::Tensor& part, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = v.size(0), D = v.numel() / B;
  constexpr auto kernel = &quadratic_norms_kernel<scalar_t, VEC, NORM>;
  const int64_t grid = std::min<int64_t>(B * nchunks, resident_blocks<kernel>(v.get_device()));
  kernel<<<grid, kThreads, 0, stream>>>(v.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                        v_old.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(), B, D,
                                        nchunks, part.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quadratic_fm_norms_cuda(const at::Tensor& v, const at::Tensor& u,
                                                           const at::Tensor& v_old, const at::Tensor& coef,
                                                           int64_t p) {
  const int64_t D = check_quadratic_inputs(v, u, v_old, v_old, coef, 0.0);
  TORCH_CHECK(p == 1 || p == 2, "quadratic_fm_norms: p must be 1 or 2, got ", p);
  const int64_t B = v.size(0);
  const c10::cuda::CUDAGuard guard(v.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor n_1 = at::empty({B}, coef.options()), n_2 = at::empty({B}, coef.options());
  at::Tensor scratch = at::empty({}, coef.options());  // the finalize kernel's loss, unused
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "quadratic_fm_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = D % kVec == 0 && aligned16(v) && aligned16(u) && aligned16(v_old);
    const int64_t chunk = int64_t(kThreads) * kIters * (vec ? kVec : 1);
    const int64_t nchunks = (D + chunk - 1) / chunk;
    auto part = at::empty({2 * B * nchunks}, coef.options());
    auto launch = vec ? (p == 1 ? launch_norms<scalar_t, kVec, 1> : launch_norms<scalar_t, kVec, 2>)
                      : (p == 1 ? launch_norms<scalar_t, 1, 1> : launch_norms<scalar_t, 1, 2>);
    launch(v, u, v_old, coef, nchunks, part, stream);
    auto finalize = nchunks >= 32 ? quadratic_finalize_kernel<acc_t, 32> : quadratic_finalize_kernel<acc_t, 1>;
    finalize<<<1, kThreads, 0, stream>>>(part.const_data_ptr<acc_t>(), B, D, nchunks, acc_t(0),
                                         scratch.mutable_data_ptr<acc_t>(), n_1.mutable_data_ptr<acc_t>(),
                                         n_2.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {n_1, n_2};
}

}  // namespace

TORCH_LIBRARY_IMPL(orw_fast, CUDA, m) {
  m.impl("quadratic_fm", &quadratic_fm_cuda);
  m.impl("quadratic_fm_norms", &quadratic_fm_norms_cuda);
}

}  // namespace orw_fast
