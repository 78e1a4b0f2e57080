// CPU kernels of orw_fast::quadratic_fm and quadratic_fm_norms (contract in quadratic_fm.h): one pass over
// v, u, v_old, v_ref that produces the per-sample sums and the gradients; one over v, u, v_old for the
// per-sample norms. A sample with m1 = 1 and w2 = 0 (AWM's) has one square, x1 = v - u: both passes take
// a lighter form for it (its norms read v and u only, its gradient pass computes no x2);
// in an adaptive form (coef [6, B] or msq_power != 0), both for one sample in one task
// (its second read hits the cache). As in orw_cfm_w2_cpu.cpp, work is split into
// fixed chunks of a sample, each writing its own partial sums, added afterwards in chunk order: the
// result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_stream.h"
#include "quadratic_fm.h"

namespace orw_fast {
namespace {

constexpr int64_t kChunk = 16384;  // elements of one sample per task
constexpr int64_t kLanes = 16;     // independent accumulators; the k-loop below vectorizes

template <typename acc_t>
struct Coef {
  acc_t w1, m1, w2, m2, w3, c, ca;  // the sample's quadratic form; c = 2 / (B D), ca = c alpha
};

// Sums of the quadratic form and of (v - v_ref)^2 over the flat range [begin, end) inside one sample,
// writing the requested gradients (with streaming stores if `stream`: cpu_stream.h). ONE_SQUARE: the
// sample's m1 = 1 and w2 = 0 (AWM's form), so x1 = v - u and no x2 term: about half the arithmetic, which
// on a 2-core Zen 1 makes an AWM step 6-9 % faster (its loads are what bounds it; fewer instructions keep
// more of them in flight).
template <typename scalar_t, bool GV, bool GU, bool GO, bool GR, bool ONE_SQUARE>
ORW_FAST_CPU_CLONES void chunk_pass(const scalar_t* __restrict__ v, const scalar_t* __restrict__ u,
                                    const scalar_t* __restrict__ o, const scalar_t* __restrict__ r,
                                    scalar_t* __restrict__ gv, scalar_t* __restrict__ gu,
                                    scalar_t* __restrict__ go, scalar_t* __restrict__ gr, int64_t begin,
                                    int64_t end, Coef<at::opmath_type<scalar_t>> k, bool stream,
                                    at::opmath_type<scalar_t>* out_policy, at::opmath_type<scalar_t>* out_kl) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t s1[kLanes] = {}, s2[kLanes] = {};
  // Element j into lane `lane` of the sums and into index w of the outputs ov, ou, oo, orr.
  auto body = [&](int64_t j, int64_t lane, scalar_t* __restrict__ ov, scalar_t* __restrict__ ou,
                  scalar_t* __restrict__ oo, scalar_t* __restrict__ orr, int64_t w) __attribute__((always_inline)) {
    const acc_t vj = v[j], oj = o[j], e = vj - oj, kl = vj - acc_t(r[j]);
    if (ONE_SQUARE) {
      const acc_t x1 = vj - acc_t(u[j]), y1 = k.w1 * x1, y3 = k.w3 * e;
      s1[lane] += x1 * y1 + e * y3;
      s2[lane] += kl * kl;
      if (GV) ov[w] = scalar_t(k.c * (y1 + y3) + k.ca * kl);
      if (GU) ou[w] = scalar_t(-k.c * y1);
      if (GO) oo[w] = scalar_t(-k.c * y3);
      if (GR) orr[w] = scalar_t(-k.ca * kl);
      return;
    }
    const acc_t a = oj - acc_t(u[j]), x1 = a + k.m1 * e, x2 = a + k.m2 * e;
    const acc_t y1 = k.w1 * x1, y2 = k.w2 * x2, y3 = k.w3 * e;
    s1[lane] += x1 * y1 + x2 * y2 + e * y3;
    s2[lane] += kl * kl;
    if (GV) ov[w] = scalar_t(k.c * (k.m1 * y1 + k.m2 * y2 + y3) + k.ca * kl);
    if (GU) ou[w] = scalar_t(-k.c * (y1 + y2));
    if (GO) oo[w] = scalar_t(k.c * ((1 - k.m1) * y1 + (1 - k.m2) * y2 - y3));
    if (GR) orr[w] = scalar_t(-k.ca * kl);
  };
  lane_loop<scalar_t, kLanes>(begin, end, stream, gv, gu, go, gr, {v, u, o, r}, body);
  acc_t t1 = 0, t2 = 0;
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    t1 += s1[lane];
    t2 += s2[lane];
  }
  *out_policy = t1;
  *out_kl = t2;
}

// Sums of |x1|^P and |x2|^P (P = 1 or 2; x1 = a + m1 e, x2 = a + m2 e) over the flat range [begin, end)
// inside one sample (with `prefetch`, the inputs read are prefetched: prefetch_ahead). DIRECT1 (m1 = 1):
// x1 as v - u. WITH2 false: no x2 (*out2 = 0; a sample whose w2 = 0 needs none); with DIRECT1 too, o is
// not read at all (AWM's forms: 2 input streams instead of 3).
template <typename scalar_t, int P, bool DIRECT1, bool WITH2>
ORW_FAST_CPU_CLONES void chunk_norms(const scalar_t* __restrict__ v, const scalar_t* __restrict__ u,
                                     const scalar_t* __restrict__ o, int64_t begin, int64_t end,
                                     at::opmath_type<scalar_t> m1, at::opmath_type<scalar_t> m2, bool prefetch,
                                     at::opmath_type<scalar_t>* out1, at::opmath_type<scalar_t>* out2) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReadsOld = WITH2 || !DIRECT1;
  acc_t s1[kLanes] = {}, s2[kLanes] = {};
  auto body = [&](int64_t j, int64_t lane) __attribute__((always_inline)) {
    const acc_t vj = v[j], uj = u[j];
    const acc_t oj = kReadsOld ? acc_t(o[j]) : acc_t(0), a = oj - uj, e = vj - oj;
    const acc_t x1 = DIRECT1 ? vj - uj : a + m1 * e;
    s1[lane] += P == 1 ? std::abs(x1) : x1 * x1;
    if (WITH2) {
      const acc_t x2 = a + m2 * e;
      s2[lane] += P == 1 ? std::abs(x2) : x2 * x2;
    }
  };
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    if (prefetch) prefetch_ahead<scalar_t, 3>({v, u, kReadsOld ? o : nullptr}, j);
#pragma omp simd
    for (int64_t lane = 0; lane < kLanes; ++lane) body(j + lane, lane);
  }
  for (int64_t lane = 0; j < end; ++j, ++lane) body(j, lane);
  acc_t t1 = 0, t2 = 0;
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    t1 += s1[lane];
    t2 += s2[lane];
  }
  *out1 = t1;
  *out2 = t2;
}

// The per-sample norms n_1, n_2 of sample i (quadratic_fm_norms' chunks, in their order) into n[0], n[1];
// with `with2` false, n[1] = 0 (chunk_norms' WITH2). m1 = 1 takes chunk_norms' DIRECT1 form.
template <typename scalar_t>
void sample_norms(const scalar_t* v, const scalar_t* u, const scalar_t* o, int64_t i, int64_t D, int64_t p,
                  at::opmath_type<scalar_t> m1, at::opmath_type<scalar_t> m2, bool with2, bool prefetch,
                  at::opmath_type<scalar_t>* n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t t1 = 0, t2 = 0;
  for (int64_t begin = i * D; begin < (i + 1) * D; begin += kChunk) {
    const int64_t end = std::min((i + 1) * D, begin + kChunk);
    acc_t s1, s2;
    dispatch_flags(
        [&](auto direct1, auto with2_t) {
          constexpr bool kDirect1 = decltype(direct1)::value, kWith2 = decltype(with2_t)::value;
          if (p == 1) {
            chunk_norms<scalar_t, 1, kDirect1, kWith2>(v, u, o, begin, end, m1, m2, prefetch, &s1, &s2);
          } else {
            chunk_norms<scalar_t, 2, kDirect1, kWith2>(v, u, o, begin, end, m1, m2, prefetch, &s1, &s2);
          }
        },
        m1 == acc_t(1), with2);
    t1 += s1;
    t2 += s2;
  }
  n[0] = t1 / acc_t(D);
  n[1] = t2 / acc_t(D);
}

std::tuple<at::Tensor, at::Tensor> quadratic_fm_norms_cpu(const at::Tensor& v, const at::Tensor& u,
                                                          const at::Tensor& v_old, const at::Tensor& coef,
                                                          int64_t p) {
  const int64_t D = check_quadratic_inputs(v, u, v_old, v_old, coef, 0.0);
  TORCH_CHECK(p == 1 || p == 2, "quadratic_fm_norms: p must be 1 or 2, got ", p);
  const int64_t B = v.size(0);
  at::Tensor n_1 = at::empty({B}, coef.options()), n_2 = at::empty({B}, coef.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "quadratic_fm_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cf = coef.const_data_ptr<acc_t>();
    acc_t* p1 = n_1.data_ptr<acc_t>();
    acc_t* p2 = n_2.data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        acc_t n[2];
        sample_norms<scalar_t>(v.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                               v_old.const_data_ptr<scalar_t>(), i, D, p, cf[B + i], cf[3 * B + i], true, false, n);
        p1[i] = n[0];
        p2[i] = n[1];
      }
    });
  });
  return {n_1, n_2};
}

QuadraticOutputs quadratic_fm_cpu(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_old,
                                  const at::Tensor& v_ref, const at::Tensor& coef, double alpha, bool grad_v,
                                  bool grad_u, bool grad_v_old, bool grad_v_ref, double msq_power) {
  const int64_t D = check_quadratic_inputs(v, u, v_old, v_ref, coef, alpha, msq_power);
  const int64_t B = v.size(0), nchunks = (D + kChunk - 1) / kChunk;
  const bool l1_form = coef.size(0) == 6, adaptive = l1_form || msq_power != 0;
  auto outs = allocate_quadratic_outputs(v, coef, grad_v, grad_u, grad_v_old, grad_v_ref);
  at::Tensor &loss = std::get<0>(outs), &policy = std::get<1>(outs), &kl = std::get<2>(outs);
  at::Tensor &gv = std::get<3>(outs), &gu = std::get<4>(outs), &go = std::get<5>(outs), &gr = std::get<6>(outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "quadratic_fm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cf = coef.const_data_ptr<acc_t>();
    const acc_t c = acc_t(2) / (acc_t(B) * acc_t(D));
    std::vector<acc_t> part(2 * B * nchunks);
    const scalar_t *pv = v.const_data_ptr<scalar_t>(), *pu = u.const_data_ptr<scalar_t>();
    const scalar_t *po = v_old.const_data_ptr<scalar_t>(), *pr = v_ref.const_data_ptr<scalar_t>();
    auto ptr = [](at::Tensor& g) { return g.numel() ? g.data_ptr<scalar_t>() : nullptr; };
    const int64_t ngrads = int64_t(grad_v) + grad_u + grad_v_old + grad_v_ref;
    const bool stream = ngrads > 0 && should_stream(v.numel() * v.element_size() * (4 + ngrads));
    dispatch_flags([&](auto gv_t, auto gu_t, auto go_t, auto gr_t) {
      auto pass = [&](int64_t t, const Coef<acc_t>& k) {  // chunk t = i * nchunks + (chunk of sample i)
        const int64_t i = t / nchunks, begin = i * D + (t % nchunks) * kChunk;
        const int64_t end = std::min((i + 1) * D, begin + kChunk);
        dispatch_flags(
            [&](auto one_square) {
              chunk_pass<scalar_t, decltype(gv_t)::value, decltype(gu_t)::value, decltype(go_t)::value,
                         decltype(gr_t)::value, decltype(one_square)::value>(
                  pv, pu, po, pr, ptr(gv), ptr(gu), ptr(go), ptr(gr), begin, end, k, stream, &part[t],
                  &part[B * nchunks + t]);
            },
            k.m1 == acc_t(1) && k.w2 == acc_t(0));
      };
      auto coef_of = [&](int64_t i) {
        return Coef<acc_t>{cf[i], cf[B + i], cf[2 * B + i], cf[3 * B + i], cf[4 * B + i], c, c * acc_t(alpha)};
      };
      if (!adaptive) {
        at::parallel_for(0, B * nchunks, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) pass(t, coef_of(t / nchunks));
        });
        return;
      }
      // One task per sample: its norms (those of quadratic_fm_norms, bit for bit), then its gradient pass
      // while its inputs are still in the cache.
      const acc_t q = acc_t(msq_power), offset = acc_t(kMsqOffset);
      at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          acc_t n[2];
          sample_norms<scalar_t>(pv, pu, po, i, D, l1_form ? 1 : 2, cf[B + i], cf[3 * B + i], cf[2 * B + i] != 0,
                                 stream, n);
          Coef<acc_t> k = coef_of(i);
          if (l1_form) {
            const acc_t s = cf[5 * B + i];
            k.w1 *= s / std::max(n[0], acc_t(kAdaptiveFloor) / s);
            k.w2 *= s / std::max(n[1], acc_t(kAdaptiveFloor) / s);
          } else {
            k.w1 *= std::pow(n[0] + offset, q);
            k.w2 *= std::pow(n[1] + offset, q);
          }
          for (int64_t ch = 0; ch < nchunks; ++ch) pass(i * nchunks + ch, k);
        }
      });
    }, grad_v, grad_u, grad_v_old, grad_v_ref);
    acc_t* policy_p = policy.data_ptr<acc_t>();
    acc_t* kl_p = kl.data_ptr<acc_t>();
    acc_t total = 0;
    for (int64_t i = 0; i < B; ++i) {
      acc_t s1 = 0, s2 = 0;
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        s1 += part[i * nchunks + ch];
        s2 += part[B * nchunks + i * nchunks + ch];
      }
      policy_p[i] = s1 / acc_t(D);
      kl_p[i] = s2 / acc_t(D);
      total += policy_p[i] + acc_t(alpha) * kl_p[i];
    }
    loss.fill_(total / acc_t(B));
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(orw_fast, CPU, m) {
  m.impl("quadratic_fm", &quadratic_fm_cpu);
  m.impl("quadratic_fm_norms", &quadratic_fm_norms_cpu);
}

}  // namespace orw_fast
