// CPU kernel of orw_fast::orw_cfm_w2: one pass over v, u, v_ref that produces the per-sample
// sums and the gradients. Work is split into fixed chunks of a sample (at::parallel_for), each
// writing its own partial sums, which are then added in chunk order: the result does not depend
// on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_stream.h"
#include "orw_cfm_w2.h"

namespace orw_fast {
namespace {

constexpr int64_t kChunk = 16384;  // elements of one sample per task
constexpr int64_t kLanes = 16;     // independent accumulators; the k-loop below vectorizes

// Softmax logits as in orw_fast/ops/reward_weights.py softmax_logits: 2 * (|tau| * (q/2 - q*/2)),
// q = sign(tau) * s, q* = max q; range-safe for any finite scores and tau.
template <typename acc_t>
void compute_weights(const acc_t* scores, int64_t B, acc_t tau, int64_t weighting, acc_t* w) {
  switch (weighting) {
    case kSoftmax: {
      const acc_t sign = tau >= 0 ? acc_t(1) : acc_t(-1), a = std::abs(tau);
      acc_t qmax = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < B; ++i) qmax = std::max(qmax, sign * scores[i]);
      auto logit = [&](int64_t i) {
        return acc_t(2) * (a * (acc_t(0.5) * (sign * scores[i]) - acc_t(0.5) * qmax));
      };
      acc_t s = 0;
      for (int64_t i = 0; i < B; ++i) s += std::exp(logit(i));
      for (int64_t i = 0; i < B; ++i) w[i] = acc_t(B) * std::exp(logit(i)) / s;
      break;
    }
    case kExp:
      for (int64_t i = 0; i < B; ++i) w[i] = std::exp(tau * scores[i]);
      break;
    case kNone:
      std::fill(w, w + B, acc_t(1));
      break;
    default:
      std::copy(scores, scores + B, w);
  }
}

// Sums of (v-u)^2 and (v-v_ref)^2 over the flat range [begin, end) inside one sample, writing
// the gradients gv = cw*d1 + ca*d2, gu = -cw*d1, gr = -ca*d2 (d1 = v-u, d2 = v-v_ref) where
// requested (with streaming stores if `stream`: cpu_stream.h). kLanes independent accumulators let
// the compiler vectorize without reassociating.
template <typename scalar_t, bool GV, bool GU, bool GR>
ORW_FAST_CPU_CLONES void chunk_pass(const scalar_t* __restrict__ v, const scalar_t* __restrict__ u,
                                    const scalar_t* __restrict__ r, scalar_t* __restrict__ gv,
                                    scalar_t* __restrict__ gu, scalar_t* __restrict__ gr,
                                    int64_t begin, int64_t end, at::opmath_type<scalar_t> cw,
                                    at::opmath_type<scalar_t> ca, bool stream,
                                    at::opmath_type<scalar_t>* out_fm, at::opmath_type<scalar_t>* out_w2) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t s1[kLanes] = {}, s2[kLanes] = {};
  auto body = [&](int64_t j, int64_t k, scalar_t* __restrict__ ov, scalar_t* __restrict__ ou,
                  scalar_t* __restrict__ orr, scalar_t*, int64_t w) __attribute__((always_inline)) {
    const acc_t a = v[j], d1 = a - acc_t(u[j]), d2 = a - acc_t(r[j]);
    s1[k] += d1 * d1;
    s2[k] += d2 * d2;
    if (GV) ov[w] = scalar_t(cw * d1 + ca * d2);
    if (GU) ou[w] = scalar_t(-cw * d1);
    if (GR) orr[w] = scalar_t(-ca * d2);
  };
  lane_loop<scalar_t, kLanes>(begin, end, stream, gv, gu, gr, static_cast<scalar_t*>(nullptr), {v, u, r, nullptr},
                              body);
  acc_t t1 = 0, t2 = 0;
  for (int64_t k = 0; k < kLanes; ++k) {
    t1 += s1[k];
    t2 += s2[k];
  }
  *out_fm = t1;
  *out_w2 = t2;
}

template <typename scalar_t, bool GV, bool GU, bool GR>
void run_pass(const scalar_t* v, const scalar_t* u, const scalar_t* r, scalar_t* gv, scalar_t* gu,
              scalar_t* gr, int64_t B, int64_t D, const at::opmath_type<scalar_t>* w,
              at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t>* part_fm,
              at::opmath_type<scalar_t>* part_w2, int64_t nchunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t c = acc_t(2) / (acc_t(B) * acc_t(D));
  const int64_t ngrads = int64_t(GV) + GU + GR;
  const bool stream = ngrads > 0 && should_stream(B * D * int64_t(sizeof(scalar_t)) * (3 + ngrads));
  at::parallel_for(0, B * nchunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / nchunks, begin = i * D + (t % nchunks) * kChunk;
      const int64_t end = std::min((i + 1) * D, begin + kChunk);
      chunk_pass<scalar_t, GV, GU, GR>(v, u, r, gv, gu, gr, begin, end, c * w[i], c * alpha, stream,
                                       part_fm + t, part_w2 + t);
    }
  });
}

LossOutputs orw_cfm_w2_cpu(const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                           const at::Tensor& scores, double alpha, double tau, int64_t weighting,
                           bool grad_v, bool grad_u, bool grad_v_ref) {
  const int64_t D = check_inputs(v, u, v_ref, scores, alpha, tau, weighting);
  const int64_t B = v.size(0), nchunks = (D + kChunk - 1) / kChunk;
  auto outs = allocate_outputs(v, scores, grad_v, grad_u, grad_v_ref);
  at::Tensor &loss = std::get<0>(outs), &fm = std::get<1>(outs), &w2 = std::get<2>(outs);
  at::Tensor &weights = std::get<3>(outs), &gv = std::get<4>(outs), &gu = std::get<5>(outs);
  at::Tensor& gr = std::get<6>(outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* w = weights.data_ptr<acc_t>();
    compute_weights<acc_t>(scores.data_ptr<acc_t>(), B, acc_t(tau), weighting, w);
    std::vector<acc_t> part(2 * B * nchunks);
    auto ptr = [](at::Tensor& g) { return g.numel() ? g.data_ptr<scalar_t>() : nullptr; };
    dispatch_flags([&](auto gv_t, auto gu_t, auto gr_t) {
      run_pass<scalar_t, decltype(gv_t)::value, decltype(gu_t)::value, decltype(gr_t)::value>(
          v.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
          v_ref.const_data_ptr<scalar_t>(), ptr(gv), ptr(gu), ptr(gr), B, D, w, acc_t(alpha),
          part.data(), part.data() + B * nchunks, nchunks);
    }, grad_v, grad_u, grad_v_ref);
    acc_t* fm_p = fm.data_ptr<acc_t>();
    acc_t* w2_p = w2.data_ptr<acc_t>();
    acc_t total = 0;
    for (int64_t i = 0; i < B; ++i) {
      acc_t s1 = 0, s2 = 0;
      for (int64_t c = 0; c < nchunks; ++c) {
        s1 += part[i * nchunks + c];
        s2 += part[B * nchunks + i * nchunks + c];
      }
      fm_p[i] = s1 / acc_t(D);
      w2_p[i] = s2 / acc_t(D);
      total += w[i] * fm_p[i] + acc_t(alpha) * w2_p[i];
    }
    loss.fill_(total / acc_t(B));
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(orw_fast, CPU, m) { m.impl("orw_cfm_w2", &orw_cfm_w2_cpu); }

}  // namespace orw_fast
